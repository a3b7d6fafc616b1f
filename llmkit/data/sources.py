"""Read documents and records from the embedded corpus, local files or the Hugging Face hub.

Local formats (``data.path`` is a file, a directory searched recursively, or a glob):

- ``.txt``: UTF-8 text; every block of lines separated by one or more blank lines is one document
  (``\\r\\n`` and ``\\n`` line endings become ``\\n``; a lone ``\\r``, old Mac OS's, is kept as text).
- ``.jsonl``: one JSON object per line; blank lines are skipped.
- ``.json``: a list of objects, or an object whose ``"data"`` key holds that list.
- ``.csv``: a header row, then one record per row (read with the ``csv`` module).
- ``.parquet``: one record per row (read with pyarrow).

Every problem raises :class:`~llmkit.errors.UserError` naming the file, the line (row for
parquet) and the field, and saying what to do. :func:`iter_records` is the reusable reader for
record files (instruction data, preference pairs): it checks that required fields are present,
non-null and, where asked, strings.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmkit.data.config import CorpusConfig
from llmkit.data.formats import (
    ReadStats,
    Record,
    csv_records,
    decoded_lines,
    json_records,
    jsonl_records,
    parquet_records,
)
from llmkit.errors import UserError

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".zip")
_GLOB_CHARS = re.compile(r"[*?[]")


# ---------------------------------------------------------------- corpus documents


def iter_documents(cfg: CorpusConfig, stats: ReadStats | None = None) -> Iterator[str]:
    """The corpus's non-empty documents in a fixed order, at most ``cfg.max_documents`` of them.

    Raises UserError for unreadable input, and for an empty corpus once the sources are exhausted.
    """
    stats = stats if stats is not None else ReadStats()
    if cfg.source == "embedded":
        from llmkit.data.embedded import embedded_documents

        docs: Iterable[str] = embedded_documents()
        origin = "the embedded corpus"
    elif cfg.source == "files":
        docs = _file_documents(cfg, stats)
        origin = f"data.path={cfg.path}"
    else:
        docs = _hub_documents(cfg, stats)
        origin = f"hub dataset data.hub_name={cfg.hub_name}"
    for doc in docs:
        if not doc.strip():
            stats.empty += 1
            continue
        stats.documents += 1
        yield doc
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return
    if stats.documents == 0:
        detail = ""
        if stats.fields:
            detail = (
                f"; field '{cfg.text_field}' is empty in every record (fields present: "
                f"{', '.join(sorted(stats.fields))}): set data.text_field=<the field with the text>"
            )
        raise UserError(f"the corpus is empty: {origin} has no non-empty documents{detail}")


def _file_documents(cfg: CorpusConfig, stats: ReadStats) -> Iterator[str]:
    assert cfg.path is not None  # CorpusConfig checks this for source=files
    hint = "set data.text_field=<one of the fields present>"
    for path in list_data_files(cfg.path, TEXT_SUFFIXES + RECORD_SUFFIXES):
        stats.files += 1
        if path.suffix.lower() in TEXT_SUFFIXES:
            yield from _txt_documents(path, cfg.encoding_errors, stats)
            continue
        fields = [cfg.text_field]
        for rec in _file_records(path, fields, fields, cfg.encoding_errors, hint, stats, only_required=True):
            yield rec.data[cfg.text_field]


def _txt_documents(path: Path, errors: str, stats: ReadStats) -> Iterator[str]:
    """Blank-line-separated blocks of a text file, one document each."""
    block: list[str] = []
    for _, line in decoded_lines(path, errors, stats):
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _hub_documents(cfg: CorpusConfig, stats: ReadStats) -> Iterator[str]:
    """Rows of a Hugging Face dataset (never running remote code), checked like local records."""
    import datasets

    where = f"hub:{cfg.hub_name}" + (f"/{cfg.hub_config}" if cfg.hub_config else "") + f"[{cfg.hub_split}]"
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types (connection, missing config, missing split)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = any(
            os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
            for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        fix = (
            "a directory written by save_to_disk is not read: write its rows with ds.to_parquet('<file>.parquet') "
            "and use data.source=files data.path=<file>.parquet"
            if "save_to_disk" in reason
            else "running offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set), so the dataset must already be in "
            "the Hugging Face cache: download it once with network access, or use data.source=files"
            if offline
            else "check data.hub_name, data.hub_config and data.hub_split, and the network connection"
        )
        raise UserError(f"cannot load {where}: {reason}; {fix}") from None
    columns = getattr(ds, "column_names", None)
    if columns and cfg.text_field not in columns:
        raise UserError(
            f"{where} has no column '{cfg.text_field}' (columns: {', '.join(columns)}); "
            "set data.text_field=<one of them>"
        )
    hint = "set data.text_field=<one of the fields present>"
    for i, row in enumerate(ds, 1):
        rec = Record(where, i, dict(row))
        _check_fields(rec, [cfg.text_field], [cfg.text_field], hint, stats)
        yield rec.data[cfg.text_field]


# ---------------------------------------------------------------- files and records


def list_data_files(path: str | Path, suffixes: Sequence[str], key: str = "data.path") -> list[Path]:
    """The data files that ``path`` names (a file, a directory searched recursively, or a glob), sorted.

    ``key`` is the config key that set ``path``, named in error messages.
    """
    spec = os.path.expanduser(str(path))
    kinds = ", ".join(suffixes)
    if _GLOB_CHARS.search(spec):
        matched = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(
                f"no files match {key}={spec}; check the pattern or set {key}=<file or directory>"
            )
        files = [p for p in matched if p.suffix.lower() in suffixes]
        if not files:
            names = ", ".join(p.name for p in matched[:5])
            raise UserError(f"{key}={spec} matches no {kinds} files (it matches: {names})")
        return files
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() not in suffixes:
            raise UserError(f"{key}={spec}: unsupported file type '{p.suffix}'; expected one of {kinds}")
        return [p]
    if p.is_dir():
        if (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
            raise UserError(f"{key}={spec} is a directory written by datasets' save_to_disk, which llmkit does not "
                            "read: write its rows with ds.to_parquet('<file>.parquet') and point "
                            f"{key} at that file")
        compressed = sorted(f.name for f in p.rglob("*") if f.suffix.lower() in COMPRESSED and f.is_file())
        if compressed:  # skipping them would train on part of the data, silently
            raise UserError(f"directory {key}={spec} holds compressed files llmkit does not read "
                            f"({', '.join(compressed[:5])}): decompress them, or move them out of the directory")
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in suffixes and not _hidden(f.relative_to(p))
        )
        if not files:
            raise UserError(f"directory {key}={spec} holds no {kinds} files")
        return files
    raise UserError(f"{key}={spec} does not exist; set {key}=<an existing file, directory or glob>")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def iter_records(
    path: str | Path,
    required_fields: Sequence[str],
    *,
    string_fields: Sequence[str] | None = None,
    encoding_errors: str = "strict",
    path_key: str = "data.path",
    field_hint: str = "fix the records or name the right field in the config",
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Records of the .jsonl/.json/.csv/.parquet files that ``path`` names (file, directory or glob).

    Every record has each of ``required_fields`` present and not null; those in ``string_fields``
    (default: all required fields) are strings. Anything else raises UserError naming the file,
    line and field; ``field_hint`` is appended as the fix for a missing or mistyped field.
    """
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors must be strict or replace, got {encoding_errors!r}")
    stats = stats if stats is not None else ReadStats()
    strings = list(required_fields if string_fields is None else string_fields)
    found = False
    for file in list_data_files(path, RECORD_SUFFIXES, key=path_key):
        stats.files += 1
        for record in _file_records(file, list(required_fields), strings, encoding_errors, field_hint, stats):
            found = True
            yield record
    if not found:
        raise UserError(f"{path_key}={path} holds no records (empty or blank); add records, one JSON object per line "
                        "of a .jsonl file (or rows of a .json list, .csv or .parquet file)")


