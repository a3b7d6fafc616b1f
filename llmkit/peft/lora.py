"""LoRA, rsLoRA and DoRA linear layers that keep the base layer's `weight`/`bias` names.

The base weight is never modified: merging is done out of place (`merged_weight`, used by
`llmkit.peft.apply.merge_adapter` to build a plain Transformer), so "unmerging" is simply dropping
the merged copy and the base stays bit-exact by construction. B is zero-initialised, so a freshly
wrapped layer computes exactly what the base layer did.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRAMixin:
    """The low-rank update shared by LoRALinear, DoRALinear and QLoRALinear: scale * B A dropout(x).

    lora_a: (rank, in) kaiming-uniform, lora_b: (out, rank) zeros; scale = alpha / rank, or
    alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023: keeps the update's size stable as rank grows).
    `peft_enabled` False turns the update off (see `disable_adapters`).
    """

    lora_a: nn.Parameter
    lora_b: nn.Parameter

    def _init_lora(self, in_features: int, out_features: int, like: Tensor, rank: int, alpha: float,
                   dropout: float, rslora: bool) -> None:
        kw = {"device": like.device, "dtype": like.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **kw))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's default (and HF PEFT)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))  # (out, r): step 0 equals the base
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.peft_enabled = True

    def lora_delta(self, x: Tensor) -> Tensor:
        """The update's output (..., out) for input x (..., in); dropout applies to this path only."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scale

    def delta_weight(self) -> Tensor:
        """The update as a dense matrix (out, in): scale * B @ A."""
        return (self.lora_b @ self.lora_a) * self.scale


class LoRALinear(LoRAMixin, nn.Linear):
    """y = x W^T + b + scale * B A x, sharing (not copying) the base layer's weight and bias Parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's tensors are reused, nothing is allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self._init_lora(self.in_features, self.out_features, base.weight, rank, alpha, dropout, rslora)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.lora_delta(x) if self.peft_enabled else y

    def merged_weight(self) -> Tensor:
        """W + scale * B A (out, in): the weight of an equivalent plain nn.Linear (a new tensor)."""
        return self.weight + self.delta_weight()


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): W' = m * (W + scale B A) / ||W + scale B A||, norms per output row.

    `magnitude` (out,) starts at the row norms of W (the paper's column norms, in its (in, out)
    layout), so step 0 equals the base. As the paper recommends, the norm is treated as a constant
    in the backward pass (detached): much less memory, same quality. With LoRA dropout the base path
    sees x and the low-rank path dropout(x): y = m/||W + sBA|| * (W x + s B A dropout(x)) + b. (HF PEFT's
    training-mode form differs: its base correction (m/||.|| - 1) W also sees dropout(x). In eval mode, and with
    dropout 0 as by default, the two are the same.)
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout, rslora)
        self.magnitude = nn.Parameter(self.weight.detach().norm(dim=1))  # (out,)

    def _norm_scale(self) -> Tensor:
        """m / ||W + scale B A|| per output row (out,), the norm detached. A row that is all zero (the padded
        vocabulary rows of an lm_head) divides by 1: its output is 0 at any scale, and 0/0 would spread NaN."""
        norm = (self.weight + self.delta_weight()).norm(dim=1).detach()
        return self.magnitude / torch.where(norm == 0, torch.ones_like(norm), norm)

    def forward(self, x: Tensor) -> Tensor:
        if not self.peft_enabled:
            return F.linear(x, self.weight, self.bias)
        y = self._norm_scale() * (F.linear(x, self.weight) + self.lora_delta(x))  # (..., out)
        return y + self.bias if self.bias is not None else y

    def merged_weight(self) -> Tensor:
        return self._norm_scale()[:, None] * (self.weight + self.delta_weight())
