"""Metrics to metrics.jsonl and TensorBoard, progress on the terminal, and the machine's peak FLOP/s."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    """Append-only JSONL (+ TensorBoard when installed). On resume, records after the checkpoint are dropped
    so the file reads exactly like an uninterrupted run's."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            steps = [_step_of(line) for line in lines]
            kept = [line for line, step in zip(lines, steps, strict=True) if step is not None and step <= resume_step]
            foreign = sum(step is None for step in steps[:-1])  # a torn last line is a kill's, expected
            if foreign:
                print(f"note: {self.path} had {foreign} line(s) that are not metrics records; they are dropped",
                      file=sys.stderr)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.handle = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                self.writer = None  # the `tensorboard` extra is not installed

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    """The record's step; None for a line that is not a metrics record (a torn last line, or foreign text)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value


def measured_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense matmul peak (FLOP/s) in the matmul dtype of training (bf16 under autocast; fp32
    runs as TF32 on CUDA, where llmkit turns it on).

    Measured briefly at every start and cached as the best value seen, so a measurement taken
    while the machine was busy does not stick (a low peak would inflate MFU).
    """
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{threads}threads"
    name = where if dtype == torch.float32 else f"{where}-{str(dtype).removeprefix('torch.')}"
    cache = Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit")) / "peak_flops.json"
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    size = 8192 if device.type == "cuda" else 2048
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG use: resume must not shift it
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(1 if name in table else 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = max(2 * size**3 / best, float(table.get(name, 0.0)))
    table[name] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table))
    except OSError:
        pass
    return peak


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
