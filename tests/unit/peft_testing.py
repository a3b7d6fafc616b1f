"""Shared helpers for the PEFT tests: tiny GPT-2 and Llama (GQA) models, a real loss, adapter noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

STYLES = ("gpt2", "llama")
METHODS = ("lora", "dora", "qlora", "adapter", "prefix", "prompt", "bitfit", "ia3")
MERGEABLE = ("lora", "dora", "qlora", "ia3", "bitfit")


def tiny_cfg(style: str, **kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32)
    if style == "llama":
        base.update(n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False)
    return ModelConfig(**{**base, **kw})


def make_base(style: str, seed: int = 0, sharpen: float = 1.0, **kw) -> Transformer:
    """A random tiny base in eval mode; sharpen > 1 scales the matrices up (varied greedy continuations)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_cfg(style, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def perturb_adapter(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Move every trainable (adapter) tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}
