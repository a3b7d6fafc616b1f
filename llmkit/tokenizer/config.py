"""The tokenizer's typed configuration (no torch import: the CLI validates it before loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmkit.errors import UserError

EOS_TOKEN = "<|endoftext|>"  # ends every document/sequence
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns
IM_END = "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
BYTE_ALPHABET = 256  # byte-level BPE starts from all 256 bytes


@dataclass
class TokenizerConfig:
    """A byte-level BPE tokenizer trained on the corpus, or an existing tokenizer.json (``path``)."""

    vocab_size: int = 4096  # includes the 256 bytes and the special tokens
    # added as single tokens, never split or merged
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    eos_token: str = EOS_TOKEN  # ends every document and assistant turn
    pad_token: str = PAD_TOKEN  # fills batches (never trained on)
    min_frequency: int = 2  # a pair must occur this often to be merged
    split_digits: bool = True  # every digit its own token (numbers read digit by digit)
    path: str | None = None  # use this tokenizer.json (or a directory holding one) instead of training

    def __post_init__(self) -> None:
        specials = list(self.special_tokens)
        if len(set(specials)) != len(specials) or any(not s for s in specials):
            raise UserError(f"tokenizer.special_tokens must be distinct non-empty strings, got {specials}")
        for key in ("eos_token", "pad_token"):
            if getattr(self, key) not in specials:
                raise UserError(
                    f"tokenizer.{key}={getattr(self, key)!r} is not in tokenizer.special_tokens {specials}; "
                    f"add it there or pick one of them"
                )
        if self.eos_token == self.pad_token:
            raise UserError(
                f"tokenizer.eos_token and tokenizer.pad_token must differ, both are {self.eos_token!r}"
            )
        smallest = BYTE_ALPHABET + len(specials)
        if not smallest <= self.vocab_size <= 2**32:
            raise UserError(
                f"tokenizer.vocab_size={self.vocab_size} must be at least {smallest} "
                f"(256 bytes + {len(specials)} special tokens) and at most 2**32"
            )
        if self.min_frequency < 1:
            raise UserError(f"tokenizer.min_frequency must be at least 1, got {self.min_frequency}")
