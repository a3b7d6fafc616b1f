"""The process's place in a (possibly distributed) run: device, rank, precision, collectives, sharding.

A thin layer over accelerate, so the same loop runs on one CPU, one GPU or many processes
(`accelerate launch -m llmkit ...` or `torchrun -m llmkit ...`). Data parallel (DDP) goes through
accelerate; FSDP, asked for by an accelerate config (`conf/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP and
FSDP_* in the environment), is applied here with torch's FSDP2 `fully_shard`, on GPUs and on CPU (gloo) alike;
DeepSpeed ZeRO (`conf/accelerate/deepspeed_zero{2,3}.yaml`) runs through `llmkit.train.zero`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.train import zero as deepspeed_zero
from llmkit.train.checkpoint import load_train_state, unique_names, write_rank_state
from llmkit.train.zero import ZeroSettings, env_flag


@dataclass(frozen=True)
class FSDPSettings:
    """FSDP2 settings read from the environment an accelerate FSDP config sets (FSDP_*)."""

    wrap_classes: tuple[str, ...] = ("Block",)  # each module of these classes is one sharding unit
    reshard_after_forward: bool = True  # True: full sharding (ZeRO-3 like); False: SHARD_GRAD_OP (ZeRO-2 like)
    offload_params: bool = False  # keep sharded parameters and optimizer state in CPU memory


@dataclass
class Runtime:
    accelerator: Any  # accelerate.Accelerator
    device: torch.device
    precision: str  # fp32 | bf16
    fsdp: FSDPSettings | None = None  # set when an accelerate FSDP config launched the run
    zero: ZeroSettings | None = None  # set when an accelerate DeepSpeed config launched the run
    engine: Any = None  # the DeepSpeed engine, once `wrap` has built it
    host_group: Any = None  # a gloo group for host-side agreement when the default group is NCCL (else None)
    tied: set[str] = field(default_factory=set)  # names of tied (shared) weights, dropped from gathered states

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """Parameters are split over processes (FSDP, ZeRO-3): a forward pass needs every process."""
        return self.fsdp is not None or (self.zero is not None and self.zero.stage == 3)

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

    def agree(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any (a CPU collective: the device is not waited on)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        votes = torch.tensor([int(flag)])
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(votes.item())

    def gather(self, value: Any) -> list[Any]:
        """A picklable value from every process, in rank order, on every process ([value] on one process)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.host_group)
        return values

    def check_same_start(self, checkpoint: Path | None, data_sha256: str | None) -> None:
        """Refuse a launch whose processes would resume from different checkpoints or train on different data
        (on several nodes: a run directory, data files or LLMKIT_CACHE that differ from node to node)."""
        if self.world_size == 1:
            return
        from llmkit.errors import SettingsError

        views = self.gather((str(checkpoint), data_sha256))
        others = [rank for rank, view in enumerate(views) if view != views[0]]
        if not others:
            return
        where = f"process(es) {', '.join(map(str, others))} and process 0"
        if any(view[0] != views[0][0] for view in views):
            raise SettingsError(f"{where} would resume from different checkpoints ({views[0][0]} on process 0): "
                                "the run directory must be one directory that every process sees, on a filesystem "
                                "all nodes share")
        raise SettingsError(f"{where} read different training or validation data: every node needs the same data "
                            "files (and tokenized shards: LLMKIT_CACHE or tokens_dir=), e.g. on a filesystem all "
                            "nodes share")

    @property
    def is_local_main(self) -> bool:
        """The first process on this node (each node of a multi-node launch has one)."""
        return self.accelerator.is_local_main_process

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (FSDP: reduce-scatter) on accumulation micro-steps before the last
        (a DeepSpeed engine counts the micro-steps itself)."""
        if self.zero is not None:
            yield
        elif self.fsdp is not None:
            model.set_requires_gradient_sync(not skip_sync)
            yield
        elif skip_sync and self.world_size > 1:
            with self.accelerator.no_sync(model):
                yield
        else:
            yield

    @property
    def steps_in_backward(self) -> bool:
        """A DeepSpeed engine reduces, clips and updates inside the last micro-batch's `backward` (even when the
        step has no targets: the loop then leaves the backward out)."""
        return self.engine is not None

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2: shard `model` in place (each wrap-class module, then the root); a no-op without FSDP. Build the
        optimizer on `model` afterwards, so that it holds the sharded parameters."""
        if self.fsdp is None:
            return
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        own = model.state_dict()
        self.tied = set(own) - set(unique_names(own))
        options: dict[str, Any] = {"reshard_after_forward": self.fsdp.reshard_after_forward}
        if self.fsdp.offload_params:
            options["offload_policy"] = CPUOffloadPolicy()
        if self.precision == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        units = [m for m in model.modules() if type(m).__name__ in self.fsdp.wrap_classes]
        if not units:
            raise UserError(f"FSDP: no module of class {', '.join(self.fsdp.wrap_classes)} in the model; set "
                            "fsdp_transformer_layer_cls_to_wrap to Block in the accelerate config")
        for unit in units:
            fully_shard(unit, **options)
        fully_shard(model, **options)
        # With a padded vocabulary (model.pad_vocab_multiple) the root returns its logits sliced to vocab_size, a view;
        # FSDP2 warns that an in-place op on it would skip the backward all-gather. llmkit never writes into them.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTransformer\) returned a view tensor")
        if self.is_main:
            print(f"FSDP2: {len(units)} {'/'.join(self.fsdp.wrap_classes)} units and the root sharded over "
                  f"{self.world_size} processes")

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, compile_setting: str,
             micro_batch_size: int, micro_batches: int, grad_clip: float) -> torch.nn.Module:
        """The module the loop runs: under DeepSpeed the engine, built over `model` and `optimizer` (which it shards
        in place; it clips to grad_clip and steps every `micro_batches` backward calls); otherwise `model`,
        compiled as train.compile says and DDP-wrapped on several processes without FSDP."""
        if self.zero is not None:
            if compile_setting == "true":
                raise UserError("train.compile=true is not supported under DeepSpeed; set train.compile=auto")
            self.engine = deepspeed_zero.build_engine(model, optimizer, self.zero, micro_batch_size, micro_batches,
                                                      grad_clip)
            if self.is_main:
                print(f"DeepSpeed ZeRO-{self.zero.stage} over {self.world_size} processes")
            return self.engine
        wrapped = torch.compile(model) if use_compile(compile_setting, self.device) else model
        if self.fsdp is None and self.world_size > 1:
            return self.accelerator.prepare_model(wrapped)
        return wrapped

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (scaled) loss; a DeepSpeed engine also steps after the last one."""
        if self.engine is not None:
            deepspeed_zero.backward(self.engine, loss)
        else:
            loss.backward()

    def clip_gradients(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to max_norm (0: no clipping); the total norm before clipping, on the device.
        (DeepSpeed: the engine clipped in its step; its norm.)"""
        if self.engine is not None:
            return deepspeed_zero.grad_norm(self.engine, self.device)
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor

    def skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the optimizer can skip a non-finite update on the device: fused Adam/AdamW take a `found_inf`
        flag (not under FSDP, whose states are DTensors, nor DeepSpeed, whose engine skips one itself)."""
        return (self.fsdp is None and self.zero is None and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
                and all(g.get("fused") for g in optimizer.param_groups))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer update (a DeepSpeed engine has made it in `backward`)."""
        if self.engine is None:
            optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.engine is None:  # (a DeepSpeed engine clears its own gradient buffers; clearing them breaks offload)
            optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every process calls this (a collective under FSDP and ZeRO-3); the main process gets the full,
        unsharded weights on CPU (tied weights once), the others an empty dict. Otherwise: model.state_dict()."""
        if self.zero is not None:
            return deepspeed_zero.full_state_dict(self.engine, self.zero, self.is_main)
        if self.fsdp is None:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k not in self.tied}

    def load_full_state_dict(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Every process: copy full (unsharded) tensors into the matching shards of a sharded model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> dict[str, Any]:
        """Every process calls this; the optimizer state for state.pt (under FSDP: full, keyed by parameter name,
        on the main process; loadable by any number of processes). Under DeepSpeed every process writes its own
        shard into `directory` (zero_<rank>.pt, tensors and numbers only) and state.pt gets a marker."""
        if self.zero is not None:
            write_rank_state(directory, self.rank, deepspeed_zero.optimizer_state(self.engine, self.zero, self.world_size),
                             name="zero")
            return {"deepspeed_zero": self.zero.stage, "processes": self.world_size}
        if self.fsdp is None:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             source: Path) -> None:
        """Every process: restore what `optimizer_state` saved into checkpoint `source`."""
        if self.zero is not None:
            shard = source / f"zero_{self.rank}.pt"
            if not shard.is_file():
                raise UserError(f"{source} has no DeepSpeed optimizer shard {shard.name}: it was not saved by a "
                                f"DeepSpeed run of {self.world_size} processes; resume it as it was launched, "
                                "or start a new run from its weights (init_from=<checkpoint>)")
            deepspeed_zero.load_optimizer_state(self.engine, self.zero, self.world_size, load_train_state(shard), str(shard))
            return
        if "deepspeed_zero" in state:
            raise UserError(f"the checkpoint was saved by a DeepSpeed ZeRO-{state['deepspeed_zero']} run of "
                            f"{state['processes']} processes, which keeps each process's optimizer shard apart: "
                            "resume it with the same accelerate config and number of processes, or start a new run "
                            "from its weights (init_from=<checkpoint>)")
        if self.fsdp is None:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def holds_a_shard(parameter: torch.Tensor) -> bool:
    """Whether FSDP2 (a DTensor) or ZeRO-3 (`ds_id`) keeps only this process's shard of `parameter` outside the
    forward: the whole tensor exists only while the module that owns it runs."""
    return hasattr(parameter, "device_mesh") or hasattr(parameter, "ds_id")


def use_compile(setting: str, device: torch.device) -> bool:
    """train.compile: true | false | auto (on CUDA only: on this project's CPUs the ~40 s compile outweighs
    a +5-13% step speed-up for runs of minutes; see docs/performance.md)."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Switch block recomputation on every Transformer inside `model` (plain, PEFT-adapted, under a head)."""
    for module in model.modules():
        if not hasattr(module, "activation_checkpointing"):
            continue
        peft = getattr(module, "peft_state", None)
        if enabled and peft is not None and peft.cfg.method in ("prefix", "prompt"):
            raise UserError(f"train.activation_checkpointing does not combine with peft={peft.cfg.method} (its "
                            "per-forward attention hooks are not replayed by the recomputation); turn it off, "
                            "or use a module-swap method such as peft=lora")
        module.activation_checkpointing = enabled


