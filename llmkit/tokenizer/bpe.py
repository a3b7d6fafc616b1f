"""Byte-level BPE tokenizers (HF ``tokenizers``): train, save, load, and look up special tokens.

Byte-level means the initial alphabet is all 256 bytes, so every string encodes with no unknown
token and decodes back exactly. Special tokens get the first ids (0, 1, ...) in the order given
and always encode as single ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import UserError
from llmkit.fileio import match_umask
from llmkit.tokenizer.config import BYTE_ALPHABET, DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def train_bpe(
    documents: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = tuple(DEFAULT_SPECIAL_TOKENS),
    min_frequency: int = 2,
    split_digits: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of (at most) ``vocab_size`` tokens on ``documents``.

    ``split_digits`` makes every digit its own token (as Llama and PaLM do), so numbers are read and
    written digit by digit instead of in arbitrary multi-digit pieces: arithmetic becomes learnable.
    Deterministic: the same documents and settings give an identical tokenizer.json. The
    vocabulary can come out smaller than asked when the text has too few frequent pairs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    smallest = BYTE_ALPHABET + len(special_tokens)
    if vocab_size < smallest:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is too small: it needs at least {smallest} "
            f"(256 bytes + {len(special_tokens)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tok`` as tokenizer.json atomically; ``path`` is the file or its directory. Returns the file."""
    file = Path(path)
    if file.suffix != ".json":
        file = file / TOKENIZER_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tok.to_str())
        match_umask(tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json that ``path`` names (the file or a directory holding it); UserError if there is none."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise UserError(
            f"no tokenizer at {file}: run `llmkit tokenize` to train one, or point tokenizer.path at a tokenizer.json"
        )
    return file


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (``path`` is the file or a directory holding it); UserError if absent or corrupt."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        return Tokenizer.from_str(file.read_text(encoding="utf-8-sig"))  # (a BOM, as some editors write, is dropped)
    except OSError as e:
        raise UserError(f"{file} cannot be read ({e.strerror})") from None
    except Exception as e:  # tokenizers raises a bare Exception for JSON and schema errors; bad UTF-8 too
        raise UserError(
            f"{file} is not a valid tokenizer.json ({e}); re-run `llmkit tokenize` to write it again"
        ) from None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON (what :func:`save_tokenizer` writes): identifies it in shard metadata."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def special_tokens(tok: Tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens, text -> id (added tokens marked special: eos, pad, chat markers)."""
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def token_id(tok: Tokenizer, token: str, key: str = "tokenizer") -> int:
    """The id of the single token ``token``; UserError naming ``key`` (the config key that chose it) if absent."""
    idx = tok.token_to_id(token)
    if idx is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise UserError(
            f"the tokenizer has no token {token!r} ({key}); its special tokens are {specials}: "
            f"set {key} to one of them, or retrain the tokenizer with it in tokenizer.special_tokens"
        )
    return idx


@dataclass(frozen=True)
class TokenizerInfo:
    """What training code needs to know about a tokenizer."""

    vocab_size: int  # including special tokens: the model's embedding rows
    eos_id: int
    pad_id: int
    eos_token: str
    pad_token: str
    fingerprint: str


def tokenizer_info(tok: Tokenizer, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN) -> TokenizerInfo:
    """Vocabulary size, eos/pad ids and fingerprint of ``tok``; UserError if eos or pad is missing."""
    return TokenizerInfo(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=token_id(tok, eos_token, "tokenizer.eos_token"),
        pad_id=token_id(tok, pad_token, "tokenizer.pad_token"),
        eos_token=eos_token,
        pad_token=pad_token,
        fingerprint=tokenizer_fingerprint(tok),
    )
