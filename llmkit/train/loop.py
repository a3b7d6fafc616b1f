"""The shared supervised loop: pretrain, sft, peft, reward and dpo differ only by data and objective.

The loop owns gradient accumulation (loss normalised by the number of targets across all
micro-batches and processes), clipping, the LR schedule, evaluation, early stopping,
atomic checkpoints with exact resume, signal handling, non-finite guards and progress.
The objective owns the loss: `objective(model, batch) -> (loss_sum, metric_sums)`.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmkit.config.schema import LoggerConfig, OptimConfig, SchedConfig, TrainConfig
from llmkit.data.lm import data_fingerprint
from llmkit.errors import InterruptedRun, SettingsError, UserError
from llmkit.train import checkpoint as ckpt
from llmkit.train.metrics import MetricsLogger, format_duration, measured_peak_flops
from llmkit.train.optim import build_optimizer, build_scheduler
from llmkit.train.progress import TrainProgress
from llmkit.train.rundir import checkpoint_saved
from llmkit.train.runtime import Runtime, set_activation_checkpointing
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
    def fingerprint(self) -> str | None: ...  # sha256 of the data; None: unknown (no resume check)


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
    flops_per_token: Callable[[int], float] | None = None  # training FLOPs per token at a width T (MFU); None hides it
    files: dict[str, Path] = field(default_factory=dict)  # copied into every checkpoint
    saved_keys: frozenset[str] | None = None  # the state-dict names a checkpoint holds (a PEFT adapter's); None: all


@dataclass
class LoopState:
    step: int = 0
    best_val: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_skips: int = 0


@dataclass
class StepValues:
    """One step's results as left on the device; the host reads them only at read points (see Trainer.run)."""

    step: int
    loss_sum: torch.Tensor  # summed over processes
    total: int | torch.Tensor  # targets of the step, over processes
    grad_norm: torch.Tensor
    metric_sums: dict[str, torch.Tensor]


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
            raise UserError(f"the training data gives {dataset.num_examples(epoch)} rows (token windows, examples or "
                            f"packed rows), fewer than one batch (train.batch_size={global_batch}); use more data, a "
                            "smaller train.batch_size, or data.packing=false where examples are packed")
        if step < first + per_epoch:
            break
        first += per_epoch
        epoch += 1
    order = torch.randperm(dataset.num_examples(epoch), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (step - first) * global_batch
    return epoch, order[start:start + global_batch].tolist()


def accumulate(model: torch.nn.Module, objective: Objective, micro_batches: list[Batch], runtime: Runtime,
               total_targets: int | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward/backward every micro-batch, scaling each loss sum by world_size / total_targets.

    DDP averages gradients over processes, so the scale makes the result the gradient of
    (sum of all target losses) / (number of all targets): never a mean of per-batch means.
    total_targets may be a device tensor (the all-reduced count), so nothing waits for the device.
    Returns this process's (unscaled loss sum, metric sums), detached.
    """
    if isinstance(total_targets, torch.Tensor):
        scale: float | torch.Tensor = runtime.world_size / total_targets.clamp(min=1)
    else:
        scale = runtime.world_size / max(total_targets, 1)
    loss_total = torch.zeros((), device=runtime.device)
    metric_totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        with runtime.no_sync(model, skip_sync=index < len(micro_batches) - 1), runtime.autocast():
            loss_sum, metrics = objective(model, batch)
        runtime.backward(loss_sum * scale)
        loss_total += loss_sum.detach().float()
        for key, value in metrics.items():
            metric_totals[key] = metric_totals.get(key, 0) + value.detach().float()
    return loss_total, metric_totals


class Trainer:
    """One training run of `spec` under `cfg`; `run()` drives it to the end, a stop signal or early stopping."""

    def __init__(self, spec: TrainSpec, cfg: TrainConfig, optim: OptimConfig, sched: SchedConfig,
                 logger: LoggerConfig, runtime: Runtime):
        self.spec, self.cfg, self.runtime = spec, cfg, runtime
        per_rank, remainder = divmod(cfg.batch_size, runtime.world_size)
        if remainder or per_rank % cfg.micro_batch_size:
            raise SettingsError(f"train.batch_size={cfg.batch_size} must split evenly into processes ({runtime.world_size}) "
                            f"x micro-batches of train.micro_batch_size={cfg.micro_batch_size}")
        self.per_rank = per_rank
        if spec.val_set is None or spec.val_set.num_examples(0) == 0:
            fix = ("add data, raise data.val_fraction, give held-out data (data.validation_path, where the command has "
                   "it) or lower train.seq_len")
            if cfg.early_stopping_patience is not None:
                raise SettingsError(f"train.early_stopping_patience needs validation examples, and the held-out split "
                                    f"is empty: {fix}")
            if runtime.is_main:
                print(f"note: no validation examples (the held-out split is empty, or shorter than train.seq_len + 1 "
                      f"tokens): no val_loss, and no best checkpoint is kept; {fix}")
        self.model = spec.model.to(runtime.device)
        set_activation_checkpointing(self.model, cfg.activation_checkpointing)
        self.grad_clip = optim.grad_clip
        self.state = LoopState()
        self.ckpt_root = spec.run_dir / "checkpoints"
        source = ckpt.resume_checkpoint(cfg.resume, self.ckpt_root)
        self.data_sha256 = data_fingerprint(spec.train_set, spec.val_set)
        runtime.check_same_start(source, self.data_sha256)
        if source is not None:  # weights go into the whole model, before any sharding
            ckpt.refuse_other_data(source, self.data_sha256)
            self._load_weights(source)
        runtime.shard(self.model)  # FSDP2, in place, before the optimizer takes the parameters
        self.optimizer = build_optimizer(self.model, optim, runtime.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.max_steps, sched)
        self.wrapped = runtime.wrap(self.model, self.optimizer, cfg.compile, cfg.micro_batch_size,
                                    per_rank // cfg.micro_batch_size, optim.grad_clip)
        resumed = source is not None and self._load_train_state(source)
        self.metrics = MetricsLogger(spec.run_dir, runtime.is_main, logger.tensorboard,
                                     resume_step=self.state.step if resumed else None)
        self.progress = TrainProgress(cfg.max_steps, self.state.step, runtime.is_main, logger.progress, spec.command)
        self.last_val: float | None = None
        self.applied_lr = self.scheduler.get_last_lr()[0]  # the learning rate of the latest step
        # Host-device syncs only at read points: steps wait in `pending`; the non-finite guard skips bad
        # updates on the device (fused AdamW's found_inf) and the host replays its decisions when it reads.
        self.pending: list[StepValues] = []
        self.device_skip = runtime.skips_on_device(self.optimizer)
        self.halted = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.skip_count = torch.zeros((), dtype=torch.long, device=runtime.device)
        self.shown: dict[str, float] = {}
        self.last_read: tuple[float, float, dict[str, float]] = (math.nan, math.nan, {})
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="llmkit-batches") if cfg.prefetch else None
        self.next_batches: tuple[int, Future[list[Batch]]] | None = None

    # ----- resume -------------------------------------------------------------------------------
    def _load_weights(self, source: Path) -> None:
        tensors = ckpt.read_tensors(source / ckpt.WEIGHTS)
        ckpt.load_weights(self.model, tensors, source, strict=self.spec.saved_keys is None)

    def _load_train_state(self, source: Path) -> bool:
        state = ckpt.load_train_state(source / "state.pt")
        try:
            self.runtime.load_optimizer_state(self.model, self.optimizer, state["optimizer"], source)
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"{source}/state.pt does not match this run's optimizer ({error})") from None
        self.state = LoopState(**state["loop"])
        rng_file = source / f"rng_{self.runtime.rank}.pt"
        if not rng_file.is_file():
            saved_by = ckpt.read_meta(source).get("processes")
            if saved_by is not None and saved_by < self.runtime.world_size:
                raise UserError(f"{source} was saved by {saved_by} process(es), fewer than this run has "
                                f"({self.runtime.world_size}); resume with the same number of processes")
            raise UserError(f"{rng_file} is missing: the checkpoint is incomplete or corrupted; resume from another "
                            "checkpoint (train.resume=<checkpoint directory>) or start over with train.overwrite=true")
        ckpt.set_rng_state(ckpt.load_train_state(rng_file))
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
        ckpt.write_rank_state(tmp, runtime.rank, ckpt.rng_state())
        full = runtime.full_state_dict(self.model) if runtime.sharded else None  # collectives (FSDP, ZeRO-3):
        optimizer_state = runtime.optimizer_state(self.model, self.optimizer, tmp)  # every process gathers, main keeps
        runtime.barrier()
        final = self.ckpt_root / ckpt.step_dir_name(self.state.step)
        if runtime.is_main:
            # consolidated full weights when sharded (the live model's state_dict would hold shards, and its hooks
            # can be collectives); only the chosen names, e.g. a PEFT adapter's
            state = full if full is not None else self.model.state_dict()
            keys = self.spec.saved_keys
            tensors = state if keys is None else {name: state[name].detach().contiguous() for name in sorted(keys)}
            train_state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                           "loop": dataclasses.asdict(self.state)}
            meta = {**self.spec.meta, "val_loss": val_loss, "processes": runtime.world_size,
                    "data_sha256": self.data_sha256}
            final = ckpt.finish_checkpoint(self.ckpt_root, tmp, self.state.step, tensors, train_state, meta, self.spec.files)
            checkpoint_saved(self.spec.run_dir, self.spec.command)
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
        wanted = min(count, self.cfg.eval_batches * self.cfg.batch_size)  # not * micro: the same set for every micro
        picks = np.linspace(0, count - 1, wanted).round().astype(int).tolist() if wanted < count else list(range(count))
        every = [picks[i:i + micro] for i in range(0, len(picks), micro)]
        chunks = every[self.runtime.rank::self.runtime.world_size]
        self.wrapped.eval()
        loss = torch.zeros((), device=self.runtime.device)
        targets = torch.zeros((), device=self.runtime.device)
        for chunk in chunks:
            batch = _to_device(val.collate([val.example(0, i) for i in chunk]), self.runtime.device)
            with self.runtime.autocast():
                loss_sum, _ = self.spec.objective(self.wrapped, batch)
            loss += loss_sum.float()
            targets += self.spec.objective.count(batch)
        if self.runtime.sharded:  # each forward gathers shards: every process runs as many
            for _ in range(-(-len(every) // self.runtime.world_size) - len(chunks)):
                self.padding_forward(_to_device(val.collate([val.example(0, i) for i in every[0]]), self.runtime.device))
        self.wrapped.train()
        total = self.runtime.sum(targets).item()
        return self.runtime.sum(loss).item() / total if total else None

    def padding_forward(self, batch: Batch) -> None:
        """A forward whose result is dropped: sharded evaluation runs as many forwards on every process."""
        with self.runtime.autocast():
            self.spec.objective(self.wrapped, batch)

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> LoopResult:
        """Train to max_steps, early stopping or a stop signal.

        The host reads the device (loss, grad norm, non-finite flags) only at read points: log, eval and
        save steps, the last step and a stop request. Checkpoints and metrics therefore see exactly the
        values a step-by-step read would give.
        """
        cfg, runtime, spec = self.cfg, self.runtime, self.spec
        matmul_dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
        peak = measured_peak_flops(runtime.device, matmul_dtype) * runtime.world_size if spec.flops_per_token else 0.0
        self.wrapped.train()
        patience = cfg.early_stopping_patience  # a resumed run that had stopped early trains no further, as a finished one
        stopped_early = patience is not None and self.state.evals_without_improvement >= patience
        if stopped_early and runtime.is_main:
            print(f"the run stopped early at step {self.state.step} (no validation improvement in {patience} "
                  "evaluations): nothing to train; a larger train.early_stopping_patience trains further")
        last_saved: Path | None = ckpt.latest_checkpoint(self.ckpt_root)
        window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        run_start, run_first_step = window_start, self.state.step
        try:
            with GracefulStop() as stop:
                while self.state.step < cfg.max_steps and not stopped_early:
                    tokens, flops = self._step()
                    self.state.step += 1
                    step = self.state.step
                    window_tokens += tokens
                    window_flops += flops
                    stopping = runtime.agree(stop.requested)  # every process stops after the same step
                    is_log = step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.max_steps
                    if not (is_log or step % cfg.save_every == 0 or stopping):
                        self.progress.update(step, self.shown, "", False)
                        continue
                    loss, grad_norm, metrics = self._read()
                    val_loss = None
                    if step % cfg.eval_every == 0 or step == cfg.max_steps:
                        val_loss = self.evaluate()
                        stopped_early = self._update_early_stopping(val_loss)
                    if is_log:
                        now = time.perf_counter()
                        elapsed = max(now - window_start, 1e-9)
                        stats = {"loss": loss, "lr": self.applied_lr, "tokens_per_s": window_tokens / elapsed}
                        if peak:
                            stats["mfu"] = window_flops / elapsed / peak
                        record = {**stats, "grad_norm": grad_norm, **metrics}
                        if val_loss is not None:
                            record["val_loss"] = val_loss
                            self.last_val = val_loss
                        self.metrics.log(step, record)
                        rate = (now - run_start) / max(step - run_first_step, 1)
                        self.shown = {**stats, **({"val_loss": val_loss} if val_loss is not None else {})}
                        self.progress.update(step, self.shown, format_duration(rate * (cfg.max_steps - step)), True)
                        window_start, window_tokens, window_flops = now, 0, 0.0
                    else:
                        self.progress.update(step, self.shown, "", False)
                    done = step == cfg.max_steps or stopped_early or stopping
                    if step % cfg.save_every == 0 or done:
                        last_saved = self.save(val_loss)
                    if stopping:  # (this process may not be the one that was signalled)
                        name, code = (stop.name, stop.exit_code) if stop.requested else ("another process's signal", 143)
                        raise InterruptedRun(self._resume_message(name, last_saved), code)
                    if stopped_early:
                        self.progress.print(f"early stopping at step {step}: no validation improvement in "
                                            f"{cfg.early_stopping_patience} evaluations")
                        break
        finally:
            if self.loader is not None:
                self.loader.shutdown(cancel_futures=True)
            self.progress.close()
            self.metrics.close()
        return LoopResult(self.state.step, self.last_val, self.state.best_val, last_saved, stopped_early)

    def _batches(self, step: int) -> list[Batch]:
        """The micro-batches (on the CPU) of this process for global batch `step`: a pure function of the step."""
        cfg, spec = self.cfg, self.spec
        epoch, indices = batch_indices(spec.train_set, cfg.batch_size, cfg.seed, step)
        mine = indices[self.runtime.rank * self.per_rank:(self.runtime.rank + 1) * self.per_rank]
        batches = [spec.train_set.collate([spec.train_set.example(epoch, i) for i in mine[j:j + cfg.micro_batch_size]])
                   for j in range(0, self.per_rank, cfg.micro_batch_size)]
        if self.runtime.device.type == "cuda":  # page-locked, so the copy to the GPU can overlap compute
            batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        return batches

    def _next_batches(self, step: int) -> list[Batch]:
        """Step `step`'s batches; with train.prefetch the next step's are built on a thread meanwhile."""
        if self.loader is None:
            return self._batches(step)
        ready = self.next_batches
        batches = ready[1].result() if ready is not None and ready[0] == step else self._batches(step)
        self.next_batches = (step + 1, self.loader.submit(self._batches, step + 1)) if step + 1 < self.cfg.max_steps else None
        return batches

    def _step(self) -> tuple[int, float]:
        """One optimizer step over the global batch, queued without waiting for the device; returns the tokens
        (padding included: it is computed) and model FLOPs of all processes."""
        runtime, spec = self.runtime, self.spec
        cpu_batches = self._next_batches(self.state.step)
        local_targets = sum(spec.objective.count(b) for b in cpu_batches)  # counted on the host: no sync
        micro_batches = [_to_device(b, runtime.device) for b in cpu_batches]
        total: int | torch.Tensor = local_targets
        if runtime.world_size > 1:
            total = runtime.sum(torch.tensor(float(local_targets), device=runtime.device))
        if runtime.steps_in_backward and not float(total):  # no targets anywhere: the engine would still update
            loss_sum, metric_sums, grad_norm = torch.zeros((), device=runtime.device), {}, torch.zeros((), device=runtime.device)
        else:
            loss_sum, metric_sums = accumulate(self.wrapped, spec.objective, micro_batches, runtime, total)
            grad_norm = runtime.clip_gradients(self.model, self.grad_clip)
        values = StepValues(self.state.step + 1, runtime.sum(loss_sum), total, grad_norm,
                            {k: runtime.sum(v) for k, v in metric_sums.items()})
        bad = ~(torch.isfinite(values.loss_sum) & torch.isfinite(grad_norm.float())) | (total == 0)
        self.pending.append(values)
        if self.device_skip:
            self.optimizer.found_inf = self._device_guard(bad).float()  # fused AdamW skips the update when 1
            runtime.step(self.optimizer)
        else:  # this optimizer cannot skip on the device: read the flag now (one sync per step)
            self._read()
            if not bool(bad):  # (a DeepSpeed engine has already skipped a non-finite update)
                runtime.step(self.optimizer)
        self.applied_lr = self.scheduler.get_last_lr()[0]  # this step's rate: the one logged for it
        self.scheduler.step()
        runtime.zero_grad(self.optimizer)
        tokens, flops = batch_work(cpu_batches, spec.flops_per_token)
        return tokens * runtime.world_size, flops * runtime.world_size

    def _device_guard(self, bad: torch.Tensor) -> torch.Tensor:
        """Whether to skip this update, decided on the device as `_nonfinite` will decide on the host.

        skip mode allows max_nonfinite_skips in all; past that, or at any bad step in stop mode, the run is
        halted: this and every later update until the next read are skipped, so when `_read` raises, the
        parameters are those from before the bad step.
        """
        allowed = self.cfg.max_nonfinite_skips - self.state.nonfinite_skips if self.cfg.on_nonfinite == "skip" else 0
        self.skip_count = self.skip_count + (bad & ~self.halted).long()
        self.halted = self.halted | (bad & (self.skip_count > allowed))
        return bad | self.halted

    def _read(self) -> tuple[float, float, dict[str, float]]:
        """Read the pending steps (one transfer), replay the non-finite guard on each, and return the last
        step's (loss, grad norm, metrics) as the step-by-step loop computed them."""
        if not self.pending:  # already read (optimizers without a device-side skip read every step)
            return self.last_read
        pending, self.pending = self.pending, []
        rows = torch.stack([torch.stack([torch.as_tensor(v.total, device=v.loss_sum.device).float(),
                                         v.loss_sum.float(), v.grad_norm.float()]) for v in pending]).tolist()
        self.skip_count.zero_()
        self.halted.zero_()
        for values, (total, loss_sum, grad_norm) in zip(pending, rows, strict=True):
            loss = loss_sum / max(total, 1)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)) or total == 0:
                self._nonfinite(values.step, loss, grad_norm, int(total))
        last, (total, loss_sum, grad_norm) = pending[-1], rows[-1]
        metrics = {k: v.item() / max(total, 1) for k, v in last.metric_sums.items()}
        self.last_read = (loss_sum / max(total, 1), grad_norm, metrics)
        return self.last_read

    def _nonfinite(self, step: int, loss: float, grad_norm: float, total: int) -> None:
        """Skip the update (parameters untouched) or stop, as train.on_nonfinite says."""
        if total == 0:
            what = "no trainable targets in the batch"
        else:
            bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
                   if not math.isfinite(value)]
            what = f"non-finite {' and '.join(bad)} (loss {loss}, grad norm {grad_norm})"
        last = ckpt.latest_checkpoint(self.ckpt_root)
        if self.cfg.on_nonfinite == "skip" and self.state.nonfinite_skips < self.cfg.max_nonfinite_skips:
            self.state.nonfinite_skips += 1
            self.progress.print(f"step {step}: {what}; update skipped ({self.state.nonfinite_skips}/"
                                f"{self.cfg.max_nonfinite_skips} allowed)")
            return
        fix = (f"or raise train.max_nonfinite_skips (all {self.cfg.max_nonfinite_skips} were used)"
               if self.cfg.on_nonfinite == "skip" else "or set train.on_nonfinite=skip")
        raise TrainingError(f"step {step}: {what}; parameters were left untouched. Last good checkpoint: "
                            f"{last or 'none yet'}. Lower optim.lr {fix}")

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
        if self.runtime.world_size > 1 and not any(a.startswith("launcher.num_processes=") for a in args):
            command = f"{command}\n(under the same accelerate launch / torchrun command and number of processes)"
        return f"stopped by {signal_name} at step {self.state.step}; checkpoint saved at {saved}.\nResume with: {command}"


def batch_work(batches: list[Batch], flops_per_token: Callable[[int], float] | None) -> tuple[int, float]:
    """Tokens and model FLOPs of micro-batches: each `*input_ids` tensor (B, T) counts B*T tokens at T's FLOPs
    per token, so the attention term follows each batch's padded width, not the longest allowed."""
    tokens, flops = 0, 0.0
    for batch in batches:
        for key, ids in batch.items():
            if key.endswith("input_ids"):
                tokens += ids.numel()
                flops += ids.numel() * flops_per_token(ids.shape[-1]) if flops_per_token else 0.0
    return tokens, flops


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
