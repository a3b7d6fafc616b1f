"""Held-out loss, perplexity and bits per byte of a causal language model."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def bytes_per_token_id(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (byte-level BPE: one vocab character per byte; special tokens 0)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.get_added_tokens_decoder())
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index not in special:
            table[index] = len(token)
    return table


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, byte_table: np.ndarray,
                max_batches: int | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Loss per token (nats), perplexity and bits per byte over non-overlapping windows of `tokens`."""
    windows = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    total_loss, total_tokens, total_bytes = 0.0, 0, 0
    model.eval()
    for start in range(0, windows, batch_size):
        rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64)
                for i in range(start, min(start + batch_size, windows))]
        block = torch.from_numpy(np.stack(rows)).to(device)  # (B, T + 1)
        logits = model(block[:, :-1])
        total_loss += F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten(), reduction="sum").item()
        total_tokens += block[:, 1:].numel()
        total_bytes += int(byte_table[block[:, 1:].cpu().numpy()].sum())
    if total_tokens == 0:
        return {"tokens": 0, "loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.nan}
    loss = total_loss / total_tokens
    return {"tokens": total_tokens, "bytes": total_bytes, "loss": loss, "perplexity": math.exp(min(loss, 50)),
            "bits_per_byte": total_loss / math.log(2) / max(total_bytes, 1)}
