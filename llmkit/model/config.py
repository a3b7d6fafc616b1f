"""The model's typed configuration (no torch import: the CLI validates it before loading torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmkit.errors import UserError

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("none", "linear", "llama3")
LLAMA3_KEYS = ("rope_original_context", "rope_low_freq_factor", "rope_high_freq_factor")


@dataclass
class ModelConfig:
    """A decoder-only Transformer: GPT-2 style or Llama style through a few switches."""

    name: str = "tiny"  # a label for messages and checkpoints
    vocab_size: int = 4096  # token ids; at least the tokenizer's size
    block_size: int = 256  # context length in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention (query) heads
    n_kv_head: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query
    d_model: int = 256  # width of the residual stream
    d_ff: int | None = None  # None: 4*d (gelu) or 8/3*d rounded up to 64 (swiglu)
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    mlp: str = "gelu"  # gelu | swiglu
    tie_embeddings: bool = True  # lm_head shares the input embedding matrix
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool | None = None  # None: as bias; true with bias=false: biases on q/k/v only (Qwen2 style)
    dropout: float = 0.0  # on embeddings, attention and residual branches (training only)
    rope_theta: float = 10000.0  # rope: base of the rotary frequencies
    rope_scaling: str = "none"  # rope: none | linear | llama3 (Llama 3.1+): frequencies stretched to a longer context
    rope_factor: float = 1.0  # linear, llama3: how many times the original context the stretched one is
    rope_original_context: int = 8192  # llama3: the context the model was pretrained at (original_max_position_embeddings)
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_context / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_context / this stay; between, blended
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    init_std: float = 0.02  # std of the normal initialisation
    pad_vocab_multiple: int = 64  # embedding/lm_head rows rounded up to a multiple of this (1: no padding)

    def __post_init__(self) -> None:
        for key, value, choices in (("norm", self.norm, NORMS), ("pos", self.pos, POSITIONS), ("mlp", self.mlp, MLPS)):
            if value not in choices:
                raise UserError(f"model.{key}={value!r} is not one of {', '.join(choices)}")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "rope_theta", "norm_eps"):
            if not 0 < getattr(self, key) < math.inf:  # also false for nan
                raise UserError(f"model.{key} must be positive and finite, got {getattr(self, key)}")
        for key in ("n_kv_head", "d_ff"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be positive or null (null: the default), got {getattr(self, key)}")
        if not 0 <= self.init_std < math.inf:
            raise UserError(f"model.init_std must be >= 0 and finite, got {self.init_std}")
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise UserError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"rope needs an even head size; d_model/n_head = {self.head_dim}")
        self._check_rope_scaling()
        if self.pad_vocab_multiple < 1:
            raise UserError(f"model.pad_vocab_multiple must be >= 1 (1: no padding), got {self.pad_vocab_multiple}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def _check_rope_scaling(self) -> None:
        """rope_scaling's settings are refused where they would be ignored or give non-finite frequencies."""
        if self.rope_scaling not in ROPE_SCALINGS:
            raise UserError(f"model.rope_scaling={self.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
        if self.rope_scaling != "none" and self.pos != "rope":
            raise UserError(f"model.rope_scaling={self.rope_scaling} needs model.pos=rope (it is {self.pos!r})")
        for key in ("rope_factor", *LLAMA3_KEYS):
            if not 0 < getattr(self, key) < math.inf:
                raise UserError(f"model.{key} must be positive and finite, got {getattr(self, key)}")
        if self.rope_scaling == "none" and self.rope_factor != 1.0:
            raise UserError(f"model.rope_factor={self.rope_factor} has no effect with model.rope_scaling=none: "
                            "set model.rope_scaling=linear or llama3, or leave rope_factor at 1")
        defaults = {key: ModelConfig.__dataclass_fields__[key].default for key in LLAMA3_KEYS}
        unused = [k for k, v in defaults.items() if getattr(self, k) != v and self.rope_scaling != "llama3"]
        if unused:
            raise UserError(f"model.{unused[0]} is a setting of model.rope_scaling=llama3 and has no effect with "
                            f"rope_scaling={self.rope_scaling}: leave it at {defaults[unused[0]]}")
        if self.rope_low_freq_factor >= self.rope_high_freq_factor:
            raise UserError(f"model.rope_low_freq_factor ({self.rope_low_freq_factor}) must be below "
                            f"model.rope_high_freq_factor ({self.rope_high_freq_factor})")

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and lm_head: vocab_size rounded up to pad_vocab_multiple (the extra ids are never used)."""
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def attn_qkv_bias(self) -> bool:
        """Whether the q, k and v projections have biases (qkv_bias, or bias when qkv_bias is null)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model
