"""Token shards: a corpus encoded once into flat binary files that training memory-maps.

A shard directory holds ``train.bin`` and ``val.bin`` (raw little-endian uint16 when the vocabulary
fits in 65536 ids, else uint32: every document's tokens followed by the eos id) and ``meta.json``.
A special token's text inside a document (``<|endoftext|>`` in a corpus that separates stories with it) is
encoded as that token, as the tokenizer always does; the documents holding one are counted and reported.
Whole documents go to validation by a fixed rule on their index (:func:`is_val_document`), so the
split is deterministic and held out. The tokenizer that wrote them is saved beside them as
``tokenizer.json``. Files are written under temporary names and renamed; ``meta.json`` is written
last and marks the directory complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import UserError
from llmkit.fileio import match_umask

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

SPLITS = ("train", "val")
META_FILE = "meta.json"
VERIFY_BYTES = 1 << 30  # shards up to this size are checked against their sha256 when loaded (~1 s per GiB)
FORMAT_VERSION = 1


@dataclass
class ShardStats:
    """What :func:`write_token_shards` wrote and how fast."""

    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text
    tokens: int = 0  # tokens written, one eos per document included
    train_tokens: int = 0
    val_tokens: int = 0
    special_text_documents: int = 0  # documents whose text holds a special token's text (encoded as that token)
    seconds: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        """Compression: text bytes per text token (eos tokens not counted)."""
        return self.bytes / max(1, self.tokens - self.documents)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        """Throughput in megabytes (10**6 bytes) of text per second."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def is_val_document(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` (0-based) is held out: ceil(n * f) of the first n documents are.

    Document 0 always goes to validation, then every ~1/f-th one, so any corpus of two or more
    documents has a non-empty validation split and, with f <= 0.5, a training split at least as large.
    """
    num, den = _as_fraction(val_fraction)
    return -(-(index + 1) * num // den) > -(-index * num // den)


@lru_cache(maxsize=8)
def _as_fraction(value: float) -> tuple[int, int]:
    """``value`` as an exact ratio, so the split rule has no floating-point edge cases."""
    f = Fraction(value).limit_denominator(1_000_000)
    return f.numerator, f.denominator


def token_dtype(vocab_size: int) -> str:
    """numpy dtype string for token ids: little-endian uint16 up to 65536 ids, else uint32."""
    return "<u2" if vocab_size <= 2**16 else "<u4"


@contextmanager
def parallel_encoding(enabled: bool) -> Iterator[None]:
    """Within the block, ``encode_batch`` uses every core (or one, if not ``enabled``).

    TOKENIZERS_PARALLELISM is read on every call by ``tokenizers``; a ``false`` set elsewhere (to
    quiet fork warnings) would otherwise make encoding single-threaded. Restored on exit.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def write_token_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float,
    eos_id: int,
    batch_size: int = 1000,
    on_progress: Callable[[int, int], None] | None = None,
    parallel: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> ShardStats:
    """Encode ``documents`` into ``out_dir``/{train,val}.bin (+ eos after each) and meta.json.

    ``on_progress(documents, bytes)`` is called after each batch with running totals. ``parallel``
    encodes on all cores. ``extra_meta`` is stored in meta.json (e.g. the corpus config); the
    tokenizer is saved as ``out_dir``/tokenizer.json. Raises
    UserError when the corpus has fewer than two documents (no room for a validation split).
    """
    import numpy as np

    from llmkit.tokenizer.bpe import TOKENIZER_FILE, save_tokenizer, special_tokens, tokenizer_fingerprint

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {vocab_size})")
    dtype = np.dtype(token_dtype(vocab_size))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets (>= 0.20)
    specials = list(special_tokens(tokenizer))
    stats = ShardStats()
    tmp_paths = {s: Path(tempfile.mkstemp(dir=out, prefix=f"{s}.bin.", suffix=".tmp")[1]) for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}  # recorded in meta.json: a resume on other data is refused
    start = time.perf_counter()
    try:
        with (
            open(tmp_paths["train"], "wb") as train_f,
            open(tmp_paths["val"], "wb") as val_f,
            parallel_encoding(parallel),
        ):
            for batch in _batches(documents, batch_size):
                train_ids: list[int] = []
                val_ids: list[int] = []
                for enc, doc in zip(encode(batch, add_special_tokens=False), batch, strict=True):
                    if is_val_document(stats.documents, val_fraction):
                        val_ids += enc.ids
                        val_ids.append(eos_id)
                        stats.val_documents += 1
                    else:
                        train_ids += enc.ids
                        train_ids.append(eos_id)
                        stats.train_documents += 1
                    stats.documents += 1
                    stats.bytes += len(doc.encode("utf-8"))
                    stats.special_text_documents += any(text in doc for text in specials)
                for ids, file, digest in ((train_ids, train_f, digests["train"]), (val_ids, val_f, digests["val"])):
                    array = np.asarray(ids, dtype=dtype)
                    array.tofile(file)
                    digest.update(array.data)
                stats.train_tokens += len(train_ids)
                stats.val_tokens += len(val_ids)
                if on_progress is not None:
                    on_progress(stats.documents, stats.bytes)
        stats.tokens = stats.train_tokens + stats.val_tokens
        stats.seconds = time.perf_counter() - start
        if stats.documents < 2:
            raise UserError(
                f"the corpus has {stats.documents} document(s); at least 2 are needed to hold one out "
                "for validation: add text (.txt documents are separated by blank lines)"
            )
        for split in SPLITS:
            match_umask(tmp_paths[split])  # mkstemp makes it 0600
            os.replace(tmp_paths[split], out / f"{split}.bin")
    finally:
        for p in tmp_paths.values():
            p.unlink(missing_ok=True)
    save_tokenizer(tokenizer, out / TOKENIZER_FILE)
    meta = {
        **(extra_meta or {}),
        "format": FORMAT_VERSION,
        "dtype": dtype.str,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "val_fraction": val_fraction,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        **{f"{split}_sha256": digest.hexdigest() for split, digest in digests.items()},
        **{k: v for k, v in asdict(stats).items() if k != "seconds"},
        "seconds": round(stats.seconds, 3),
        "bytes_per_token": round(stats.bytes_per_token, 4),
    }
    _write_json_atomic(out / META_FILE, meta)
    return stats


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_meta(shard_dir: str | Path) -> dict[str, Any]:
    """meta.json of a complete shard directory; UserError if it is missing or incomplete."""
    d = Path(shard_dir)
    if not d.is_dir():
        raise UserError(f"no token shards at {d}: run `llmkit tokenize` first")
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise UserError(
            f"token shards at {d} are incomplete (no {META_FILE}; tokenizing was interrupted or never ran): "
            "run `llmkit tokenize` again"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{meta_path} is unreadable ({e}): run `llmkit tokenize` again") from None
    fields = ("format", "dtype", "train_tokens", "val_tokens", "vocab_size")
    missing = [k for k in fields if k not in meta] if isinstance(meta, dict) else list(fields)
    if missing:
        raise UserError(
            f"{meta_path} lacks {', '.join(missing) or 'its fields'}: run `llmkit tokenize` again"
        )
    if meta["format"] != FORMAT_VERSION:
        raise UserError(
            f"{meta_path} has shard format {meta['format']}, this llmkit reads {FORMAT_VERSION}: "
            "run `llmkit tokenize` again"
        )
    return meta


def check_tokenizer(shard_dir: str | Path, tokenizer: Tokenizer, used: str, fix: str) -> None:
    """UserError unless the shards at ``shard_dir`` were encoded with ``tokenizer`` (meta.json's tokenizer_sha256):
    another tokenizer's ids mean other tokens. ``used`` names the tokenizer in use, ``fix`` says what to do."""
    from llmkit.tokenizer.bpe import TOKENIZER_FILE, tokenizer_fingerprint

    d = Path(shard_dir)
    if read_meta(d).get("tokenizer_sha256") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"the token shards at {d} were encoded with {d / TOKENIZER_FILE}, not with {used}: their "
                        f"token ids would mean other tokens; {fix}")


