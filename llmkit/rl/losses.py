"""Losses for PPO, reward modelling and DPO/IPO, plus token log-prob helpers.

Conventions:
- Per-token tensors are (B, T) with a bool or 0/1 `mask` of valid tokens; token losses are masked
  means over valid tokens (see `llmkit.rl.advantages.masked_mean`).
- Pairwise losses (Bradley-Terry, DPO, IPO) return the SUM over pairs, so a caller accumulating
  micro-batches divides once by the total pair count. Their stats are batch means.
- Stats are detached 0-dim tensors (no device sync until the caller asks for a value).
- IPO: `dpo_loss` uses whatever sequence log-probs it is given. As in the IPO paper as implemented
  in TRL, llmkit feeds IPO per-token AVERAGED log-probs (`sequence_logprob(..., average=True)`),
  so 1/(2*beta) is a target in per-token units; sigmoid DPO uses summed log-probs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llmkit.rl.advantages import kl_per_token, masked_mean, masked_var

DPO_KINDS = ("sigmoid", "ipo")

# Upper bound on logits elements upcast to fp32 at a time (64 MiB); the vocabulary is never split.
_CHUNK_ELEMENTS = 1 << 24

Stats = dict[str, torch.Tensor]


def _chunks(B: int, T: int, V: int) -> Iterator[tuple[int, int, int, int]]:
    """(b0, b1, t0, t1) blocks of a (B, T, V) tensor with about _CHUNK_ELEMENTS elements each.

    Blocks are slices (views), so even a non-contiguous input such as logits[:, :-1] is never copied whole.
    """
    rows = max(1, _CHUNK_ELEMENTS // V)  # (b, t) positions per block
    if rows >= T:
        step_b = max(1, rows // T)
        for b in range(0, B, step_b):
            yield b, min(b + step_b, B), 0, T
    else:
        for b in range(B):
            for t in range(0, T, rows):
                yield b, b + 1, t, min(t + rows, T)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class _TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits / temperature) gathered at tokens, block by block in fp32.

    Saves only the logits (as given), the tokens and the (B, T) log-normaliser, so neither pass
    holds more than one fp32 block of (., ., V) beyond the logits and their gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        B, T, V = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=dtype, device=logits.device)  # (B, T)
        lse = torch.empty(B, T, dtype=dtype, device=logits.device)  # (B, T)
        for b0, b1, t0, t1 in _chunks(B, T, V):
            x = logits[b0:b1, t0:t1].to(dtype) / temperature  # (b, t, V)
            block_lse = torch.logsumexp(x, dim=-1)  # (b, t)
            lse[b0:b1, t0:t1] = block_lse
            out[b0:b1, t0:t1] = x.gather(-1, tokens[b0:b1, t0:t1, None]).squeeze(-1) - block_lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        temperature = ctx.temperature
        B, T, V = logits.shape
        grad = torch.empty_like(logits)
        for b0, b1, t0, t1 in _chunks(B, T, V):
            x = logits[b0:b1, t0:t1].to(lse.dtype) / temperature  # (b, t, V)
            g_out = grad_out[b0:b1, t0:t1, None].to(lse.dtype)  # (b, t, 1)
            g = torch.exp(x - lse[b0:b1, t0:t1, None]) * -g_out  # -softmax * g
            g.scatter_add_(-1, tokens[b0:b1, t0:t1, None], g_out)  # + onehot * g
            grad[b0:b1, t0:t1] = g / temperature
        return grad, None, None


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for each position: (B, T, V), (B, T) -> (B, T) fp32.

    Pass logits already aligned with the tokens they score (e.g. logits[:, :-1] with ids[:, 1:]);
    every token must be a real id (pad with one and mask later, never with -100).
    Temperature must match the one used for sampling, or PPO ratios are off from the first step.
    Computed in fp32 block by block with a hand-written backward, so memory stays near one extra
    fp32 block instead of full fp32 copies of the logits.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and tokens (B, T); got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return _TokenLogProbs.apply(logits, tokens.long(), float(temperature))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: (B, T, V) -> (B, T), in fp32.

    Computed block by block: without grad the peak is one fp32 block. Tokens with -inf logits
    (masked vocabulary) contribute 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits (B, T, V); got {tuple(logits.shape)}")
    B, T, V = logits.shape
    dtype = _compute_dtype(logits.dtype)
    out = torch.empty(B, T, dtype=dtype, device=logits.device)  # (B, T)
    for b0, b1, t0, t1 in _chunks(B, T, V):
        logp = torch.log_softmax(logits[b0:b1, t0:t1].to(dtype), dim=-1)  # (b, t, V)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        out[b0:b1, t0:t1] = -plogp.sum(dim=-1)
    return out


def sequence_logprob(logp_tokens: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-prob (B,) from token log-probs (B, T): sum over valid tokens, or their mean."""
    if average:
        return masked_mean(logp_tokens, mask, dim=-1)
    m = mask if mask.dtype == torch.bool else mask != 0
    if m.shape != logp_tokens.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match {tuple(logp_tokens.shape)}")
    return torch.where(m, logp_tokens, torch.zeros_like(logp_tokens)).sum(dim=-1)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017), masked mean over valid tokens: all (B, T).

    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))) with r = exp(logp - old_logp).
    stats: clipfrac (share of valid tokens where the clipped term binds) and approx_kl
    (k3 estimate of KL(old || new), which is >= 0).
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0; got {clip_eps}")
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(loss.dtype), mask),
            "approx_kl": masked_mean(kl_per_token(old_logp, logp, "k3"), mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2), all (B, T).

    v_clip = old_values + clip(values - old_values, -eps, eps) keeps the value head from moving
    further than eps from its rollout prediction in one update. stats: clipfrac.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0; got {clip_eps}")
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    err_unclipped = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(loss.dtype), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over valid tokens (0-dim): 1 is perfect, 0 is no
    better than a constant, negative is worse. nan when the returns have no variance (undefined)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    if bool(var_returns == 0):
        return torch.full_like(var_returns, float("nan"))
    return 1.0 - var_residual / var_returns


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    centering: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """Pairwise reward-model loss, SUMMED over pairs: -logsigmoid(r_c - r_r - margin)
    + centering * (r_c + r_r)^2 (the centring regulariser keeps rewards near zero mean).

    r_chosen, r_rejected: (N,) rewards of each pair. stats (batch means): accuracy (share of pairs
    with r_c > r_r strictly) and margin (r_c - r_r).
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ")
    if centering < 0:
        raise ValueError(f"centering must be >= 0; got {centering}")
    diff = r_chosen - r_rejected  # (N,)
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    if centering:
        losses = losses + centering * (r_chosen + r_rejected).square()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).to(diff.dtype).mean(), "margin": diff.mean()}
    return losses.sum(), stats


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, Stats]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss from sequence log-probs (N,), SUMMED.

    h = (pi_c - ref_c) - (pi_r - ref_r), the difference of chosen and rejected log-ratios.
    sigmoid: -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h) (ls: conservative DPO's
    label smoothing). ipo: (h - 1/(2 * beta))^2; pass per-token averaged log-probs (module docstring).
    RPO (Pang et al. 2024; TRL's rpo_alpha): each pair's loss gains nll_weight * chosen_nll, where
    chosen_nll (N,) is the policy's per-token mean NLL of that pair's chosen response (`response_nll`);
    as a per-pair term it is summed with the rest, so micro-batching does not change it.
    stats (batch means): rewards_chosen = beta * (pi_c - ref_c), rewards_rejected, margin = their
    difference, accuracy = share of pairs with rewards_chosen > rewards_rejected; nll when chosen_nll
    is given (logged even at nll_weight 0: it shows the chosen answers' likelihood falling).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5]; got {label_smoothing}")
    if nll_weight < 0:
        raise ValueError(f"nll_weight must be >= 0; got {nll_weight}")
    if nll_weight and chosen_nll is None:
        raise ValueError("nll_weight > 0 needs chosen_nll, the per-token mean NLL of each chosen response")
    if chosen_nll is not None and chosen_nll.shape != policy_chosen_logp.shape:
        raise ValueError(f"chosen_nll {tuple(chosen_nll.shape)} and policy_chosen_logp "
                         f"{tuple(policy_chosen_logp.shape)} differ")
    chosen_ratio = policy_chosen_logp - ref_chosen_logp  # (N,)
    rejected_ratio = policy_rejected_logp - ref_rejected_logp  # (N,)
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies only to kind='sigmoid'")
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss kind={kind!r}; expected one of {', '.join(DPO_KINDS)}")
    if nll_weight:
        losses = losses + nll_weight * chosen_nll
    with torch.no_grad():
        rewards_chosen = beta * chosen_ratio
        rewards_rejected = beta * rejected_ratio
        margin = rewards_chosen - rewards_rejected
        stats = {
            "rewards_chosen": rewards_chosen.mean(),
            "rewards_rejected": rewards_rejected.mean(),
            "margin": margin.mean(),
            "accuracy": (margin > 0).to(margin.dtype).mean(),
        }
        if chosen_nll is not None:
            stats["nll"] = chosen_nll.detach().mean()
    return losses.sum(), stats


def response_nll(logp_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean negative log-likelihood (B,) of each row's valid tokens: (B, T) log-probs and mask.

    The mean is per row (per response), not over the batch's tokens, so a pair loss that sums it over
    rows and is divided by the pair count (as the shared loop does) gives the same gradient however the
    global batch is split into micro-batches or processes. A row with no valid token scores 0.
    """
    return -sequence_logprob(logp_tokens, mask, average=True)
