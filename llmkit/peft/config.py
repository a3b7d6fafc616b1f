"""The PEFT method's typed configuration (no torch import: the CLI validates it before loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmkit.errors import UserError

METHODS = ("lora", "dora", "qlora", "adapter", "prefix", "prompt", "bitfit", "ia3")
# Methods placed on individual linear layers chosen by `targets`; the others ignore targets.
TARGETED_METHODS = ("lora", "dora", "qlora", "bitfit", "ia3")
# Methods whose adapted model equals a plain Transformer with changed weights (`merge=true`).
MERGEABLE = ("lora", "dora", "qlora", "ia3", "bitfit")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# Shortcuts a target may name instead of a linear layer's leaf name.
TARGET_SHORTCUTS = {
    "attention": ATTENTION_LINEARS,
    "mlp": MLP_LINEARS,
    "all_linear": ATTENTION_LINEARS + MLP_LINEARS,
}
LEAF_TARGETS = ATTENTION_LINEARS + MLP_LINEARS + ("lm_head",)
# What an empty `targets` means, per method: LoRA's paper default (queries and values), IA3's
# (keys, values and the MLP hidden activation), BitFit's (every bias in the blocks).
DEFAULT_TARGETS = {
    "lora": ("q_proj", "v_proj"),
    "dora": ("q_proj", "v_proj"),
    "qlora": ("q_proj", "v_proj"),
    "ia3": ("k_proj", "v_proj", "down_proj"),
    "bitfit": ("all_linear",),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class PeftConfig:
    """One parameter-efficient fine-tuning method and its settings; the base model stays frozen."""

    method: str = "lora"  # lora | dora | qlora | adapter | prefix | prompt | bitfit | ia3
    # Linear layers the method is placed on (lora, dora, qlora, bitfit, ia3): leaf names (q_proj, ...,
    # down_proj, lm_head), full module names (blocks.0.attn.q_proj) or the shortcuts attention, mlp,
    # all_linear. Empty: the method's default (DEFAULT_TARGETS). lm_head only when named.
    targets: list[str] = field(default_factory=list)
    rank: int = 8  # lora/dora/qlora: rank r of the update B @ A
    alpha: float = 16.0  # lora/dora/qlora: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # lora/dora/qlora: dropout on the LoRA input path only
    rslora: bool = False  # lora/dora/qlora: rank-stabilised scaling alpha / sqrt(r)
    nf4_block_size: int = 64  # qlora: weights per absmax scale
    double_quant: bool = False  # qlora: quantise the absmax scales to 8 bits (one fp32 scale per 256 blocks)
    adapter_size: int = 16  # adapter: bottleneck width of each Houlsby adapter
    num_virtual_tokens: int = 8  # prefix/prompt: virtual tokens per layer (prefix) or at the input (prompt)
    prefix_projection: bool = False  # prefix: produce the prefixes by an MLP over embeddings (reparameterised)
    prefix_hidden: int = 64  # prefix: hidden width of that MLP
    prompt_init_text: str | None = None  # prompt: initialise from this text's token embeddings (else random tokens)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"peft.method={self.method!r} is not one of: {', '.join(METHODS)}")
        for key in ("rank", "nf4_block_size", "adapter_size", "num_virtual_tokens", "prefix_hidden"):
            _check(getattr(self, key) > 0, f"peft.{key} must be positive, got {getattr(self, key)}")
        _check(self.alpha > 0, f"peft.alpha must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"peft.dropout must be in [0, 1), got {self.dropout}")
        _check(self.nf4_block_size % 2 == 0,
               f"peft.nf4_block_size must be even (two 4-bit codes per byte), got {self.nf4_block_size}")
        if self.targets and self.method not in TARGETED_METHODS:
            raise UserError(f"peft.targets does not apply to method={self.method}; "
                            f"it is used by {', '.join(TARGETED_METHODS)}: remove it")
        for target in self.targets:
            _check(target in LEAF_TARGETS or target in TARGET_SHORTCUTS or "." in target,
                   f"peft.targets: {target!r} is not a linear layer name ({', '.join(LEAF_TARGETS)}), "
                   f"a full module name (blocks.0.attn.q_proj) or a shortcut ({', '.join(TARGET_SHORTCUTS)})")
        if self.prompt_init_text is not None:
            _check(self.method == "prompt", "peft.prompt_init_text only applies to method=prompt")
            _check(bool(self.prompt_init_text.strip()), "peft.prompt_init_text is empty: set a text or null")

    def target_patterns(self) -> list[str]:
        """`targets`, or the method's default (DEFAULT_TARGETS) when empty; shortcuts not yet expanded."""
        return list(self.targets) or list(DEFAULT_TARGETS.get(self.method, ()))
