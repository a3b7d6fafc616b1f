"""One readable decoder-only Transformer, GPT-2 style or Llama style through `ModelConfig` switches.

GPT-2 style: LayerNorm, learned positions, GELU MLP (tanh approximation, as GPT-2), tied embeddings,
biases. Llama style: RMSNorm, rotary positions (HF Llama's rotate_half convention, so HF weights map
without permutation), SwiGLU MLP, grouped-query attention (n_kv_head < n_head), untied or tied. Qwen2 style:
Llama style with biases on q, k and v only (qkv_bias=true, bias=false).

Module names are a contract (PEFT swaps nn.Linear modules by name, checkpoints are keyed by them):
tok_emb, pos_emb, drop, blocks.{i}.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm, mlp.{gate,up,down}_proj},
norm, lm_head. The model returns logits; losses are computed by the callers.

Vocabulary padding: tok_emb and lm_head have cfg.padded_vocab rows (vocab_size rounded up to
model.pad_vocab_multiple, for matmul-friendly shapes). The extra rows start at zero and stay zero;
logits are sliced to vocab_size, so padded ids are never predicted, and state_dict() holds only the
vocab_size real rows (loading pads them back), so checkpoints and HF weight maps never see padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.kv_cache import KVCache, StaticKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction), as Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """The rotary frequencies (head_dim/2,) of theta, stretched as model.rope_scaling says (HF's rope types)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if cfg.rope_scaling == "linear":  # positions / factor
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":  # long wavelengths stretched, short ones kept, a smooth blend between
        wavelen = 2 * math.pi / inv_freq
        original, low, high = cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        stretched = torch.where(wavelen > original / low, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * stretched / cfg.rope_factor + smooth * stretched
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, stretched)
    return inv_freq


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin (block_size, head_dim), each frequency repeated over the two halves (HF Llama layout)."""
    inv_freq = rope_frequencies(cfg)
    freqs = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by position: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per row, q (B, H, 1, D), over k, v (B, Hkv, S, D) where mask (B, 1, 1, S) is True.

    Plain matmul-softmax-matmul rather than SDPA: for a single query torch.compile fuses it into a few
    loops, where SDPA's kernel costs more than the arithmetic (decode_step). Query heads are grouped by
    their kv head as SDPA's enable_gqa does (query head h reads kv head h // (H / Hkv)).
    """
    B, H, _, D = q.shape
    Hkv = k.size(1)
    q = q.reshape(B, Hkv, H // Hkv, D)
    scores = (q @ k.transpose(-1, -2)).float() * D**-0.5  # (B, Hkv, H/Hkv, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).reshape(B, H, 1, D)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_head * self.head_dim, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | StaticKVCache | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D), S = cached + T (static: max_len)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(cache, StaticKVCache):  # decode_step: one query per row, mask given
            y = attend_one(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, D)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)
        return F.dropout(y, dropout_p, training=True) if dropout_p else y


class MLP(nn.Module):
    """GELU MLP (up, gelu, down) or SwiGLU (silu(gate) * up, down)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.dropout = cfg.dropout
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        y = self.down_proj(h)
        return F.dropout(y, self.dropout, training=True) if self.training and self.dropout else y


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | StaticKVCache | None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model: tokens (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False  # train.activation_checkpointing: recompute blocks in backward
        if cfg.pos == "rope":
            # Non-persistent: rebuilt from the config, so checkpoints hold only learned weights.
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.padded_vocab != cfg.vocab_size:
            self.register_state_dict_post_hook(_unpad_vocab)
            self.register_load_state_dict_pre_hook(_pad_vocab)
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) weights, zero biases, unit norms; residual outputs scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)
        with torch.no_grad():  # padded vocabulary rows: zero forever (never looked up, zero gradient)
            self.tok_emb.weight[self.cfg.vocab_size:].zero_()
            self.lm_head.weight[self.cfg.vocab_size:].zero_()

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (default block_size)."""
        cfg = self.cfg
        max_len = cfg.block_size if max_len is None else min(max_len, cfg.block_size)
        weight = self.tok_emb.weight
        return KVCache(
            cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim,
            device=device or weight.device, dtype=dtype or weight.dtype,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding=True gives the N of FLOPs/token = 6N + 12LTd:
        it drops the position embedding and, when untied, the input embedding (lookups, not matmuls);
        a tied embedding stays counted since it is the lm_head matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits (B, T, V), or the final-normed hidden states (B, T, d) when return_hidden.

        tokens: (B, T) ids. positions: (B, T) position ids (default arange after the cached tokens);
        packing and left padding restart them. doc_ids: (B, T) packed-document ids; attention stays
        causal and within one document (not with a cache). attention_mask: (B, cached + T), 1 = real
        token, 0 = padding key; never read on the host (None, not all ones, gives SDPA's causal fast path).
        cache: a KVCache from new_cache, appended to and advanced by T.
        """
        B, T = tokens.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.block_size:
            what = f"{past} cached + {T} new tokens" if past else f"sequence of {T} tokens"
            raise UserError(f"{what} is longer than the model's context model.block_size={self.cfg.block_size}")
        if positions is None:
            positions = torch.arange(past, past + T, device=tokens.device).unsqueeze(0)  # (1, T)
        x, rope = self._embed(tokens, positions)
        mask = self._attention_mask(B, T, past, doc_ids, attention_mask, tokens.device)
        is_causal = mask is None and past == 0 and T > 1  # SDPA fast path; one new token after a cache needs none
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, is_causal, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    def decode_step(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, cache: StaticKVCache) -> Tensor:
        """Last-position logits (B, V) for one new token per row, tokens and positions (B, 1).

        The token's keys go to slot `cache.column`; it attends over every slot where attention_mask
        (B, max_len) is non-zero, the new slot included. All shapes stay the same from step to step, so
        `torch.compile` traces this once (`generate(compile=True)`). The same blocks as forward.
        """
        x, rope = self._embed(tokens, positions)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, max_len)
        for block in self.blocks:
            x = block(x, rope, mask, False, cache)
        return self.logits(self.norm(x)[:, -1])

    def _embed(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token (+ learned position) embeddings (B, T, d) after dropout, and RoPE's cos/sin (B|1, 1, T, D) or None."""
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        rope = None
        if self.cfg.pos == "rope":
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        return self.drop(x), rope

    def logits(self, hidden: Tensor) -> Tensor:
        """lm_head over hidden states (..., d) -> (..., vocab_size): padded vocabulary columns sliced off."""
        logits = self.lm_head(hidden)
        return logits[..., : self.cfg.vocab_size] if logits.size(-1) != self.cfg.vocab_size else logits

    @staticmethod
    def _attention_mask(
        B: int, T: int, past: int, doc_ids: Tensor | None, attention_mask: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """Boolean mask (B|1, 1, T, past + T), True = may attend; None when plain causal attention suffices.

        An attention_mask always gives an explicit mask, padded or not: looking at its values here would be a
        host-device sync. Callers that know a batch has no padding pass None to get SDPA's causal fast path.
        """
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (B, cached + T) = {(B, past + T)}, got {tuple(attention_mask.shape)}")
        if doc_ids is not None and past:
            raise ValueError("doc_ids (packed sequences) cannot be combined with a KV cache")
        if attention_mask is None and doc_ids is None and (past == 0 or T == 1):
            return None
        q_idx = torch.arange(past, past + T, device=device)
        k_idx = torch.arange(past + T, device=device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None]  # (1, 1, T, S) causal
        if doc_ids is not None:
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # padding keys masked out
            # A padding query may have no real key to its left: it always sees itself, so no row is all -inf (NaN).
            mask = mask | (k_idx[None, :] == q_idx[:, None])
        return mask


_VOCAB_ROWS = ("tok_emb.weight", "lm_head.weight")


def _unpad_vocab(module: Transformer, state_dict: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: only the vocab_size real rows (views, so copy_ into them loads the model)."""
    for name in _VOCAB_ROWS:
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name][: module.cfg.vocab_size]


def _pad_vocab(module: Transformer, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: zero rows appended to vocab_size-row tensors (checkpoints hold no padding)."""
    cfg = module.cfg
    for name in _VOCAB_ROWS:
        tensor = state_dict.get(prefix + name)
        if tensor is not None and tensor.dim() == 2 and tensor.size(0) == cfg.vocab_size:
            state_dict[prefix + name] = F.pad(tensor, (0, 0, 0, cfg.padded_vocab - cfg.vocab_size))


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """The parameter count that `Transformer(cfg)` has, by formula (same convention as num_params)."""
    d, f, kv_dim, L = cfg.d_model, cfg.ff_dim, cfg.kv_heads * cfg.head_dim, cfg.n_layer
    b, qkv_b = int(cfg.bias), int(cfg.attn_qkv_bias)
    norm = d if cfg.norm == "rmsnorm" else d * (1 + b)
    attn = (d * d + d * qkv_b) + (d * d + d * b) + (d * kv_dim + kv_dim * qkv_b) * 2  # q, o, k + v
    n_up = 2 if cfg.mlp == "swiglu" else 1
    mlp = n_up * (d * f + f * b) + f * d + d * b
    tok = cfg.padded_vocab * d
    pos = cfg.block_size * d if cfg.pos == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.padded_vocab * d
    total = tok + pos + L * (2 * norm + attn + mlp) + norm + head
    if non_embedding:
        total -= pos + (0 if cfg.tie_embeddings else tok)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, adapter_params: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token: 6N + 12*L*T*d, N = count_params(non_embedding=True).

    6N covers the weight matmuls (2 forward, 4 backward, lm_head included); 12LTd the attention
    scores and weighted values (not halved for causality, as in the PaLM/nanoGPT MFU convention).
    PEFT (adapter_params: its trainable parameters): the frozen base computes no weight gradients, so
    4N + 6 * adapter_params + 12LTd.
    """
    n = count_params(cfg, non_embedding=True)
    weights = 6 * n if adapter_params is None else 4 * n + 6 * adapter_params
    return weights + 12 * cfg.n_layer * seq_len * cfg.d_model
