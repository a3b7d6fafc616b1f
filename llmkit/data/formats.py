"""Readers of one local data file per format (UTF-8 lines, JSON Lines, JSON, CSV, parquet), yielding
:class:`Record` objects that know their file and line, and counting what they saw in :class:`ReadStats`.
:mod:`llmkit.data.sources` finds the files and checks the records' fields."""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from llmkit.errors import UserError

log = logging.getLogger("llmkit.data.sources")  # one logger for every data reader, as users configure it
_WS = re.compile(r"\s*")
_BOM = "\ufeff"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of half a surrogate pair
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins pairs: what is left is unpaired
_REPLACEMENT = "\ufffd".encode()


@dataclass
class ReadStats:
    """What a read saw: files opened, documents yielded, U+FFFD substitutions, field names seen."""

    files: int = 0
    documents: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced (encoding_errors=replace)
    empty: int = 0  # documents skipped because their text is empty or blank
    fields: set[str] = field(default_factory=set)


class Record(NamedTuple):
    """One record and where it came from: ``line`` is 1-based (the row number for parquet and hub)."""

    file: str
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        """``file:line`` (or ``file row N``) for error messages."""
        return f"{self.file}:{self.line}" if _line_based(self.file) else f"{self.file} row {self.line}"


def _line_based(file: str) -> bool:
    return file.lower().endswith((".jsonl", ".json", ".csv", ".txt"))



def _decode(raw: bytes, where: str, offset: int, errors: str, stats: ReadStats) -> str:
    """UTF-8 text of ``raw`` (which starts at byte ``offset`` of its file), per the encoding policy."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise UserError(
                f"{where}: bytes {raw[e.start : e.end]!r} at byte offset {offset + e.start} are not valid UTF-8; "
                "convert the file to UTF-8, or set data.encoding_errors=replace to substitute U+FFFD"
            ) from None
    text = raw.decode("utf-8", "replace")
    stats.replaced += text.count("\ufffd") - raw.count(_REPLACEMENT)
    return text


def decoded_lines(path: Path, errors: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) of a UTF-8 file, a leading BOM dropped."""
    before, offset = stats.replaced, 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                text = _decode(raw, f"{path}:{lineno}", offset, errors, stats)
                offset += len(raw)
                yield lineno, text[1:] if lineno == 1 and text.startswith(_BOM) else text
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    _log_replaced(path, stats.replaced - before)


def _log_replaced(path: Path, count: int) -> None:
    if count:
        log.warning(
            "%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD (data.encoding_errors=replace)",
            path,
            count,
        )


def jsonl_records(path: Path, errors: str, stats: ReadStats) -> Iterator[Record]:
    for lineno, line in decoded_lines(path, errors, stats):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))  # without its newline, an error at the end keeps its column
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                "each line of a .jsonl file must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object {{...}}, found {type(obj).__name__}")
        if _SURROGATE_ESCAPE.search(line):
            obj = _without_lone_surrogates(obj, f"{path}:{lineno}", errors, stats)
        yield Record(str(path), lineno, obj)


