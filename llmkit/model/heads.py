"""A scalar head on the Transformer trunk: a reward model (read at the last real token) or a value model (every token).

Both are `ScalarModel(trunk)`: the trunk's final-normed hidden states (B, T, d) go through one
Linear(d, 1). Checkpoint tensors are the trunk's under `trunk.` plus `head.weight` / `head.bias`;
a reward checkpoint's meta.json says `kind: reward`, so `load_scalar_model` refuses anything else.
Positions come from the attention mask, so left padding (PPO rollouts) and right padding (pairs)
both compute what each row would alone.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit.errors import UserError
from llmkit.generate import positions_from_mask
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train import checkpoint as ckpt


class ScalarModel(nn.Module):
    """Transformer trunk + Linear(d_model, 1): one scalar per token."""

    def __init__(self, trunk: Transformer) -> None:
        super().__init__()
        self.trunk = trunk
        self.cfg = trunk.cfg
        self.head = nn.Linear(trunk.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(trunk.cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores (B, T) in fp32 for ids (B, T) with attention_mask (B, T) (1 = real token, any padding side)."""
        hidden = self.trunk(input_ids, positions=positions_from_mask(attention_mask), attention_mask=attention_mask,
                            return_hidden=True)  # (B, T, d)
        return self.head(hidden).squeeze(-1).float()

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """One reward per row (B,): the score at the row's last real token."""
        return last_token_values(self(input_ids, attention_mask), attention_mask)


def last_token_values(values: Tensor, attention_mask: Tensor) -> Tensor:
    """values (B, T) read at each row's last position where attention_mask is 1 -> (B,)."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)  # (B,)
    if bool((last < 0).any()):
        raise ValueError("every row needs at least one real token to read a score at")
    return values.gather(1, last[:, None]).squeeze(1)


def load_scalar_model(path: str, kind: str = "reward") -> tuple[ScalarModel, dict, Path]:
    """(model in eval mode, meta, checkpoint path) of a `llmkit reward` run or checkpoint."""
    checkpoint = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    if meta.get("kind") != kind:
        raise UserError(f"{checkpoint} is not a {kind} model: `llmkit {meta.get('command', '?')}` wrote it; pass a run "
                        f"of `llmkit {kind}`")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ScalarModel(Transformer(ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})))
    ckpt.load_weights(model, ckpt.read_tensors(checkpoint / ckpt.WEIGHTS), checkpoint)
    return model.eval(), meta, checkpoint