def _file_records(
    path: Path,
    required: list[str],
    strings: list[str],
    errors: str,
    hint: str,
    stats: ReadStats,
    only_required: bool = False,
) -> Iterator[Record]:
    """Checked records of one file; ``only_required`` reads just those columns of a parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = parquet_records(path, required, strings, hint, required if only_required else None)
    elif suffix == ".csv":
        records = csv_records(path, required, hint, errors, stats)
    elif suffix == ".json":
        records = json_records(path, errors, stats)
    else:
        records = jsonl_records(path, errors, stats)
    for rec in records:
        _check_fields(rec, required, strings, hint, stats)
        yield rec


def _check_fields(rec: Record, required: list[str], strings: list[str], hint: str, stats: ReadStats) -> None:
    stats.fields.update(rec.data)
    for name in required:
        if name not in rec.data:
            present = ", ".join(rec.data) or "none"
            raise UserError(f"{rec.where}: record has no field '{name}' (fields: {present}); {hint}")
        value = rec.data[name]
        if value is None:
            raise UserError(f"{rec.where}: field '{name}' is null; give it a value or drop the record")
        if name in strings and not isinstance(value, str):
            raise UserError(
                f"{rec.where}: field '{name}' is {type(value).__name__} ({_preview(value)}), expected a string; {hint}"
            )


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def hub_records(name: str, config: str | None, split: str, key: str = "data.hub_name") -> list[tuple[str, dict]]:
    """Every row of a hub dataset split as (where, record); any hub failure becomes one clear message."""
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # missing, offline, bad config
        raise UserError(f"cannot load hub dataset {key}={name!r} (config {config!r}, split {split!r}): {e}; "
                        "check the name, the hub config/split, and network or cache") from e
    return [(f"{name}[{split}] row {i + 1}", dict(row)) for i, row in enumerate(rows)]