def load_shard(shard_dir: str | Path, split: str) -> np.memmap:
    """The ``split`` ("train" or "val") tokens of a shard directory, memory-mapped read-only; checked against the
    sha256 and vocabulary size in meta.json when at most VERIFY_BYTES (larger ones: each batch's ids, TokenWindows)."""
    import numpy as np

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = read_meta(shard_dir)
    path = Path(shard_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    size = path.stat().st_size if path.is_file() else -1
    if size != expected or expected == 0:
        found = "is missing" if size < 0 else f"has {size} bytes"
        raise UserError(
            f"{path} {found}, but {META_FILE} says {meta[f'{split}_tokens']} tokens ({expected} bytes): "
            "run `llmkit tokenize` again"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")
    recorded = meta.get(f"{split}_sha256")
    if recorded and expected <= VERIFY_BYTES:
        again = "; run `llmkit tokenize` again"
        if hashlib.sha256(tokens).hexdigest() != recorded:
            raise UserError(f"{path} does not match the sha256 its {META_FILE} records: it was changed or damaged "
                            f"after `llmkit tokenize` wrote it{again}")
        if int(tokens.max()) >= meta["vocab_size"]:
            raise UserError(f"{path} holds token id {int(tokens.max())}, outside its vocabulary of "
                            f"{meta['vocab_size']}{again}")
    return tokens
