"""The shared supervised loop: pretrain, sft, peft and reward differ only by data and objective.

The loop owns gradient accumulation (loss normalised by the number of targets across all
micro-batches and processes), clipping, the LR schedule, evaluation, early stopping,
atomic checkpoints with exact resume, signal handling, non-finite guards and progress.
The objective owns the loss: `objective(model, batch) -> (loss_sum, metric_sums)`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmkit.config.schema import LoggerConfig, OptimConfig, SchedConfig, TrainConfig
from llmkit.errors import InterruptedRun, UserError
from llmkit.train import checkpoint as ckpt
from llmkit.train.metrics import MetricsLogger, format_duration, measured_peak_flops
from llmkit.train.optim import build_optimizer, build_scheduler
from llmkit.train.progress import TrainProgress
from llmkit.train.runtime import Runtime
from llmkit.train.signals import GracefulStop

Batch = dict[str, torch.Tensor]


class TrainingError(UserError):
    """The run cannot go on (e.g. a non-finite loss); exit code 1."""

    exit_code = 1


class Objective(Protocol):
    def count(self, batch: Batch) -> int:
        """Number of targets (tokens, pairs) in a micro-batch: the loss's normaliser."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over targets, metrics summed over targets)."""


class StepDataset(Protocol):
    def num_examples(self, epoch: int) -> int: ...
    def example(self, epoch: int, index: int) -> Any: ...
    def collate(self, examples: list[Any]) -> Batch: ...


@dataclass
class TrainSpec:
    """Everything a command hands the loop."""

    command: str
    model: torch.nn.Module
    objective: Objective
    train_set: StepDataset
    val_set: StepDataset | None
    run_dir: Path
    meta: dict[str, Any]  # written into every checkpoint's meta.json (model config, tokenizer, ...)
    flops_per_token: float = 0.0  # for MFU; 0 hides it
    files: dict[str, Path] = field(default_factory=dict)  # copied into every checkpoint
    saved_tensors: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None  # default: all weights


@dataclass
class LoopState:
    step: int = 0
    best_val: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_skips: int = 0


@dataclass
class LoopResult:
    step: int
    last_val: float | None
    best_val: float
    checkpoint: Path | None
    stopped_early: bool


