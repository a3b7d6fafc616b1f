"""The corpus's typed configuration (no torch import: the CLI validates it before loading torch).

Encoding policy (``data.encoding_errors``): local files must be UTF-8. With ``strict`` (the default)
a byte sequence that is not UTF-8 stops the run with a message naming the file, line and byte
offset; with ``replace`` each bad sequence becomes U+FFFD and the number replaced is logged per
file and counted in :class:`llmkit.data.formats.ReadStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import UserError

SOURCES = ("embedded", "files", "hub")
ENCODING_ERRORS = ("strict", "replace")


@dataclass
class CorpusConfig:
    """Where pretraining text comes from and how it is split into train and validation."""

    source: str = "embedded"  # embedded (stdlib docstrings, offline) | files | hub
    path: str | None = None  # files: a file, a directory or a glob of .txt/.jsonl/.json/.parquet/.csv
    text_field: str = "text"  # the field/column holding the text (jsonl, json, parquet, csv, hub)
    hub_name: str | None = None  # hub: dataset name, e.g. "wikitext"
    hub_config: str | None = None  # hub: dataset configuration, e.g. "wikitext-2-raw-v1"
    hub_split: str = "train"  # hub: the split to read
    streaming: bool = False  # hub: stream instead of downloading the whole split
    max_documents: int | None = None  # stop after this many documents (None: all)
    val_fraction: float = 0.05  # share of whole documents held out for validation
    encoding_errors: str = "strict"  # strict | replace (see the module docstring)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise UserError(
                f"data.encoding_errors={self.encoding_errors!r} is not one of {', '.join(ENCODING_ERRORS)}"
            )
        if self.source == "files" and not self.path:
            raise UserError("data.source=files needs a path: set data.path=<file, directory or glob>")
        if self.source == "hub" and not self.hub_name:
            raise UserError("data.source=hub needs a dataset name: set data.hub_name=<name>")
        if not self.text_field:
            raise UserError("data.text_field must name a field, e.g. data.text_field=text")
        if self.max_documents is not None and self.max_documents < 2:
            raise UserError(
                f"data.max_documents must be at least 2 (one for training, one for validation), "
                f"got {self.max_documents}; or set data.max_documents=null for all"
            )
        if not 0.0 < self.val_fraction <= 0.5:
            raise UserError(f"data.val_fraction must be in (0, 0.5], got {self.val_fraction}")
