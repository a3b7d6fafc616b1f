"""Rewards: learned from preference pairs (reward model, DPO's implicit reward) and served to PPO.

Pair objectives plug into the shared loop (`llmkit.train.loop`): `count` is the number of pairs in
a micro-batch and the loss is summed over pairs, so accumulation normalises by all pairs of the
global batch. In evaluation they also collect the rewards of each side, which `PairTrainer` turns
into held-out accuracy and reward statistics logged next to val_loss.

PPO's reward sources score finished rollouts: a trained reward model (the score at the last real
token, i.e. the response's eos) or a rule (exact match with the known answer).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from llmkit.config.schema_align import RewardSourceConfig
from llmkit.data.tinyworld import score_exact
from llmkit.errors import UserError
from llmkit.model.heads import last_token_values, load_scalar_model
from llmkit.rl.losses import (
    bradley_terry_loss,
    dpo_loss,
    logprobs_from_logits,
    response_nll,
    sequence_logprob,
)
from llmkit.train.loop import Trainer
from llmkit.train.objectives import unwrap

Batch = dict[str, Tensor]
SUMS = ("pairs", "correct", "chosen", "chosen_sq", "rejected", "rejected_sq")


# ---------------------------------------------------------------- learning from pairs


class PairObjective(ABC):
    """A loss over (chosen, rejected) rewards; in eval mode it also sums those rewards into `collected`."""

    held_out_means: tuple[str, ...] = ()  # stats whose held-out mean over pairs is logged as val_<name>

    def __init__(self) -> None:
        self.collected: dict[str, Tensor] | None = None  # set by PairTrainer.evaluate

    def count(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    @abstractmethod
    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """(loss summed over pairs, batch-mean stats, chosen rewards (N,), rejected rewards (N,))."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss_sum, stats, chosen, rejected = self.compute(model, batch)
        n = chosen.numel()
        if self.collected is not None and not unwrap(model).training:  # (a DeepSpeed engine keeps training=True)
            chosen, rejected = chosen.detach().float(), rejected.detach().float()
            for key, value in zip(SUMS, (torch.tensor(float(n)), (chosen > rejected).sum(), chosen.sum(),
                                         chosen.square().sum(), rejected.sum(), rejected.square().sum()), strict=True):
                self.collected[key] = self.collected[key] + value.to(self.collected[key].device)
            for key in self.held_out_means:
                self.collected[key] = self.collected[key] + stats[key].detach().float() * n
        return loss_sum, {key: value * n for key, value in stats.items()}  # the loop divides by the pair count


def held_out_stats(sums: dict[str, float], means: tuple[str, ...] = ()) -> dict[str, float]:
    """val_accuracy, val_margin and mean/std of each side's rewards from summed rewards; val_<name> for each of
    `means` (summed over pairs)."""
    n = sums.get("pairs", 0.0)
    if not n:
        return {}
    out = {"val_accuracy": sums["correct"] / n, "val_margin": (sums["chosen"] - sums["rejected"]) / n}
    out.update({f"val_{key}": sums[key] / n for key in means})
    for side in ("chosen", "rejected"):
        mean = sums[side] / n
        out[f"val_{side}_mean"] = mean
        out[f"val_{side}_std"] = math.sqrt(max(sums[f"{side}_sq"] / n - mean * mean, 0.0))
    return out


class PairTrainer(Trainer):
    """The shared loop; each evaluation also reports held-out pair accuracy and reward statistics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_stats: dict[str, float] = {}
        self.metrics = _WithHeldOut(self.metrics, self)

    def evaluate(self) -> float | None:
        objective = self.spec.objective
        objective.collected = {key: torch.zeros((), device=self.runtime.device)
                               for key in (*SUMS, *objective.held_out_means)}
        try:
            val_loss = super().evaluate()
            sums = {key: self.runtime.sum(value).item() for key, value in objective.collected.items()}
        finally:
            objective.collected = None
        self.val_stats = held_out_stats(sums, objective.held_out_means)
        return val_loss

    def padding_forward(self, batch: Batch) -> None:
        """Its pairs are another process's: not collected."""
        collected, self.spec.objective.collected = self.spec.objective.collected, None
        try:
            super().padding_forward(batch)
        finally:
            self.spec.objective.collected = collected


