"""The PPO loop (its own, not the supervised one): rollout -> KL-shaped rewards -> GAE -> K epochs of clipped updates.

One iteration: sample a response to each of `rollout.batch_size` prompts; score each response (a
reward model or a rule, minus a penalty when it never ended); compute the old, reference and value
per-token estimates; shape rewards as score-at-the-last-token minus beta * (log pi - log pi_ref) on
every token; GAE advantages (whitened over valid tokens) and returns; then `ppo.epochs` passes over
shuffled minibatches with the clipped policy loss (+ optional entropy bonus) for the policy and the
clipped value loss for the separate value model, each minibatch one optimizer step of each, its loss
a token mean over the whole minibatch however it is split into micro-batches.

All models run in eval mode (no dropout), and the old log-probs are computed in the very micro-batches
of the first epoch's first pass, so the probability ratio is exactly 1 on the first minibatch. Every
random draw comes from the saved sampling generator or from seeds derived from (seed, iteration), so a
resumed run is bit-identical on CPU to an uninterrupted one. Checkpoints: the policy as model.safetensors
(so `generate` and `evaluate` load a ppo run), the value model as value.safetensors, both optimizers,
schedules, the KL controller, the generator state and the iteration.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config.schema_align import PPOConfig
from llmkit.data.lm import ListDataset, data_fingerprint
from llmkit.errors import InterruptedRun, UserError
from llmkit.fileio import save_safetensors
from llmkit.model.heads import ScalarModel
from llmkit.rl.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    leave_one_out_advantages,
    masked_mean,
    masked_whiten,
    token_rewards,
)
from llmkit.rl.losses import entropy_from_logits, explained_variance, ppo_policy_loss, ppo_value_loss
from llmkit.rl.rewards import RewardSource
from llmkit.rl.rollout import PromptItem, Rollout, policy_forward, sample_rollout, value_forward
from llmkit.train import checkpoint as ckpt
from llmkit.train.loop import TrainingError, batch_indices
from llmkit.train.metrics import MetricsLogger, format_duration
from llmkit.train.optim import build_optimizer, build_scheduler
from llmkit.train.progress import TrainProgress
from llmkit.train.rundir import checkpoint_saved
from llmkit.train.runtime import Runtime
from llmkit.train.signals import GracefulStop

VALUE_WEIGHTS = "value.safetensors"


@dataclass
class PPOModels:
    policy: torch.nn.Module  # trained
    reference: torch.nn.Module  # frozen copy of the initial policy
    value: ScalarModel  # trained, separate trunk + value head


@dataclass
class Experience:
    """A scored rollout ready for updates; per-token tensors are (B, N), read only on the response mask
    (advantages and returns are 0 off it)."""

    rollout: Rollout
    order: Tensor  # (B,) the first epoch's row order, in whose micro-batches old_logp was computed
    old_logp: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, float]


class PPOTrainer:
    """One PPO run; `run()` drives it to train.max_steps iterations or a stop signal."""

    def __init__(self, cfg: PPOConfig, models: PPOModels, reward: RewardSource, tokenizer, prompts: list[PromptItem],
                 val_prompts: list[PromptItem], runtime: Runtime, run_dir: Path, meta: dict[str, Any],
                 files: dict[str, Path]) -> None:
        self.cfg, self.runtime, self.run_dir, self.meta, self.files = cfg, runtime, run_dir, meta, files
        self.reward, self.tokenizer = reward, tokenizer
        device = runtime.device
        self.policy = models.policy.to(device).eval()
        self.reference = models.reference.to(device).eval().requires_grad_(False)
        self.value = models.value.to(device).eval()
        self.optimizer = build_optimizer(self.policy, cfg.optim, device.type)
        self.value_optimizer = build_optimizer(self.value, cfg.value_optim, device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.max_steps, cfg.sched)
        self.value_scheduler = build_scheduler(self.value_optimizer, cfg.train.max_steps, cfg.sched)
        self.kl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                   else FixedKLController(cfg.kl.coef))
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        self.prompts = ListDataset(prompts, list)
        self.val_prompts = val_prompts
        self.data_sha256 = data_fingerprint(*(ListDataset([(p.ids, p.answer) for p in items], list)
                                              for items in (prompts, val_prompts)))
        self.eos_id = tokenizer.token_to_id(meta.get("eos_token", "<|endoftext|>"))
        pad_id = tokenizer.token_to_id(meta.get("pad_token", "<|pad|>"))
        self.pad_id = pad_id if pad_id is not None else 0
        self.iteration, self.nonfinite_skips = 0, 0
        self.ckpt_root = run_dir / "checkpoints"
        resumed = self._maybe_resume()
        self.metrics = MetricsLogger(run_dir, runtime.is_main, cfg.logger.tensorboard,
                                     resume_step=self.iteration if resumed else None)
        self.progress = TrainProgress(cfg.train.max_steps, self.iteration, runtime.is_main, cfg.logger.progress, "ppo")
        self.first_val: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    # ----- experience ---------------------------------------------------------------------------
    def _order(self, iteration: int, epoch: int) -> Tensor:
        """The row order of one epoch's minibatches, a pure function of (seed, iteration, epoch)."""
        seed = (self.cfg.train.seed * 1_000_003 + iteration) * 1_009 + epoch
        return torch.randperm(self.cfg.rollout.batch_size, generator=torch.Generator().manual_seed(seed))

    def _micro_batches(self, rows: Tensor) -> list[Tensor]:
        size = self.cfg.ppo.micro_batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def _scores(self, rollout: Rollout, answers: list[str | None]) -> tuple[Tensor, Tensor]:
        """(raw scores, scores minus the missing-eos penalty), both (B,) fp32."""
        raw = self.reward(rollout.tokens, rollout.attention_mask, rollout.texts, answers).float()
        raw = raw.to(self.runtime.device)
        return raw, raw - self.cfg.reward.missing_eos_penalty * (~rollout.ended).float()

    @torch.no_grad()
    def experience(self, iteration: int) -> Experience:
        """Sample, score and estimate one rollout batch (old log-probs, reference log-probs, values, GAE)."""
        cfg, runtime = self.cfg, self.runtime
        k = cfg.rollout.samples_per_prompt
        _, picks = batch_indices(self.prompts, cfg.rollout.batch_size // k, cfg.train.seed, iteration)
        items = [self.prompts.example(0, i) for i in picks for _ in range(k)]  # each prompt k times, adjacent
        start = time.perf_counter()
        with runtime.autocast():
            rollout = sample_rollout(self.policy, [p.ids for p in items], max_new_tokens=cfg.rollout.max_new_tokens,
                                     temperature=cfg.rollout.temperature, eos_id=self.eos_id, pad_id=self.pad_id,
                                     generator=self.generator, tokenizer=self.tokenizer)
        sampled = time.perf_counter() - start
        raw, scores = self._scores(rollout, [p.answer for p in items])
        shaped = masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool)) if cfg.reward.whiten else scores
        if cfg.reward.clip is not None:
            shaped = shaped.clamp(-cfg.reward.clip, cfg.reward.clip)
        mask, P = rollout.response_mask, rollout.prompt_len
        B, N = mask.shape
        old_logp, ref_logp, old_values, ent = (torch.zeros(B, N, device=runtime.device) for _ in range(4))
        order = self._order(iteration, 0).to(runtime.device)
        for rows in self._micro_batches(order):  # the first epoch's micro-batches: ratio exactly 1 at first
            tokens, attn = rollout.tokens[rows], rollout.attention_mask[rows]
            with runtime.autocast():
                logp, logits = policy_forward(self.policy, tokens, attn, P, cfg.rollout.temperature)
                old_logp[rows], ent[rows] = logp.float(), entropy_from_logits(logits).float()
                ref_logp[rows] = policy_forward(self.reference, tokens, attn, P, cfg.rollout.temperature)[0].float()
                old_values[rows] = value_forward(self.value, tokens, attn, P).float()
        kl = torch.where(mask, old_logp - ref_logp, torch.zeros_like(old_logp))  # (B, N) k1 per token
        rewards = token_rewards(shaped, kl, mask, self.kl.beta)
        advantages, returns = gae(rewards, old_values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.baseline == "group":  # the value model still learns the returns (logged), but no longer steers
            advantages = leave_one_out_advantages(rewards, mask, cfg.rollout.samples_per_prompt)
        if cfg.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        stats = {"reward": scores.mean().item(), "score": raw.mean().item(), "kl": kl.sum(1).mean().item(),
                 "kl_coef": self.kl.beta, "entropy": masked_mean(ent, mask).item(),
                 "response_length": mask.sum(1).float().mean().item(), "ended": rollout.ended.float().mean().item(),
                 "explained_variance": explained_variance(old_values, returns, mask).item(),
                 "rollout_tokens_per_s": mask.sum().item() / max(sampled, 1e-9)}
        return Experience(rollout, order, old_logp, old_values, advantages, returns, stats)

    # ----- updates ------------------------------------------------------------------------------
    def update(self, exp: Experience, iteration: int) -> list[dict[str, float]]:
        """ppo.epochs passes of minibatch updates; returns each minibatch's stats (token means)."""
        cfg, runtime = self.cfg, self.runtime
        rollout, mask, P = exp.rollout, exp.rollout.response_mask, exp.rollout.prompt_len
        size, out = cfg.ppo.minibatch_size, []
        train_policy = iteration >= cfg.ppo.value_warmup
        for epoch in range(cfg.ppo.epochs):
            order = exp.order if epoch == 0 else self._order(iteration, epoch).to(runtime.device)
            for first in range(0, len(order), size):
                minibatch = order[first:first + size]
                n_tokens = mask[minibatch].sum().clamp(min=1)
                sums: dict[str, Tensor] = {}
                ratio_dev = torch.zeros((), device=runtime.device)
                for rows in self._micro_batches(minibatch):
                    m = mask[rows]
                    weight = m.sum() / n_tokens  # token-mean over the minibatch, whatever the micro-batching
                    tokens, attn = rollout.tokens[rows], rollout.attention_mask[rows]
                    with torch.set_grad_enabled(train_policy), runtime.autocast():  # no graph in value warm-up
                        logp, logits = policy_forward(self.policy, tokens, attn, P, cfg.rollout.temperature)
                    logp = logp.float()
                    policy_loss, pstats = ppo_policy_loss(logp, exp.old_logp[rows], exp.advantages[rows], m,
                                                          cfg.ppo.clip_eps)
                    if cfg.ppo.entropy_coef:  # the bonus: minus the token-mean entropy of the sampling distribution
                        policy_loss = policy_loss - cfg.ppo.entropy_coef * masked_mean(entropy_from_logits(logits), m)
                    if train_policy:
                        (policy_loss * weight).backward()
                    with runtime.autocast():
                        values = value_forward(self.value, tokens, attn, P).float()
                    value_loss, vstats = ppo_value_loss(values, exp.old_values[rows], exp.returns[rows], m,
                                                        cfg.ppo.value_clip_eps)
                    (value_loss * weight).backward()
                    parts = {"policy_loss": policy_loss, "value_loss": value_loss, "clipfrac": pstats["clipfrac"],
                             "approx_kl": pstats["approx_kl"], "value_clipfrac": vstats["clipfrac"]}
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0) + value.detach() * weight
                    dev = torch.where(m, (logp.detach() - exp.old_logp[rows]).exp().sub(1).abs(), 0.0)
                    ratio_dev = torch.maximum(ratio_dev, dev.max())
                stats = {key: value.item() for key, value in sums.items()}
                stats["ratio_dev"] = ratio_dev.item()  # max |ratio - 1|: exactly 0 on the very first minibatch
                stats.update(self._step(stats, iteration, train_policy))
                out.append(stats)
        return out

    def _step(self, stats: dict[str, float], iteration: int, train_policy: bool) -> dict[str, float]:
        """Clip and apply both models' gradients (the value model's alone during ppo.value_warmup), unless
        something is non-finite (then skip or stop)."""
        norms = {}
        for name, model, clip in (("grad_norm", self.policy, self.cfg.optim.grad_clip),
                                  ("value_grad_norm", self.value, self.cfg.value_optim.grad_clip)):
            params = [p for p in model.parameters() if p.grad is not None]
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        values = [stats["policy_loss"], stats["value_loss"], *norms.values()]
        if all(torch.isfinite(torch.tensor(values))):
            if train_policy:
                self.optimizer.step()
            self.value_optimizer.step()
        else:
            self._nonfinite(iteration, values)
        self.optimizer.zero_grad(set_to_none=True)
        self.value_optimizer.zero_grad(set_to_none=True)
        return norms

    def _nonfinite(self, iteration: int, values: list[float]) -> None:
        what = f"non-finite policy/value loss or grad norm {values}"
        train = self.cfg.train
        if train.on_nonfinite == "skip" and self.nonfinite_skips < train.max_nonfinite_skips:
            self.nonfinite_skips += 1
            self.progress.print(f"iteration {iteration + 1}: {what}; update skipped ({self.nonfinite_skips}/"
                                f"{train.max_nonfinite_skips} allowed)")
            return
        last = ckpt.latest_checkpoint(self.ckpt_root)
        raise TrainingError(f"iteration {iteration + 1}: {what}; parameters were left untouched. Last good "
                            f"checkpoint: {last or 'none yet'}. Lower optim.lr or set train.on_nonfinite=skip")

    # ----- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts, answered greedily: mean reward (with the missing-eos penalty), raw score, share
        ended; and sampled at the rollout temperature (as PPO optimises; the same seed at every evaluation,
        so evaluations compare like with like and the training generator is untouched): val_sampled_reward."""
        if not self.val_prompts:
            return {}
        generator = torch.Generator(device=self.runtime.device)
        generator.manual_seed(self.cfg.train.seed + 1)

        def answer(items: list[PromptItem], temperature: float) -> tuple[Rollout, Tensor, Tensor]:
            with self.runtime.autocast():
                rollout = sample_rollout(self.policy, [p.ids for p in items], temperature=temperature,
                                         max_new_tokens=self.cfg.rollout.max_new_tokens, eos_id=self.eos_id,
                                         pad_id=self.pad_id, generator=generator, tokenizer=self.tokenizer)
            return rollout, *self._scores(rollout, [p.answer for p in items])

        size, totals = self.cfg.rollout.batch_size, torch.zeros(4)
        for first in range(0, len(self.val_prompts), size):
            items = self.val_prompts[first:first + size]
            greedy, raw, scores = answer(items, 0.0)
            sampled = answer(items, self.cfg.rollout.temperature)[2]
            totals += torch.stack([scores.sum(), raw.sum(), greedy.ended.float().sum(), sampled.sum()]).cpu()
        reward, score, ended, sampled_reward = (totals / len(self.val_prompts)).tolist()
        return {"val_reward": reward, "val_score": score, "val_ended": ended, "val_sampled_reward": sampled_reward}

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Iterate to train.max_steps; returns the last checkpoint."""
        cfg = self.cfg.train
        last_saved = ckpt.latest_checkpoint(self.ckpt_root)
        if self.iteration == 0:
            self.first_val = self.last_val = self.evaluate()
            self.metrics.log(0, self.first_val)
        run_start, first_iteration = time.perf_counter(), self.iteration
        try:
            with GracefulStop() as stop:
                while self.iteration < cfg.max_steps:
                    exp = self.experience(self.iteration)
                    start = time.perf_counter()
                    minibatches = self.update(exp, self.iteration)
                    spent = time.perf_counter() - start
                    self.kl.update(exp.stats["kl"], self.cfg.rollout.batch_size)
                    record = {**exp.stats, **{k: sum(s[k] for s in minibatches) / len(minibatches) for k in minibatches[0]},
                              "lr": self.scheduler.get_last_lr()[0],
                              "update_tokens_per_s": self.cfg.ppo.epochs * exp.rollout.attention_mask.sum().item() / spent}
                    with warnings.catch_warnings():  # value warm-up: the policy's schedule runs on without steps
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                        self.scheduler.step()
                    self.value_scheduler.step()
                    self.iteration += 1
                    step = self.iteration
                    stopping = stop.requested  # read once: a request made while this iteration prints stops the next
                    done = step == cfg.max_steps or stopping
                    if step % cfg.eval_every == 0 or step == cfg.max_steps:
                        self.last_val = self.evaluate()
                        record.update(self.last_val)
                    logged = step % cfg.log_every == 0 or done or "val_reward" in record
                    if logged:
                        self.metrics.log(step, record)
                    rate = (time.perf_counter() - run_start) / max(step - first_iteration, 1)
                    shown = {k: record[k] for k in ("reward", "kl", "entropy", "val_sampled_reward", "val_reward")
                             if k in record}
                    shown.update(rollout_ktok_s=record["rollout_tokens_per_s"] / 1000,
                                 update_ktok_s=record["update_tokens_per_s"] / 1000)
                    self.progress.update(step, shown, format_duration(rate * (cfg.max_steps - step)), logged)
                    if step % cfg.save_every == 0 or done:
                        last_saved = self.save()
                    if stopping:
                        raise InterruptedRun(self._resume_message(stop.name, last_saved), stop.exit_code)
        finally:
            self.progress.close()
            self.metrics.close()
        return last_saved

    # ----- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        tmp = ckpt.begin_checkpoint(self.ckpt_root, self.iteration)
        ckpt.write_rank_state(tmp, 0, {"sampler": self.generator.get_state(), "torch": torch.get_rng_state()})
        save_safetensors(ckpt.unique_tensors(self.value.state_dict()), tmp / VALUE_WEIGHTS)
        state = {"optimizer": self.optimizer.state_dict(), "value_optimizer": self.value_optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "value_scheduler": self.value_scheduler.state_dict(),
                 "kl": self.kl.state_dict(), "loop": {"iteration": self.iteration, "nonfinite_skips": self.nonfinite_skips}}
        final = ckpt.finish_checkpoint(self.ckpt_root, tmp, self.iteration, self.policy.state_dict(), state,
                                       {**self.meta, **self.last_val, "data_sha256": self.data_sha256}, self.files)
        checkpoint_saved(self.run_dir, "ppo")
        ckpt.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last, None)
        return final

    def _maybe_resume(self) -> bool:
        resume = self.cfg.train.resume
        if resume == "never":
            return False
        source = ckpt.latest_checkpoint(self.ckpt_root) if resume == "auto" else ckpt.resolve_checkpoint(resume)
        if source is None:
            return False
        ckpt.refuse_other_data(source, self.data_sha256)
        ckpt.load_weights(self.policy, ckpt.read_tensors(source / ckpt.WEIGHTS), source)
        ckpt.load_weights(self.value, ckpt.read_tensors(source / VALUE_WEIGHTS), source)
        state = ckpt.load_train_state(source / "state.pt")
        rng = ckpt.load_train_state(source / "rng_0.pt")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.value_scheduler.load_state_dict(state["value_scheduler"])
            self.kl.load_state_dict(state["kl"])
            self.generator.set_state(rng["sampler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"{source} does not match this ppo run ({error}); resume from a checkpoint of this run "
                            "or start over with train.overwrite=true") from None
        torch.set_rng_state(rng["torch"])
        self.iteration, self.nonfinite_skips = state["loop"]["iteration"], state["loop"]["nonfinite_skips"]
        if self.runtime.is_main:
            print(f"resumed from {source} at iteration {self.iteration}")
        return True

    def _resume_message(self, signal_name: str, saved: Path | None) -> str:
        args = [a for a in sys.argv[1:] if not a.startswith(("out_dir=", "train.resume="))]
        command = shlex.join(["llmkit", *args, f"out_dir={self.run_dir}", "train.resume=auto"])
        return f"stopped by {signal_name} at iteration {self.iteration}; checkpoint saved at {saved}.\nResume with: {command}"