def fsdp_settings() -> FSDPSettings | None:
    """FSDP settings when an accelerate FSDP config launched this process (ACCELERATE_USE_FSDP=true), else None."""
    if not env_flag("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the accelerate config asks for FSDP version {version}; llmkit runs FSDP2 "
                        "(fsdp_version: 2, as in conf/accelerate/fsdp.yaml)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise UserError(f"fsdp_auto_wrap_policy {policy} is not supported; use TRANSFORMER_BASED_WRAP with "
                        "fsdp_transformer_layer_cls_to_wrap: Block (conf/accelerate/fsdp.yaml)")
    classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block").split(",") if c.strip())
    return FSDPSettings(wrap_classes=classes or ("Block",),
                        reshard_after_forward=env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                        offload_params=env_flag("FSDP_OFFLOAD_PARAMS"))


def sharded_launch() -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the launch shards the parameters over processes (read from the
    environment accelerate set), else None: what a command can refuse before anything is written."""
    if fsdp_settings() is not None:
        return "FSDP"
    zero = deepspeed_zero.zero_settings()
    return "DeepSpeed ZeRO-3" if zero is not None and zero.stage == 3 else None


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Create the accelerator: CPU unless CUDA is present (or asked for), bf16 autocast on GPU by default."""
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda was asked for but no CUDA GPU is visible; use train.device=auto or "
                        "train.device=cpu")
    zero_cfg = deepspeed_zero.zero_settings()
    fsdp = fsdp_settings()
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if use_cpu else "bf16"
    # Under DeepSpeed accelerate is only the process group (as for DDP): llmkit builds the engine itself.
    hidden = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None) if zero_cfg is not None else None
    try:
        accelerator = Accelerator(cpu=use_cpu)
    finally:
        if hidden is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = hidden
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    host_group = None
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        if dist.get_backend() != "gloo":  # every process creates it, at the same point
            host_group = dist.new_group(backend="gloo")
    return Runtime(accelerator=accelerator, device=accelerator.device, precision=precision, fsdp=fsdp, zero=zero_cfg,
                   host_group=host_group)
