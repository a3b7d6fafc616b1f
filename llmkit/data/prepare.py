"""Corpus -> tokenizer + token shards, with a progress bar; cached by the config and what local files hold."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from llmkit.data.config import CorpusConfig
from llmkit.data.embedded import cache_dir
from llmkit.data.shards import META_FILE, ShardStats, write_token_shards
from llmkit.data.sources import RECORD_SUFFIXES, TEXT_SUFFIXES, ReadStats, iter_documents, list_data_files
from llmkit.errors import UserError
from llmkit.tokenizer.config import TokenizerConfig


def cached_tokens_dir(corpus: CorpusConfig, tokenizer: TokenizerConfig) -> Path:
    """Where the shards of this exact corpus + tokenizer are cached: the configs plus what local files hold.

    Local data files count by resolved path, size and mtime_ns (a stat each: a corpus can be gigabytes, too much
    to read on every run just to find its cache; any rewrite changes the mtime). A tokenizer.json counts by the
    sha256 of its bytes (small, and its content, not where a checkpoint keeps it, decides the token ids).
    """
    from llmkit.tokenizer.bpe import tokenizer_file

    key: dict[str, Any] = {"data": dataclasses.asdict(corpus), "tokenizer": dataclasses.asdict(tokenizer)}
    if corpus.source == "files":
        found = ((p.resolve(), p.stat()) for p in list_data_files(corpus.path, TEXT_SUFFIXES + RECORD_SUFFIXES))
        key["files"] = [[str(path), stat.st_size, stat.st_mtime_ns] for path, stat in found]
    if tokenizer.path:
        key["tokenizer_sha256"] = hashlib.sha256(tokenizer_file(tokenizer.path).read_bytes()).hexdigest()
    text = json.dumps(key, sort_keys=True)
    return cache_dir() / "tokens" / hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_tokens(corpus: CorpusConfig, tok_cfg: TokenizerConfig, out_dir: Path | None = None,
                   console: Console | None = None, files: dict[str, str] | None = None
                   ) -> tuple[Path, ShardStats | None]:
    """Train (or load) the tokenizer and encode the corpus into `out_dir` (default: the cache).

    The shards and `files` (name -> text, e.g. a config.yaml) are written into a sibling directory that replaces
    `out_dir` only once complete: a failure leaves what was there untouched. Returns (directory, stats); stats is
    None when a complete cached copy was reused.
    """
    from llmkit.tokenizer.bpe import load_tokenizer, token_id, train_bpe

    console = console or Console(highlight=False)
    target = out_dir or cached_tokens_dir(corpus, tok_cfg)
    settle_killed_swaps(target)
    if out_dir is None and (target / META_FILE).is_file():
        return target, None
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path)
        console.print(f"using tokenizer {tok_cfg.path} ({tokenizer.get_vocab_size()} tokens)")
    else:
        with console.status(f"training a {tok_cfg.vocab_size}-token byte-level BPE tokenizer on the corpus..."):
            tokenizer = train_bpe(iter_documents(corpus), tok_cfg.vocab_size, tok_cfg.special_tokens,
                                  tok_cfg.min_frequency, tok_cfg.split_digits)
        console.print(f"trained tokenizer: {tokenizer.get_vocab_size()} tokens")
    eos_id = token_id(tokenizer, tok_cfg.eos_token, "tokenizer.eos_token")
    hint = "choose another out_dir=" if out_dir is not None else "set LLMKIT_CACHE=<a writable directory>"
    with replaced_on_success(target, hint) as tmp:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        with Progress(TextColumn("encoding"), BarColumn(),
                      TextColumn("{task.fields[docs]} docs, {task.fields[mb]:.1f} MB"),
                      TimeElapsedColumn(), console=console, transient=True,
                      disable=not console.is_terminal) as bar:  # piped: no bar, and no blank line where it was
            task = bar.add_task("encode", total=None, docs=0, mb=0.0)
            read = ReadStats()
            stats = write_token_shards(
                iter_documents(corpus, read), tokenizer, tmp, val_fraction=corpus.val_fraction, eos_id=eos_id,
                on_progress=lambda docs, nbytes: bar.update(task, docs=docs, mb=nbytes / 1e6),
                extra_meta={"data": dataclasses.asdict(corpus), "tokenizer_config": dataclasses.asdict(tok_cfg)},
            )
        if read.empty:
            console.print(f"note: {read.empty} record(s) with empty or blank text skipped")
    return target, stats


@contextmanager
def replaced_on_success(target: Path, hint: str) -> Iterator[Path]:
    """A fresh sibling directory to fill; on success it replaces ``target``, on any error it is removed and
    ``target`` stays as it was. Entries of ``target`` the new directory lacks (a user's .gitignore) are copied
    into it before the swap. ``hint`` says what to do when the parent is not writable."""
    target = target.resolve()  # a name to put the sibling beside, even for out_dir=.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        tmp.mkdir()  # not mkdtemp: its mode 0700 would stay on the directory renamed into place
    except OSError as error:
        raise UserError(f"cannot write {target} ({error.strerror}); {hint}") from None
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
            return
        _copy_missing_entries(target, tmp)
        old = tmp.with_suffix(".old")
        target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            old.rename(target)
            raise
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_missing_entries(source: Path, dest: Path) -> None:
    for entry in source.iterdir():
        copy = dest / entry.name
        if copy.exists() or copy.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, copy, symlinks=True)
        else:
            shutil.copy2(entry, copy, follow_symlinks=False)


def settle_killed_swaps(target: Path) -> None:
    """Clean up after a `replaced_on_success` that was killed: its half-built ``.partial`` sibling goes, and its
    ``.old`` one (the earlier directory) is put back if the kill came between the two renames, else removed.
    Siblings of a process still running are left alone."""
    target = target.resolve()
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-[0-9a-f]{{8}}\.(partial|old)")
    try:
        siblings = sorted(target.parent.iterdir(), key=lambda p: p.suffix != ".old")  # .old ones first
    except OSError:  # no parent yet, or one we cannot list: nothing of ours to settle there
        return
    for sibling in siblings:
        found = pattern.fullmatch(sibling.name)
        if not found or _running(int(found[1])):
            continue
        if found[2] == "old" and not target.exists():
            sibling.rename(target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def describe(stats: ShardStats) -> str:
    return (f"{stats.documents} documents ({stats.train_documents} train / {stats.val_documents} val), "
            f"{stats.bytes / 1e6:.2f} MB, {stats.tokens} tokens ({stats.train_tokens} train / {stats.val_tokens} val), "
            f"{stats.bytes_per_token:.2f} bytes/token, {stats.mb_per_second:.2f} MB/s"
            + (f"; note: {stats.special_text_documents} document(s) hold a special token's text (e.g. <|endoftext|>), "
               "encoded as that token (the eos one also separates documents)" if stats.special_text_documents else ""))
