"""Prefix tuning and prompt tuning: trainable keys/values in front of every attention's keys/values.

Both hook into attention without touching the model file. A forward pre-hook on each `attn`
module swaps the KV-cache argument for a stand-in whose `update(layer, k, v)` stores the new keys in
the real cache (when generating) and returns them with the layer's prefix in front, and widens the
attention mask by the prefix columns (visible to every query: causal, packed documents and padded
rows alike). The KV cache itself holds only real tokens, so `generate` works unchanged.

Prompt tuning (Lester et al. 2021) prepends trainable embeddings at the input. Under causal
attention the virtual tokens' hidden states never depend on the text, so the model runs them
through the blocks alone (once per forward) and every layer's text attends to their keys/values:
exactly the prepended-input computation, but the text keeps its own positions (the full context
stays available, nothing has to be stripped from the logits, which stay (B, T, V)). The virtual
tokens sit at positions -n..-1: with RoPE this is the same relative geometry as prepending them;
with learned positions they get no position embedding (they are trained, position included).

Prefix tuning (Li & Liang 2021; P-tuning v2) learns each layer's prefix keys/values directly
(post-RoPE, as prefixes in HF's past_key_values), initialised from the keys/values of random
vocabulary tokens (the paper finds real-token initialisation more stable), or produces them with a
reparameterisation MLP over trainable embeddings. As with prompt tuning the text keeps positions 0..T-1; HF's
past_key_values, and so HF PEFT's PrefixTuning, put it at n..n+T-1: a prefix trained here does not carry over to
HF PEFT as is (logits differ by ~0.1-0.3 on the tiny models).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from llmkit.model.kv_cache import KVCache

LayerKV = list[tuple[Tensor, Tensor]]  # per layer: keys, values (1, n_kv_head, n, head_dim)


class _Recorder:
    """KV-cache stand-in for the virtual tokens' own pass: keeps every layer's keys/values."""

    def __init__(self, out: LayerKV) -> None:
        self.out = out

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.out.append((k, v))
        return k, v


class _Prefixed:
    """KV-cache stand-in inside one attention call: real cache first (if any), then the prefix in front."""

    def __init__(self, cache: KVCache | None, k: Tensor, v: Tensor) -> None:
        self.cache, self.k, self.v = cache, k, v

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.cache is not None:
            k, v = self.cache.update(layer, k, v)  # (B, Hkv, S, D)
        B = k.size(0)
        return (torch.cat((self.k.expand(B, -1, -1, -1), k), dim=2),
                torch.cat((self.v.expand(B, -1, -1, -1), v), dim=2))  # (B, Hkv, n + S, D)


def prefixed_mask(mask: Tensor | None, is_causal: bool, n: int, T: int, device: torch.device) -> Tensor | None:
    """The attention mask (B|1, 1, T, n + S) with n always-visible prefix keys in front; None if all visible."""
    if mask is None and not is_causal:
        return None
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
    visible = torch.ones(*mask.shape[:-1], n, dtype=torch.bool, device=device)
    return torch.cat((visible, mask.bool()), dim=-1)


def virtual_rope(model: nn.Module, n: int) -> tuple[Tensor, Tensor] | None:
    """RoPE cos/sin (1, 1, n, head_dim) for positions -n..-1 (cos is even, sin odd); None without RoPE."""
    if model.cfg.pos != "rope":
        return None
    idx = torch.arange(n, 0, -1, device=model.rope_cos.device)
    return model.rope_cos[idx][None, None], -model.rope_sin[idx][None, None]


class KVPrefix(nn.Module, ABC):
    """Per-layer prefix keys/values put in front of each attention's; subclasses say where they come from."""

    def __init__(self, model: nn.Module) -> None:
        """Registers the hooks on `model`, the Transformer that is to hold this module."""
        super().__init__()
        self.peft_enabled = True
        self._kv: LayerKV | None = None  # set for the duration of one model forward
        self._recording: LayerKV | None = None  # set while the virtual tokens run alone
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward, always_call=True)
        for block in model.blocks:
            block.attn.register_forward_pre_hook(self._before_attention)

    @abstractmethod
    def layer_kv(self, model: nn.Module) -> LayerKV:
        """Each layer's prefix keys and values, where the subclass gets them from."""

    @torch.no_grad()
    def record(self, model: nn.Module, x: Tensor) -> LayerKV:
        """Run virtual-token embeddings x (1, n, d) through the blocks at positions -n..-1; each layer's k, v."""
        return self._record(model, x)

    def _record(self, model: nn.Module, x: Tensor) -> LayerKV:
        n = x.size(1)
        rope = virtual_rope(model, n)
        self._recording = []
        try:
            for block in model.blocks:
                x = block(x, rope, None, n > 1, None)
            return self._recording
        finally:
            self._recording = None

    def _before_forward(self, model: nn.Module, args: tuple) -> None:
        if self.peft_enabled:
            self._kv = self.layer_kv(model)

    def _after_forward(self, model: nn.Module, args: tuple, output: Tensor) -> None:
        self._kv = None

    def _before_attention(self, attn: nn.Module, args: tuple) -> tuple | None:
        assert len(args) == 5, "Attention.forward(x, rope, mask, is_causal, cache) is called positionally"
        x, rope, mask, is_causal, cache = args
        if self._recording is not None:
            return x, rope, mask, is_causal, _Recorder(self._recording)
        if self._kv is None:
            return None
        k, v = self._kv[attn.layer]
        return x, rope, prefixed_mask(mask, is_causal, k.size(2), x.size(1), x.device), False, _Prefixed(cache, k, v)


