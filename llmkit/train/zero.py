"""DeepSpeed ZeRO (stages 1-3) under llmkit's own loop, asked for by an accelerate DeepSpeed config.

`accelerate launch --config_file conf/accelerate/deepspeed_zero{2,3}.yaml` puts ACCELERATE_USE_DEEPSPEED and the
ACCELERATE_DEEPSPEED_* fields in each process's environment. llmkit reads them here and builds the engine itself
(`deepspeed.initialize` on the model and llmkit's own optimizer), so the loop keeps its loss normalisation, LR
schedule, non-finite guard and checkpoints: the engine only shards and reduces. Weights stay fp32, as in every
llmkit run (train.precision=bf16 is autocast), so checkpoints hold the exact weights the optimizer updates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.errors import UserError

OFFLOAD_DEVICES = ("none", "cpu")


@dataclass(frozen=True)
class ZeroSettings:
    """What an accelerate DeepSpeed config asks for (ACCELERATE_DEEPSPEED_*)."""

    stage: int  # 1: optimizer state sharded; 2: and gradients; 3: and parameters
    offload_optimizer: str = "none"  # none | cpu: optimizer state and step in CPU memory
    offload_param: str = "none"  # none | cpu: parameter shards in CPU memory (stage 3)


def env_flag(name: str, default: str = "false") -> bool:
    """A yes/no field of an accelerate config, as `accelerate launch` puts it in the environment."""
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def zero_settings() -> ZeroSettings | None:
    """ZeRO settings when an accelerate DeepSpeed config launched this process, else None; refuses what
    llmkit does not run with one message naming the config."""
    if not env_flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
    config = f"conf/accelerate/deepspeed_zero{stage}.yaml" if stage in ("2", "3") else "the accelerate config"
    where = f"the accelerate config selects DeepSpeed ZeRO-{stage} ({config})"
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{where} but deepspeed is not installed: pip install deepspeed; or launch with "
                        "conf/accelerate/fsdp.yaml, the FSDP2 equivalent")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise UserError(f"{where} with deepspeed_config_file {os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']}; llmkit "
                        "builds the DeepSpeed config from train.*/optim.* and the accelerate fields zero_stage, "
                        "offload_optimizer_device and offload_param_device: remove deepspeed_config_file")
    for name, field, instead in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps",
                                  "train.batch_size and train.micro_batch_size"),
                                 ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", "optim.grad_clip")):
        if os.environ.get(name):
            raise UserError(f"{where} with {field}: {os.environ[name]}; llmkit sets it from {instead}: remove "
                            f"{field} from the config's deepspeed_config")
    if stage not in ("1", "2", "3"):
        raise UserError(f"{where}: zero_stage must be 1, 2 or 3")
    settings = ZeroSettings(int(stage),
                            os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower(),
                            os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower())
    for field, value in (("offload_optimizer_device", settings.offload_optimizer),
                         ("offload_param_device", settings.offload_param)):
        if value not in OFFLOAD_DEVICES:
            raise UserError(f"{where}: {field} {value} is not supported; use none or cpu")
    if settings.offload_param != "none" and settings.stage != 3:
        raise UserError(f"{where}: offload_param_device needs zero_stage 3; set it to none")
    return settings


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: ZeroSettings,
                 micro_batch_size: int, micro_batches: int, grad_clip: float) -> Any:
    """A DeepSpeed engine over `model` and llmkit's `optimizer`. The engine clips (grad_clip, 0: off) and steps
    after every `micro_batches` backward calls; llmkit's LR scheduler keeps driving the optimizer's groups."""
    if os.environ.get("DS_ACCELERATOR") is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # otherwise deepspeed warns that it found no GPU
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its INFO lines (the whole config, per rank) would bury the progress bar
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": settings.offload_optimizer}
    if settings.offload_param != "none":
        zero["offload_param"] = {"device": settings.offload_param}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": max(grad_clip, 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # llmkit's own AdamW / SGD
        "zero_force_ds_cpu_optimizer": False,  # offload keeps llmkit's optimizer (no DeepSpeedCPUAdam build)
        "steps_per_print": 2**62,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def backward(engine: Any, loss: torch.Tensor) -> None:
    """One micro-batch: backward (llmkit has already scaled the loss), then the engine's step, which reduces,
    clips and updates after the last micro-batch of the optimizer step and only counts before it."""
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def grad_norm(engine: Any, device: torch.device) -> torch.Tensor:
    """The global gradient norm before clipping of the step just taken (inf when the engine skipped a
    non-finite update)."""
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=device)


def full_state_dict(engine: Any, settings: ZeroSettings, is_main: bool) -> dict[str, torch.Tensor]:
    """Every process calls this (stage 3 gathers the parameters); the main process gets the full weights on CPU
    (tied weights as one tensor), the others an empty dict."""
    model = engine.module
    if settings.stage < 3:
        return model.state_dict() if is_main else {}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if not is_main:
            return {}
        copies: dict[int, torch.Tensor] = {}
        return {name: copies.setdefault(id(tensor.untyped_storage()), tensor.detach().cpu().clone())
                for name, tensor in model.state_dict().items()}


@contextlib.contextmanager
def _partitions_listed(engine: Any) -> Iterator[torch.optim.Optimizer]:
    """The engine's inner (llmkit's) optimizer with this process's flat fp32 partitions in its groups. ZeRO-3 lists
    them there only around its step; it lists them the same way for its own state_dict."""
    zero_optimizer = engine.optimizer
    listed = hasattr(zero_optimizer, "_set_fp32_optimizer_param_groups")
    if listed:
        zero_optimizer._set_fp32_optimizer_param_groups()
    try:
        yield zero_optimizer.optimizer
    finally:
        if listed:
            zero_optimizer._clear_fp32_optimizer_param_groups()


def optimizer_state(engine: Any, settings: ZeroSettings, world_size: int) -> dict[str, Any]:
    """This process's shard of the optimizer state (the state of its flat partitions: tensors and numbers only)."""
    with _partitions_listed(engine) as inner:
        return {"zero_stage": settings.stage, "processes": world_size, "optimizer": inner.state_dict()}


def load_optimizer_state(engine: Any, settings: ZeroSettings, world_size: int, saved: dict[str, Any], path: str) -> None:
    """Restore what `optimizer_state` saved, after checking it was cut the same way."""
    if (saved.get("zero_stage"), saved.get("processes")) != (settings.stage, world_size):
        raise UserError(f"{path} holds the optimizer shard of a DeepSpeed ZeRO-{saved.get('zero_stage')} run of "
                        f"{saved.get('processes')} processes; resume with the same stage and number of processes "
                        f"(this run: ZeRO-{settings.stage}, {world_size}), or start a new run from its weights "
                        "(init_from=<checkpoint>)")
    with _partitions_listed(engine) as inner:
        partitions = [p for group in inner.param_groups for p in group["params"]]
        for index, state in saved["optimizer"]["state"].items():
            sizes = {v.numel() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
            if index >= len(partitions) or not sizes <= {partitions[index].numel()}:
                raise UserError(f"{path}: its optimizer shards do not fit this model's partitions; resume with the "
                                "same model and trainable parameters, or start a new run from its weights "
                                "(init_from=<checkpoint>)")
        try:
            inner.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"{path} does not match this run's optimizer ({error}); resume with the same model, "
                            "optimizer and trainable parameters, or start a new run from its weights "
                            "(init_from=<checkpoint>)") from None