def batch_indices(dataset: StepDataset, global_batch: int, seed: int, step: int) -> tuple[int, list[int]]:
    """The examples of global batch `step`: a fresh permutation per epoch, no overlap, tail dropped."""
    epoch, first = 0, 0
    while True:
        per_epoch = dataset.num_examples(epoch) // global_batch
        if per_epoch == 0:
            raise UserError(f"the training data has {dataset.num_examples(epoch)} examples, fewer than one batch "
                            f"(train.batch_size={global_batch}); use more data or a smaller batch")
        if step < first + per_epoch:
            break
        first += per_epoch
        epoch += 1
    order = torch.randperm(dataset.num_examples(epoch), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (step - first) * global_batch
    return epoch, order[start:start + global_batch].tolist()


def accumulate(model: torch.nn.Module, objective: Objective, micro_batches: list[Batch], runtime: Runtime,
               total_targets: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward/backward every micro-batch, scaling each loss sum by world_size / total_targets.

    DDP averages gradients over processes, so the scale makes the result the gradient of
    (sum of all target losses) / (number of all targets): never a mean of per-batch means.
    Returns this process's (unscaled loss sum, metric sums), detached.
    """
    scale = runtime.world_size / max(total_targets, 1)
    loss_total = torch.zeros((), device=runtime.device)
    metric_totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        with runtime.no_sync(model, skip_sync=index < len(micro_batches) - 1), runtime.autocast():
            loss_sum, metrics = objective(model, batch)
        (loss_sum * scale).backward()
        loss_total += loss_sum.detach().float()
        for key, value in metrics.items():
            metric_totals[key] = metric_totals.get(key, 0) + value.detach().float()
    return loss_total, metric_totals


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training run of `spec` under `cfg`; `run()` drives it to the end, a stop signal or early stopping."""

    def __init__(self, spec: TrainSpec, cfg: TrainConfig, optim: OptimConfig, sched: SchedConfig,
                 logger: LoggerConfig, runtime: Runtime):
        self.spec, self.cfg, self.runtime = spec, cfg, runtime
        per_rank, remainder = divmod(cfg.batch_size, runtime.world_size)
        if remainder or per_rank % cfg.micro_batch_size:
            raise UserError(f"train.batch_size={cfg.batch_size} must split evenly into processes ({runtime.world_size}) "
                            f"x micro-batches of train.micro_batch_size={cfg.micro_batch_size}")
        self.per_rank = per_rank
        self.model = spec.model.to(runtime.device)
        self.optimizer = build_optimizer(self.model, optim, runtime.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.max_steps, sched)
        self.grad_clip = optim.grad_clip
        self.state = LoopState()
        self.ckpt_root = spec.run_dir / "checkpoints"
        resumed = self._maybe_resume()
        wrapped = torch.compile(self.model) if cfg.compile else self.model
        self.wrapped = runtime.accelerator.prepare_model(wrapped) if runtime.world_size > 1 else wrapped
        self.metrics = MetricsLogger(spec.run_dir, runtime.is_main, logger.tensorboard,
                                     resume_step=self.state.step if resumed else None)
        self.progress = TrainProgress(cfg.max_steps, self.state.step, runtime.is_main, logger.progress, spec.command)
        self.last_val: float | None = None

    # ----- resume -------------------------------------------------------------------------------
    def _maybe_resume(self) -> bool:
        resume = self.cfg.resume
        if resume == "never":
            return False
        source = ckpt.latest_checkpoint(self.ckpt_root) if resume == "auto" else ckpt.resolve_checkpoint(resume)
        if source is None:
            return False
        saved = self.spec.saved_tensors(self.model) if self.spec.saved_tensors else None
        tensors = ckpt.read_tensors(source / ckpt.WEIGHTS)
        ckpt.load_weights(self.model, tensors, source, strict=saved is None)
        state = ckpt.load_train_state(source / "state.pt")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as error:
            raise UserError(f"{source}/state.pt does not match this run's optimizer ({error})") from None
        self.state = LoopState(**state["loop"])
        rng_file = source / f"rng_{self.runtime.rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{source} was saved by fewer processes than this run has ({self.runtime.world_size}); "
                            "resume with the same number of processes")
        _set_rng_state(ckpt.load_train_state(rng_file))
        self.progress_note = f"resumed from {source} at step {self.state.step}"
        if self.runtime.is_main:
            print(self.progress_note)
        return True

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self, val_loss: float | None) -> Path:
        runtime = self.runtime
        tmp = ckpt.begin_checkpoint(self.ckpt_root, self.state.step) if runtime.is_main else None
        runtime.barrier()
        tmp = tmp or self.ckpt_root / f".tmp-{ckpt.step_dir_name(self.state.step)}"
        ckpt.write_rank_state(tmp, runtime.rank, _rng_state())
        runtime.barrier()
        final = self.ckpt_root / ckpt.step_dir_name(self.state.step)
        if runtime.is_main:
            tensors = self.spec.saved_tensors(self.model) if self.spec.saved_tensors else self.model.state_dict()
            train_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                           "loop": dataclasses.asdict(self.state)}
            meta = {**self.spec.meta, "val_loss": val_loss}
            final = ckpt.finish_checkpoint(self.ckpt_root, tmp, self.state.step, tensors, train_state, meta, self.spec.files)
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.keep_last, self._best_checkpoint())
        runtime.barrier()
        return final

    def _best_checkpoint(self) -> Path | None:
        scored = [(ckpt.read_meta(p).get("val_loss"), p) for p in ckpt.complete_checkpoints(self.ckpt_root)]
        scored = [(v, p) for v, p in scored if v is not None]
        return min(scored, key=lambda vp: vp[0])[1] if scored else None

    # ----- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per target on the validation set (the same examples every time)."""
        val = self.spec.val_set
        if val is None or val.num_examples(0) == 0:
            return None
        count = val.num_examples(0)
        micro = self.cfg.micro_batch_size
        wanted = min(count, self.cfg.eval_batches * micro)
        picks = np.linspace(0, count - 1, wanted).round().astype(int).tolist() if wanted < count else list(range(count))
        chunks = [picks[i:i + micro] for i in range(0, len(picks), micro)][self.runtime.rank::self.runtime.world_size]
        self.wrapped.eval()
        loss = torch.zeros((), device=self.runtime.device)
        targets = torch.zeros((), device=self.runtime.device)
        for chunk in chunks:
            batch = _to_device(val.collate([val.example(0, i) for i in chunk]), self.runtime.device)
            with self.runtime.autocast():
                loss_sum, _ = self.spec.objective(self.wrapped, batch)
            loss += loss_sum.float()
            targets += self.spec.objective.count(batch)
        self.wrapped.train()
        total = self.runtime.sum(targets).item()
        return self.runtime.sum(loss).item() / total if total else None

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> LoopResult:
        cfg, runtime, spec = self.cfg, self.runtime, self.spec
        peak = measured_peak_flops(runtime.device) * runtime.world_size if spec.flops_per_token else 0.0
        self.wrapped.train()
        stopped_early = False
        last_saved: Path | None = ckpt.latest_checkpoint(self.ckpt_root)
        window_start, window_tokens, run_start, run_first_step = time.perf_counter(), 0, time.perf_counter(), self.state.step
        try:
            with GracefulStop() as stop:
                while self.state.step < cfg.max_steps:
                    loss, grad_norm, metrics, tokens = self._step()
                    self.state.step += 1
                    step = self.state.step
                    window_tokens += tokens
                    val_loss = None
                    if step % cfg.eval_every == 0 or step == cfg.max_steps:
                        val_loss = self.evaluate()
                        stopped_early = self._update_early_stopping(val_loss)
                    if step % cfg.log_every == 0 or val_loss is not None or step == cfg.max_steps:
                        now = time.perf_counter()
                        tok_s = window_tokens / max(now - window_start, 1e-9)
                        stats = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tok_s}
                        if peak:
                            stats["mfu"] = spec.flops_per_token * tok_s / peak
                        record = {**stats, "grad_norm": grad_norm, **metrics}
                        if val_loss is not None:
                            record["val_loss"] = val_loss
                            self.last_val = val_loss
                        self.metrics.log(step, record)
                        rate = (now - run_start) / max(step - run_first_step, 1)
                        shown = {**stats, **({"val_loss": val_loss} if val_loss is not None else {})}
                        self.progress.update(step, shown, format_duration(rate * (cfg.max_steps - step)), True)
                        window_start, window_tokens = now, 0
                    else:
                        self.progress.update(step, {"loss": loss}, "", False)
                    done = step == cfg.max_steps or stopped_early or stop.requested
                    if step % cfg.save_every == 0 or done:
                        last_saved = self.save(val_loss)
                    if stop.requested:
                        raise InterruptedRun(self._resume_message(stop.name, last_saved), stop.exit_code)
                    if stopped_early:
                        self.progress.print(f"early stopping at step {step}: no validation improvement in "
                                            f"{cfg.early_stopping_patience} evaluations")
                        break
        finally:
            self.progress.close()
            self.metrics.close()
        return LoopResult(self.state.step, self.last_val, self.state.best_val, last_saved, stopped_early)

    def _step(self) -> tuple[float, float, dict[str, float], int]:
        """One optimizer step over the global batch; returns (loss, grad norm, metrics, tokens seen)."""
        cfg, runtime, spec = self.cfg, self.runtime, self.spec
        epoch, indices = batch_indices(spec.train_set, cfg.batch_size, cfg.seed, self.state.step)
        mine = indices[runtime.rank * self.per_rank:(runtime.rank + 1) * self.per_rank]
        micro_batches = [
            _to_device(spec.train_set.collate([spec.train_set.example(epoch, i) for i in mine[j:j + cfg.micro_batch_size]]),
                       runtime.device)
            for j in range(0, self.per_rank, cfg.micro_batch_size)
        ]
        local_targets = sum(spec.objective.count(b) for b in micro_batches)
        total = int(runtime.sum(torch.tensor(float(local_targets), device=runtime.device)).item())
        loss_sum, metric_sums = accumulate(self.wrapped, spec.objective, micro_batches, runtime, total)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        loss = runtime.sum(loss_sum).item() / max(total, 1)
        metrics = {k: runtime.sum(v).item() / max(total, 1) for k, v in metric_sums.items()}
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) or total == 0:
            self._nonfinite(loss, grad_norm, total)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(v.numel() for b in micro_batches for k, v in b.items() if k.endswith("input_ids"))
        return loss, grad_norm, metrics, tokens * runtime.world_size

    def _nonfinite(self, loss: float, grad_norm: float, total: int) -> None:
        """Skip the update (parameters untouched) or stop, as train.on_nonfinite says."""
        step = self.state.step + 1
        what = "no trainable targets in the batch" if total == 0 else f"non-finite loss {loss} / grad norm {grad_norm}"
        last = ckpt.latest_checkpoint(self.ckpt_root)
        if self.cfg.on_nonfinite == "skip" and self.state.nonfinite_skips < self.cfg.max_nonfinite_skips:
            self.state.nonfinite_skips += 1
            self.progress.print(f"step {step}: {what}; update skipped ({self.state.nonfinite_skips}/"
                                f"{self.cfg.max_nonfinite_skips} allowed)")
            return
        raise TrainingError(f"step {step}: {what}; parameters were left untouched. Last good checkpoint: "
                            f"{last or 'none yet'}. Lower optim.lr or set train.on_nonfinite=skip")

    def _update_early_stopping(self, val_loss: float | None) -> bool:
        if val_loss is None:
            return False
        if val_loss < self.state.best_val:
            self.state.best_val, self.state.evals_without_improvement = val_loss, 0
        else:
            self.state.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.state.evals_without_improvement >= patience

    def _resume_message(self, signal_name: str, saved: Path | None) -> str:
        args = [a for a in sys.argv[1:] if not a.startswith(("out_dir=", "train.resume="))]
        command = shlex.join(["llmkit", *args, f"out_dir={self.spec.run_dir}", "train.resume=auto"])
        return f"stopped by {signal_name} at step {self.state.step}; checkpoint saved at {saved}.\nResume with: {command}"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
