"""Objectives: the loss of one micro-batch, summed over its targets (the loop normalises)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.train.runtime import holds_a_shard

IGNORE = -100  # label of positions that are not trained on (prompt, padding)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over the first `vocab` columns, by row chunks.

    Only one (chunk, V) block of fp32 logits is live at a time: each chunk's gradients with respect
    to hidden and weight are made in the forward (softmax - onehot, the same matmul FLOPs as lm_head
    forward + backward) and scaled by the incoming gradient in the backward. Columns past `vocab`
    (vocabulary padding) are masked to -inf, so they are never predicted and get zero gradient.
    Rows labelled IGNORE add nothing to the loss or the gradients.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int,
                chunk: int) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            w, h_all = weight.to(dtype), hidden.to(dtype)
            loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h = torch.empty_like(h_all) if needs_grad else None
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_grad else None
            for start in range(0, h_all.size(0), chunk):
                h, y = h_all[start:start + chunk], labels[start:start + chunk]
                logits = (h @ w.t()).float()  # (chunk, V padded)
                if logits.size(1) > vocab:
                    logits[:, vocab:] = float("-inf")
                valid = y != IGNORE
                target = y.masked_fill(~valid, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                loss += torch.where(valid, lse - picked, 0.0).sum()
                if grad_h is None or grad_w is None:
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(y), device=y.device), target] -= 1.0  # d(loss sum) / d(logits)
                probs = probs.mul_(valid[:, None]).to(dtype)
                torch.mm(probs, w, out=grad_h[start:start + chunk])
                if dtype == torch.float32:
                    grad_w.addmm_(probs.t(), h)
                else:
                    grad_w += (probs.t() @ h).float()
        if grad_h is not None and grad_w is not None:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_h * grad).to(hidden_dtype), (grad_w * grad).to(weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int,
                         chunk: int = 256) -> torch.Tensor:
    """Cross-entropy summed over rows of hidden (N, d) against labels (N,), logits = hidden @ weight.T[:, :vocab]."""
    return LinearCrossEntropy.apply(hidden, weight, labels, vocab, chunk)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class CausalLM:
    """Next-token cross-entropy on `labels` (already shifted: labels[t] is the target at position t).

    Used by pretrain, sft and peft; batches may carry positions/doc_ids (packing) or an attention_mask.
    fused=True (train.fused_loss) computes the loss from the final hidden states chunk by chunk
    (`linear_cross_entropy`), never materialising the (B, T, V) logits; a wrapped lm_head (LoRA on
    lm_head) falls back to the plain path: lm_head, padded vocabulary columns set to -inf, F.cross_entropy.
    Under FSDP2 and ZeRO-3 the logits come from the model's forward (a sharded lm_head is whole only there).
    """

    def __init__(self, fused: bool = False, chunk: int = 256) -> None:
        self.fused, self.chunk = fused, chunk

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        inputs = {"positions": batch.get("positions"), "doc_ids": batch.get("doc_ids"),
                  "attention_mask": batch.get("attention_mask")}
        labels = batch["labels"].flatten()
        inner = unwrap(model)
        head, vocab = inner.lm_head, inner.cfg.vocab_size
        if holds_a_shard(head.weight):  # FSDP2, ZeRO-3: lm_head is whole only inside the forward
            logits = model(batch["input_ids"], **inputs).float()  # (B, T, V)
        else:
            hidden = model(batch["input_ids"], **inputs, return_hidden=True)  # (B, T, d)
            if self.fused and type(head) is nn.Linear:
                return linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels, vocab, self.chunk), {}
            logits = head(hidden).float()  # (B, T, V padded)
            if logits.size(-1) > vocab:  # padded ids masked in place (no sliced copy): never predicted, no gradient
                logits[..., vocab:] = float("-inf")
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE, reduction="sum")
        return loss_sum, {}
