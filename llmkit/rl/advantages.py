"""Advantage and reward math for PPO on token sequences: masked statistics, GAE, per-token KL,
KL-shaped rewards and the KL coefficient controllers.

Conventions (shared with `llmkit.rl.losses`):
- Tensors are (B, T); `mask` is bool or 0/1 and marks the valid response tokens of each row.
- Padding positions may hold anything (even inf/nan): they are never read, and outputs hold 0 there.
- Masked statistics over no valid token are 0 (never nan), so an empty micro-batch cannot poison a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

KL_KINDS = ("k1", "k2", "k3")


def _bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool, checked to have x's shape (a broadcast mask is almost always a bug here)."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(x.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is true (all of them, or along `dim`); 0 where none is."""
    m = _bool_mask(x, mask)
    total = torch.where(m, x, torch.zeros_like(x)).sum(dim=dim)
    count = m.sum(dim=dim).clamp(min=1)
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all valid positions (0-dim).

    unbiased applies Bessel's correction n/(n-1); with fewer than two valid tokens the spread is
    unobserved and the result is 0 rather than nan.
    """
    m = _bool_mask(x, mask)
    centered = torch.where(m, x - masked_mean(x, m), torch.zeros_like(x))
    var = masked_mean(centered.square(), m)
    if unbiased:
        n = m.sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise x to mean 0 and (unbiased) variance 1 over valid positions; padding stays 0.

    shift_mean=False adds the mean back, so only the scale changes (as for rewards in some PPO setups).
    """
    m = _bool_mask(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), both (B, T).

    Each row's valid tokens must form one contiguous run (right-padded responses; masked prompt
    tokens in front are fine). The value after the last valid token is 0: the episode ends there.
    Advantages and returns are targets, so they are computed without gradient, in at least fp32,
    and are 0 on padding. returns = advantages + values.
    """
    if rewards.dim() != 2 or values.shape != rewards.shape:
        raise ValueError(
            f"rewards and values must both be (B, T); got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1]; got gamma={gamma}, lam={lam}")
    m = _bool_mask(values, mask)  # (B, T)
    starts = m[:, 0].long() + (m[:, 1:] & ~m[:, :-1]).sum(dim=1)  # (B,) runs of valid tokens per row
    if bool((starts > 1).any()):
        raise ValueError("gae: the mask must mark one contiguous run of valid tokens per row")

    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(m, rewards.to(dtype), zero)  # (B, T)
    v = torch.where(m, values.to(dtype), zero)  # (B, T)
    valid = m.to(dtype)  # (B, T)

    B, T = v.shape
    advantages = torch.zeros_like(v)  # (B, T)
    next_value = torch.zeros(B, dtype=dtype, device=v.device)  # (B,) V(s_{t+1}); 0 past the end
    next_adv = torch.zeros(B, dtype=dtype, device=v.device)  # (B,) A_{t+1}; 0 past the end
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        next_adv = (delta + gamma * lam * next_adv) * valid[:, t]
        advantages[:, t] = next_adv
        next_value = v[:, t]  # already 0 on padding
    returns = advantages + v
    return advantages, returns


@torch.no_grad()
def leave_one_out_advantages(rewards: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """Sequence-level advantages with a leave-one-out group baseline (RLOO, Ahmadian et al. 2024) -> (B, T).

    Rows come in groups of `group` adjacent responses to the same prompt. Each response's return is
    the sum of its per-token rewards (score and KL penalty); its advantage, on every valid token, is that
    return minus the mean return of the other responses to the same prompt. 0 on padding.
    """
    if group < 2 or rewards.size(0) % group:
        raise ValueError(f"a leave-one-out baseline needs groups of >= 2 rows dividing the batch; got group={group} "
                         f"for {rewards.size(0)} rows")
    m = _bool_mask(rewards, mask)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    returns = torch.where(m, rewards.to(dtype), torch.zeros((), dtype=dtype)).sum(1).view(-1, group)  # (G, k)
    baseline = (returns.sum(1, keepdim=True) - returns) / (group - 1)  # (G, k) mean of the others
    advantage = (returns - baseline).reshape(-1, 1)  # (B, 1)
    return torch.where(m, advantage, torch.zeros((), dtype=dtype))


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    k1 = logp - ref_logp (unbiased, can be negative); k2 = 0.5 * (logp - ref_logp)^2;
    k3 = (r - 1) - log r with r = exp(ref_logp - logp) (Schulman's unbiased, non-negative estimator).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r  # (r - 1) - log r, accurate near r = 1
    raise ValueError(f"unknown KL estimator kind={kind!r}; expected one of {', '.join(KL_KINDS)}")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token PPO rewards (B, T): -beta * kl on every valid token, plus the sequence score (B,)
    on the last valid token of each row; 0 on padding.

    Every row needs at least one valid token, or its score would be lost (ValueError).
    """
    if kl.dim() != 2:
        raise ValueError(f"kl must be (B, T); got {tuple(kl.shape)}")
    m = _bool_mask(kl, mask)  # (B, T)
    B, T = kl.shape
    score = score.reshape(-1)
    if score.numel() != B:
        raise ValueError(f"score must hold one value per row ({B}); got shape {tuple(score.shape)}")
    positions = torch.arange(T, device=kl.device).expand(B, T)  # (B, T)
    last = torch.where(m, positions, -1).amax(dim=1)  # (B,)
    if bool((last < 0).any()):
        raise ValueError("token_rewards: every row needs at least one valid token to carry its score")
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(m, -beta * kl, zero)  # (B, T)
    at_last = positions == last[:, None]  # (B, T)
    return rewards + torch.where(at_last, score[:, None].to(rewards.dtype), zero)


class KLController(ABC):
    """Holds the KL coefficient beta; subclasses decide how `update` moves it."""

    kind = "base"

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"KL coefficient must be >= 0; got {beta}")
        self.beta = float(beta)

    @abstractmethod
    def update(self, current_kl: float, n_steps: int) -> float:
        """Take the KL measured over the last n_steps samples; returns the (new) beta."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"cannot load a {state.get('kind')!r} KL controller state into a {self.kind!r} one"
            )
        self.beta = float(state["beta"])


class FixedKLController(KLController):
    """A constant KL coefficient."""

    kind = "fixed"

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns beta."""
        return self.beta


class AdaptiveKLController(KLController):
    """Adaptive KL coefficient of Ziegler et al. 2019: steer the observed KL towards `target`.

    err = clip(kl / target - 1, -0.2, 0.2); beta *= 1 + err * n_steps / horizon.
    target and horizon come from the config; only beta is state (a Python float, so resume is exact).
    """

    kind = "adaptive"

    def __init__(self, init_beta: float, target: float, horizon: float):
        super().__init__(init_beta)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0; got target={target}, horizon={horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update beta from the KL measured over the last n_steps samples; returns the new beta."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0; got {n_steps}")
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + err * n_steps / self.horizon
        return self.beta
