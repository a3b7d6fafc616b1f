"""Objectives: the loss of one micro-batch, summed over its targets (the loop normalises)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that are not trained on (prompt, padding)


class CausalLM:
    """Next-token cross-entropy on `labels` (already shifted: labels[t] is the target at position t).

    Used by pretrain, sft and peft; batches may carry positions/doc_ids (packing) or an attention_mask.
    """

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"),
                       attention_mask=batch.get("attention_mask"))  # (B, T, V)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        return loss_sum, {}
