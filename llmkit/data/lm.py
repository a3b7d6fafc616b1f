"""Example sets the training loop draws batches from: token windows and plain lists."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import UserError


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens; each epoch starts at a different offset.

    Example i of epoch e covers tokens[o + i*T : o + i*T + T + 1] with o = offset(e), so every
    epoch sees new window boundaries while batches stay a pure function of (seed, step).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shift_each_epoch: bool = True,
                 sha256: str | None = None, vocab_size: int | None = None):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shift_each_epoch = shift_each_epoch
        self.sha256 = sha256  # of the tokens' bytes, from the shards' meta.json (None: shards written before it)
        self.vocab_size = vocab_size  # a batch holding an id at or past it is refused (a damaged shard)

    def fingerprint(self) -> str | None:
        return self.sha256

    def offset(self, epoch: int) -> int:
        if not self.shift_each_epoch or epoch == 0:
            return 0
        return (self.seed * 7919 + epoch * 104729) % self.seq_len

    def num_examples(self, epoch: int) -> int:
        return max(0, (len(self.tokens) - self.offset(epoch) - 1) // self.seq_len)

    def example(self, epoch: int, index: int) -> np.ndarray:
        start = self.offset(epoch) + index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def collate(self, examples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        block = torch.from_numpy(np.stack(examples))  # (B, T + 1)
        if self.vocab_size is not None and int(block.max()) >= self.vocab_size:
            where = getattr(self.tokens, "filename", None) or "the token shard"
            raise UserError(f"{where} holds token id {int(block.max())}, outside its vocabulary of {self.vocab_size}: "
                            "it was damaged after `llmkit tokenize` wrote it; run `llmkit tokenize` again")
        return {"input_ids": block[:, :-1], "labels": block[:, 1:]}


class ListDataset:
    """A fixed list of examples (the same every epoch) with its collate function."""

    def __init__(self, items: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]]):
        self.items = items
        self._collate = collate

    def num_examples(self, epoch: int) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """sha256 over the examples (~1.5 s per 10 million token ids, once per run)."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(repr(item).encode())
        return digest.hexdigest()

    def example(self, epoch: int, index: int) -> Any:
        return self.items[index]

    def collate(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        return self._collate(examples)


def shard_windows(tokens_dir: Path, seq_len: int, seed: int) -> tuple[TokenWindows, TokenWindows]:
    """Training windows (a new offset each epoch) and validation windows (fixed) of a shard directory."""
    from llmkit.data.shards import load_shard, read_meta

    meta = read_meta(tokens_dir)
    vocab = meta.get("vocab_size")
    train = TokenWindows(load_shard(tokens_dir, "train"), seq_len, seed=seed, sha256=meta.get("train_sha256"),
                         vocab_size=vocab)
    val = TokenWindows(load_shard(tokens_dir, "val"), seq_len, shift_each_epoch=False, sha256=meta.get("val_sha256"),
                       vocab_size=vocab)
    return train, val


def data_fingerprint(*datasets: Any) -> str | None:
    """One sha256 over what the data sets hold (None where a set cannot say: shards without checksums)."""
    parts = ["-" if d is None else d.fingerprint() for d in datasets]
    if any(part is None for part in parts):
        return None
    return hashlib.sha256(":".join(parts).encode()).hexdigest()