def json_records(path: Path, errors: str, stats: ReadStats) -> Iterator[Record]:
    """Objects of a JSON list (or of ``{"data": [...]}``), with the line each one starts on."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before, line = stats.replaced, raw.count(b"\n", 0, e.start) + 1
        text = _decode(raw, f"{path}:{line}", 0, errors, stats)  # raises under strict
        _log_replaced(path, stats.replaced - before)
    text = text.removeprefix(_BOM)
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        lines = "; it holds one JSON object per line: name it .jsonl" if e.msg == "Extra data" and e.colno == 1 else ""
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}){lines}") from None
    shape = 'a .json file must hold a list of objects, or {"data": [list of objects]}'
    if isinstance(top, dict):
        if not isinstance(top.get("data"), list):
            raise UserError(
                f'{path}: the top-level object has no "data" list (keys: {", ".join(top) or "none"}); {shape}'
            )
        items, start = top["data"], _data_array_start(text)
    elif isinstance(top, list):
        items, start = top, _WS.match(text).end()
    else:
        raise UserError(f"{path}: the top level is {type(top).__name__}; {shape}")
    line, pos, escapes = 1, 0, _SURROGATE_ESCAPE.search(text) is not None
    for obj, item_pos in zip(items, _array_item_starts(text, start), strict=True):
        line += text.count("\n", pos, item_pos)
        pos = item_pos
        if not isinstance(obj, dict):
            raise UserError(
                f"{path}:{line}: expected a JSON object {{...}}, found {type(obj).__name__}; {shape}"
            )
        if escapes:
            obj = _without_lone_surrogates(obj, f"{path}:{line}", errors, stats)
        yield Record(str(path), line, obj)


def _without_lone_surrogates(obj: Any, where: str, errors: str, stats: ReadStats) -> Any:
    """`obj` with no unpaired surrogate in its strings (a JSON escape such as \\ud800, which is not text and
    cannot be encoded): refused under data.encoding_errors=strict, each one U+FFFD under replace."""
    if isinstance(obj, dict):
        return {key: _without_lone_surrogates(value, where, errors, stats) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_without_lone_surrogates(value, where, errors, stats) for value in obj]
    if not isinstance(obj, str) or (found := _LONE_SURROGATE.search(obj)) is None:
        return obj
    if errors == "strict":
        raise UserError(f"{where}: the JSON escape \\u{ord(found[0]):04x} is half of a surrogate pair without its "
                        "other half, not text; fix the record, or set data.encoding_errors=replace to substitute "
                        "U+FFFD")
    text, count = _LONE_SURROGATE.subn("\ufffd", obj)
    stats.replaced += count
    return text


def _data_array_start(text: str) -> int:
    """Offset of the ``[`` of the (last) top-level "data" key's value in valid JSON text."""
    dec = json.JSONDecoder()
    i, found = _WS.match(text, _WS.match(text).end() + 1).end(), -1
    while text[i] != "}":
        key, i = dec.raw_decode(text, i)
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past the colon
        if key == "data":
            found = i
        _, i = dec.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()
    assert found >= 0, "caller checked that a data list exists"
    return found


def _array_item_starts(text: str, i: int) -> Iterator[int]:
    """Offsets where the items of the valid JSON array starting at ``text[i] == '['`` begin."""
    dec = json.JSONDecoder()
    i = _WS.match(text, i + 1).end()
    while text[i] != "]":
        yield i
        _, i = dec.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()


def csv_records(
    path: Path, required: list[str], hint: str, errors: str, stats: ReadStats
) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be longer than the 128 KiB default
    reader = csv.reader(line for _, line in decoded_lines(path, errors, stats))
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            if header is None:
                header = [h.strip() for h in row]
                missing = [name for name in required if name not in header]
                if missing:
                    raise UserError(
                        f"{path}:1: no column '{missing[0]}' in the CSV header (columns: {', '.join(header)}); {hint}"
                    )
            elif row:
                if len(row) != len(header):
                    raise UserError(
                        f"{path}:{start}: row has {len(row)} values but the header has {len(header)} columns; "
                        "quote values that contain commas or newlines"
                    )
                yield Record(str(path), start, dict(zip(header, row, strict=True)))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise UserError(f"{path}: the CSV file is empty; it needs a header row naming its columns")


def parquet_records(
    path: Path, required: list[str], strings: list[str], hint: str, columns: list[str] | None
) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    schema = pf.schema_arrow
    for name in required:
        if name not in schema.names:
            raise UserError(f"{path}: no column '{name}' (columns: {', '.join(schema.names)}); {hint}")
        kind = schema.field(name).type
        text = kind.value_type if pa.types.is_dictionary(kind) else kind  # dictionary: pandas' categorical strings
        is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
        if name in strings and not (pa.types.is_string(text) or pa.types.is_large_string(text)
                                    or (is_view is not None and is_view(text))):
            raise UserError(f"{path}: column '{name}' holds {kind}, expected strings; {hint}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for data in batch.to_pylist():
            row += 1
            yield Record(str(path), row, data)
