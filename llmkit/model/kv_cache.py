"""A preallocated key/value cache for incremental decoding (prefill once, then one token per step)."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer keys and values, shape (n_layer, B, n_kv_head, max_len, head_dim).

    Only the kv heads are stored (grouped-query attention expands them at attention time), so a
    GQA model's cache is n_head/n_kv_head times smaller. The model writes each layer's new keys at
    `length` with `update`, then calls `advance` once after the last layer.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already stored (same for every layer between forward calls)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) after the cached ones; return all keys/values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append {k.size(2)} after {self.length}")
        if k.size(0) != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got {k.size(0)}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_head, end, head_dim)

    def advance(self, n: int) -> None:
        """Mark n more tokens as stored (called by the model after all layers wrote them)."""
        self.length += n

    def reset(self) -> None:
        """Forget the stored tokens (the buffers are reused)."""
        self.length = 0