@torch.no_grad()
def accuracy_by_family(objective: PairObjective, model: torch.nn.Module, groups: dict[str, list],
                       collate: Callable[[list], Batch], device: torch.device,
                       batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Held-out pair accuracy of each family: ``{family: {"accuracy", "pairs"}}`` from tokenised pairs per family."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for family, examples in groups.items():
            correct = 0
            for first in range(0, len(examples), batch_size):
                batch = collate(examples[first:first + batch_size])
                _, _, chosen, rejected = objective.compute(model, {k: v.to(device) for k, v in batch.items()})
                correct += int((chosen > rejected).sum())
            out[family] = {"accuracy": correct / len(examples), "pairs": len(examples)}
    finally:
        model.train(was_training)
    return out


class _WithHeldOut:
    """Adds the trainer's latest held-out statistics to every record that carries a val_loss."""

    def __init__(self, inner: Any, trainer: PairTrainer) -> None:
        self.inner, self.trainer = inner, trainer

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.inner.log(step, {**record, **self.trainer.val_stats} if "val_loss" in record else record)

    def close(self) -> None:
        self.inner.close()


class BradleyTerryObjective(PairObjective):
    """Reward-model loss: the scalar head read at each sequence's last real token (its closing eos)."""

    def __init__(self, margin: float, centering: float) -> None:
        super().__init__()
        self.margin, self.centering = margin, centering

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        mask = batch["attention_mask"]
        rewards = last_token_values(model(batch["input_ids"], mask), mask)  # (2N,)
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        loss, stats = bradley_terry_loss(chosen, rejected, self.margin or None, self.centering)
        stats.update(reward_chosen=chosen.detach().mean(), reward_rejected=rejected.detach().mean())
        return loss, stats, chosen, rejected


def response_token_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Token log-probs (B, T-1) of each row given what precedes it, and the mask (B, T-1) of response tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(ids, attention_mask=mask)  # (B, T, V)
    return logprobs_from_logits(logits[:, :-1], ids[:, 1:]), batch["response_mask"][:, 1:]


def response_logprobs(model: torch.nn.Module, batch: Batch, average: bool) -> Tensor:
    """Log-prob (B,) of each row's response tokens given what precedes them (summed, or averaged per token)."""
    token_logp, response = response_token_logprobs(model, batch)
    return sequence_logprob(token_logp, response, average=average)


class DPOObjective(PairObjective):
    """DPO / IPO against a frozen reference whose log-probs are computed here, without gradient.

    nll_weight > 0 adds RPO's term: nll_weight times the policy's per-token mean NLL of each pair's chosen
    response (response tokens only, never the prompt), per pair like the DPO loss, so the loop's division
    by the pair count makes it a mean over pairs, the same under any micro-batching. `nll` is always logged,
    and its held-out mean as `val_nll` (falling chosen likelihood is DPO's known failure, which RPO's term counters).
    """

    held_out_means = ("nll",)

    def __init__(self, reference: torch.nn.Module, kind: str, beta: float, label_smoothing: float,
                 nll_weight: float = 0.0) -> None:
        super().__init__()
        self.reference = reference.eval().requires_grad_(False)
        self.kind, self.beta, self.label_smoothing, self.nll_weight = kind, beta, label_smoothing, nll_weight

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        average = self.kind == "ipo"  # IPO's target is in per-token units (llmkit.rl.losses)
        token_logp, response = response_token_logprobs(model, batch)  # (2N, T-1)
        policy = sequence_logprob(token_logp, response, average=average)  # (2N,)
        with torch.no_grad():
            reference = response_logprobs(self.reference, batch, average)  # (2N,)
        n = policy.shape[0] // 2
        chosen_nll = response_nll(token_logp[:n], response[:n])  # (N,), the chosen rows
        if not self.nll_weight:
            chosen_nll = chosen_nll.detach()  # logged only
        loss, stats = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.kind,
                               self.label_smoothing, chosen_nll, self.nll_weight)
        ratios = (policy - reference).detach() * self.beta  # implicit rewards
        return loss, stats, ratios[:n], ratios[n:]


# ---------------------------------------------------------------- scoring PPO rollouts


class RewardSource(Protocol):
    name: str

    def __call__(self, tokens: Tensor, attention_mask: Tensor, texts: list[str], answers: list[str | None]) -> Tensor:
        """Scores (B,) of finished rollouts: ids and mask (B, T) of prompt + response, response texts, known answers."""


class ModelReward:
    """A trained reward model's score at each sequence's last real token."""

    def __init__(self, model: torch.nn.Module, checkpoint: Path) -> None:
        self.model, self.checkpoint = model.eval().requires_grad_(False), checkpoint
        self.name = f"reward model {checkpoint}"

    @torch.no_grad()
    def __call__(self, tokens: Tensor, attention_mask: Tensor, texts: list[str], answers: list[str | None]) -> Tensor:
        return self.model.score(tokens, attention_mask)


class ExactMatchReward:
    """1 when the response's first line equals the known answer (whitespace normalised), else 0."""

    name = "exact_match"
    needs_answers = True  # every prompt, training and held out, must come with its answer (checked at load)

    def __call__(self, tokens: Tensor, attention_mask: Tensor, texts: list[str], answers: list[str | None]) -> Tensor:
        if any(a is None for a in answers):
            raise UserError("reward.rule=exact_match needs a known answer for every prompt (data.answer_field); "
                            "or use a trained reward model: reward.model=<a `llmkit reward` run>")
        return torch.tensor([float(score_exact(t, a)) for t, a in zip(texts, answers, strict=True)])


def build_reward_source(cfg: RewardSourceConfig, tokenizer, device: torch.device) -> RewardSource:
    """The reward model named by reward.model (same tokenizer as the policy required), else the rule."""
    if cfg.model is None:
        return ExactMatchReward()
    from llmkit.tokenizer.bpe import load_tokenizer

    model, _, checkpoint = load_scalar_model(cfg.model, "reward")
    if load_tokenizer(checkpoint / "tokenizer.json").get_vocab() != tokenizer.get_vocab():
        raise UserError(f"reward.model={cfg.model} uses a different tokenizer than the policy; train the reward "
                        "model from the same SFT run (llmkit reward init_from=<it>)")
    return ModelReward(model.to(device), checkpoint)