class PrefixTuning(KVPrefix):
    """Learned prefixes: `kv` (n_layer, 2, n_kv_head, n, head_dim), or with projection an `embedding`
    (n, d_model) through `mlp` (d_model -> hidden, tanh, -> n_layer * 2 * kv_dim). New names: prefix_tuning.*"""

    def __init__(self, model: nn.Module, n: int, projection: bool, hidden: int) -> None:
        super().__init__(model)
        cfg, like = model.cfg, model.tok_emb.weight
        self.shape = (cfg.n_layer, 2, cfg.kv_heads, cfg.head_dim)
        self.projection = projection
        kw = {"device": like.device, "dtype": like.dtype}
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, cfg.d_model, **kw))  # N(0, 1), as HF's nn.Embedding
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden, **kw), nn.Tanh(),
                                     nn.Linear(hidden, cfg.n_layer * 2 * cfg.kv_heads * cfg.head_dim, **kw))
        else:
            ids = torch.randint(cfg.vocab_size, (n,), device=like.device)
            recorded = self.record(model, model.tok_emb(ids)[None])  # per layer (1, Hkv, n, D)
            kv = torch.stack([torch.stack((k[0], v[0])) for k, v in recorded])  # (L, 2, Hkv, n, D)
            self.kv = nn.Parameter(kv.contiguous())

    def layer_kv(self, model: nn.Module) -> LayerKV:
        if self.projection:
            L, two, H, D = self.shape
            kv = self.mlp(self.embedding).view(-1, L, two, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, Hkv, n, D)
        else:
            kv = self.kv
        return [(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.size(0))]


class PromptTuning(KVPrefix):
    """A soft prompt `embedding` (n, d_model) run through the frozen blocks before the text; new name
    prompt_tuning.embedding. Initialised from the embeddings of `init_ids` (n,) (plus their position
    embeddings 0..n-1 with learned positions, so it starts as that text's input)."""

    def __init__(self, model: nn.Module, init_ids: Tensor) -> None:
        super().__init__(model)
        with torch.no_grad():
            init = model.tok_emb(init_ids)  # (n, d)
            if model.pos_emb is not None:
                init = init + model.pos_emb.weight[: init_ids.numel()]
        self.embedding = nn.Parameter(init.clone())

    def layer_kv(self, model: nn.Module) -> LayerKV:
        return self._record(model, model.drop(self.embedding[None]))  # recomputed each forward (with grad)
