"""Preallocated key/value caches for incremental decoding (prefill once, then one token per step).

`KVCache` appends at a Python-int length (any number of tokens per call); `StaticKVCache` is a view of
the same buffers for compiled decoding: it writes one token per row at a tensor column and returns the
whole buffers, so every step has the same shapes and `torch.compile` traces it once.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer keys and values, each (B, n_kv_head, max_len, head_dim), in lists k and v.

    Only the kv heads are stored (grouped-query attention expands them at attention time), so a
    GQA model's cache is n_head/n_kv_head times smaller. The model writes each layer's new keys at
    `length` with `update`, then calls `advance` once after the last layer. One tensor per layer (not
    one stacked tensor) so that a compiled step writes into each in place instead of copying them all.
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
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # tokens already stored (same for every layer between forward calls)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) after the cached ones; return all keys/values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append {k.size(2)} after {self.length}")
        if k.size(0) != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got {k.size(0)}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, n_kv_head, end, head_dim)

    def advance(self, n: int) -> None:
        """Mark n more tokens as stored (called by the model after all layers wrote them)."""
        self.length += n

    def reset(self) -> None:
        """Forget the stored tokens (the buffers are reused)."""
        self.length = 0


class StaticKVCache:
    """A KVCache's buffers seen by `Transformer.decode_step`: one new token per row at `column`.

    `update` writes at the tensor `column` (not a Python int, so a compiled step is not specialised
    to it) and returns the whole (B, n_kv_head, max_len, head_dim) buffers: slots not written yet are
    hidden by the step's attention mask. The caller moves `column` on after each step (`advance`).
    """

    def __init__(self, cache: KVCache) -> None:
        self.k, self.v = cache.k, cache.v
        self.column = torch.tensor([cache.length], device=cache.k[0].device)  # (1,) the slot the next token fills

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, 1, head_dim) at `column`; return the whole buffers."""
        self.k[layer].index_copy_(2, self.column, k)
        self.v[layer].index_copy_(2, self.column, v)
        return self.k[layer], self.v[layer]

    def advance(self) -> None:
        """The next step writes one slot further on."""
        self.column += 1
