"""The process's place in a (possibly distributed) run: device, rank, precision, collectives.

A thin layer over accelerate, so the same loop runs on one CPU, one GPU or many processes
(`accelerate launch -m llmkit ...` or `torchrun -m llmkit ...`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.errors import UserError


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator
    device: torch.device
    precision: str  # fp32 | bf16

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identity on one process)."""
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.device), reduction="sum")

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on accumulation micro-steps before the last."""
        if skip_sync and self.world_size > 1:
            with self.accelerator.no_sync(model):
                yield
        else:
            yield


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Create the accelerator: CPU unless CUDA is present (or asked for), bf16 autocast on GPU by default."""
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or device=cpu")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if use_cpu else "bf16"
    accelerator = Accelerator(cpu=use_cpu)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(accelerator=accelerator, device=accelerator.device, precision=precision)
