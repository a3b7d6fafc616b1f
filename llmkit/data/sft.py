"""Supervised fine-tuning data: records -> chat messages -> masked token examples -> packed or padded batches.

Label convention (used by every function here): labels are **already shifted**. An example of a
tokenised conversation ``ids`` (with per-token mask ``m`` from :func:`llmkit.tokenizer.chat.encode_chat`)
is ``input_ids = ids[:-1]`` and ``labels[t] = ids[t + 1]`` where token ``t + 1`` is trained on, else
``IGNORE_INDEX`` (-100). So ``labels[t]`` is the target of the prediction at position ``t`` and the
loss of a batch is simply::

    F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum")

divided by the number of labels != -100 (of the whole global batch, for exact gradient accumulation).

Truncation: an example whose input is longer than ``max_length`` keeps its first ``max_length``
positions (the right end is cut); examples left with no trained token are dropped. Both are counted
in :class:`SFTStats`.

Packing: whole examples fill rows of ``seq_len`` tokens (best fit, in order: deterministic); each row
carries ``positions`` restarting at 0 per example and ``doc_ids`` distinct per example, so with the
model's block-diagonal causal attention every example is computed exactly as if it were alone.
Padding is its own document with label -100.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer

from llmkit.data import tinyworld
from llmkit.data.sft_config import SFTDataConfig
from llmkit.data.sources import hub_records
from llmkit.errors import UserError
from llmkit.tokenizer.chat import IGNORE_INDEX, encode_chat
from llmkit.tokenizer.config import EOS_TOKEN

SPLITS = ("train", "validation")


class SFTExample(NamedTuple):
    """One tokenised conversation: inputs and shifted labels of equal length (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class SFTStats:
    """What :func:`build_sft_examples` did, for the run log."""

    records: int = 0
    examples: int = 0
    truncated: int = 0  # examples cut to max_length (kept if a trained token survived)
    dropped: int = 0  # examples with no trained token left (after truncation, or none to begin with)
    tokens: int = 0  # input positions over all kept examples
    trained_tokens: int = 0  # labels != -100 over all kept examples

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------- records -> messages


def _text_field(record: Mapping[str, Any], name: str, key: str, where: str, required: bool = True) -> str | None:
    """A string field of a record; missing (when required) or non-string values are UserErrors naming the fix."""
    value = record.get(name)
    if value is None:
        if required and name in record:
            raise UserError(f"{where}: field '{name}' is null; give it a string, or drop the record")
        if required:
            raise UserError(f"{where}: the record has no field '{name}' (fields: {', '.join(sorted(record)) or 'none'}); "
                            f"fix the record or set data.{key}=<the right field>")
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def detect_format(record: Mapping[str, Any], cfg: SFTDataConfig, where: str) -> str:
    """The record's format: ``cfg.format``, or (``auto``) the first whose fields the record has."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in record:
        return "messages"
    if cfg.instruction_field in record and cfg.output_field in record:
        return "alpaca"
    if cfg.prompt_field in record and cfg.completion_field in record:
        return "prompt_completion"
    raise UserError(
        f"{where}: cannot tell the record's format from its fields ({', '.join(sorted(record)) or 'none'}); expected "
        f"'{cfg.messages_field}' (messages), '{cfg.instruction_field}' + '{cfg.output_field}' (alpaca) or "
        f"'{cfg.prompt_field}' + '{cfg.completion_field}' (prompt_completion); set data.format and the data.*_field names"
    )


def record_to_messages(record: Mapping[str, Any], cfg: SFTDataConfig, where: str = "record") -> list[dict]:
    """A record of any of the three formats as chat messages (validated later by encode_chat)."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: a record must be an object, got {type(record).__name__}")
    fmt = detect_format(record, cfg, where)
    if fmt == "messages":
        messages = record.get(cfg.messages_field)
        if not isinstance(messages, list):
            raise UserError(f"{where}: field '{cfg.messages_field}' must be a list of {{role, content}} objects, "
                            f"got {type(messages).__name__}; set data.messages_field if it lives elsewhere")
        has_system = bool(messages) and isinstance(messages[0], Mapping) and messages[0].get("role") == "system"
        system = None if has_system else cfg.system_prompt
        turns = list(messages)
    else:
        if fmt == "alpaca":
            user = _text_field(record, cfg.instruction_field, "instruction_field", where)
            extra = _text_field(record, cfg.input_field, "input_field", where, required=False)
            user = f"{user}\n\n{extra}" if extra else user
            answer = _text_field(record, cfg.output_field, "output_field", where)
        else:
            user = _text_field(record, cfg.prompt_field, "prompt_field", where)
            answer = _text_field(record, cfg.completion_field, "completion_field", where)
        system = _text_field(record, cfg.system_field, "system_field", where, required=False) or cfg.system_prompt
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return ([{"role": "system", "content": system}] if system else []) + turns


# ---------------------------------------------------------------- loading records


def _held_out(record: Mapping[str, Any], fraction: float) -> bool:
    """Whether a record goes to validation: a hash of its content, so identical records stay together."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest, 16) % 10_000 < fraction * 10_000


def _required_fields(cfg: SFTDataConfig) -> tuple[list[str], list[str]]:
    """(required, must-be-string) fields for the file reader; auto format checks fields per record."""
    if cfg.format == "messages":
        return [cfg.messages_field], []
    if cfg.format == "alpaca":
        return [cfg.instruction_field, cfg.output_field], [cfg.instruction_field, cfg.output_field]
    if cfg.format == "prompt_completion":
        return [cfg.prompt_field, cfg.completion_field], [cfg.prompt_field, cfg.completion_field]
    return [], []


def _file_records(cfg: SFTDataConfig, path: str, key: str) -> list[tuple[str, dict]]:
    from llmkit.data.sources import iter_records

    required, strings = _required_fields(cfg)
    hint = "fix the records, or set data.format and the data.*_field names to match them"
    return [(rec.where, rec.data) for rec in iter_records(path, required, string_fields=strings, field_hint=hint,
                                                          encoding_errors=cfg.encoding_errors, path_key=key)]


def load_sft_records(cfg: SFTDataConfig, split: str) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs of the ``train`` or ``validation`` split, in a fixed order.

    ``where`` names the record in errors (``file:line``, hub row, or tinyworld index). Without a
    validation file/split, ``val_fraction`` of the records is held out by content hash.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source == "tinyworld":
        n = cfg.tinyworld_train if split == "train" else cfg.tinyworld_validation
        tasks = tinyworld.make_tasks(split, n, cfg.tinyworld_seed, cfg.tinyworld_families)
        return [(f"tinyworld {split} #{i}", tinyworld.to_chat(t)) for i, t in enumerate(tasks)]
    if cfg.source == "files" and split == "validation" and cfg.validation_path:
        return _file_records(cfg, cfg.validation_path, "data.validation_path")
    if cfg.source == "hub" and split == "validation" and cfg.hub_validation_split:
        return hub_records(cfg.hub_name, cfg.hub_config, cfg.hub_validation_split)
    if cfg.source == "files":
        records = _file_records(cfg, cfg.path, "data.path")
        held_out = cfg.validation_path is None
    else:
        records = hub_records(cfg.hub_name, cfg.hub_config, cfg.hub_split)
        held_out = cfg.hub_validation_split is None
    if not held_out:
        return records
    return [(w, r) for w, r in records if _held_out(r, cfg.val_fraction) == (split == "validation")]


# ---------------------------------------------------------------- tokenising


def build_sft_examples(records: Iterable[Mapping | tuple[str, Mapping]], tokenizer: Tokenizer, cfg: SFTDataConfig, *,
                       max_length: int | None = None, eos_token: str = EOS_TOKEN) -> tuple[list[SFTExample], SFTStats]:
    """Tokenise records (plain dicts, ``(where, record)`` pairs as from :func:`load_sft_records`, or
    :class:`llmkit.data.formats.Record`) into examples.

    ``max_length`` (default ``cfg.max_length``) caps the input positions of an example; the
    template, ``loss_on`` and field names come from ``cfg``. Returns the kept examples, in order, and counts.
    """
    limit = max_length if max_length is not None else cfg.max_length
    if limit is None or limit < 1:
        raise ValueError(f"max_length must be a positive int (cfg.max_length is {cfg.max_length})")
    examples: list[SFTExample] = []
    stats = SFTStats()
    for i, item in enumerate(records):
        if hasattr(item, "where"):  # a llmkit.data.formats.Record
            where, record = item.where, item.data
        else:
            where, record = item if isinstance(item, tuple) else (f"record {i}", item)
        stats.records += 1
        messages = record_to_messages(record, cfg, where)
        ids, mask = encode_chat(tokenizer, messages, cfg.chat_template, eos_token=eos_token,
                                loss_on=cfg.loss_on, location=where)
        if len(ids) - 1 > limit:
            stats.truncated += 1
            ids, mask = ids[: limit + 1], mask[: limit + 1]
        labels = mask[1:]
        trained = sum(label != IGNORE_INDEX for label in labels)
        if trained == 0:
            stats.dropped += 1
            continue
        examples.append(SFTExample(ids[:-1], labels))
        stats.tokens += len(labels)
        stats.trained_tokens += trained
    stats.examples = len(examples)
    return examples, stats


# ---------------------------------------------------------------- packing and batches


@dataclass
class PackedSeq:
    """One packed row of exactly ``seq_len`` positions (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]
    positions: list[int]  # restart at 0 for each example (and for the padding)
    doc_ids: list[int]  # 0, 1, ... per example in the row; padding has the next id


def pack_examples(examples: Sequence[SFTExample], seq_len: int, pad_id: int = 0) -> list[PackedSeq]:
    """Pack whole examples into rows of ``seq_len`` tokens: each goes to the fullest row it fits (best fit).

    Deterministic for a given order; every example appears exactly once, uncut. An example longer
    than ``seq_len`` is a UserError (set data.max_length <= seq_len).
    """
    rows: list[list[int]] = []  # example indices per row, in placement order
    free: list[tuple[int, int]] = []  # (space left, row index), sorted; rows with no space are dropped
    for k, example in enumerate(examples):
        n = len(example.input_ids)
        if n > seq_len:
            raise UserError(f"an example of {n} tokens does not fit in packed rows of {seq_len}; "
                            f"set data.max_length <= {seq_len}")
        if n == 0:
            raise ValueError(f"example {k} is empty")
        j = bisect.bisect_left(free, (n, -1))
        space, r = free.pop(j) if j < len(free) else (seq_len, len(rows))
        if r == len(rows):
            rows.append([])
        rows[r].append(k)
        if space > n:
            bisect.insort(free, (space - n, r))
    return [_packed_row([examples[k] for k in row], seq_len, pad_id) for row in rows]


def _packed_row(members: list[SFTExample], seq_len: int, pad_id: int) -> PackedSeq:
    row = PackedSeq([], [], [], [])
    for doc, example in enumerate(members):
        row.input_ids += example.input_ids
        row.labels += example.labels
        row.positions += range(len(example.input_ids))
        row.doc_ids += [doc] * len(example.input_ids)
    pad = seq_len - len(row.input_ids)
    row.input_ids += [pad_id] * pad
    row.labels += [IGNORE_INDEX] * pad
    row.positions += range(pad)
    row.doc_ids += [len(members)] * pad
    return row


def collate_packed(rows: Sequence[PackedSeq]) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``input_ids``, ``labels``, ``positions``, ``doc_ids``: int64 tensors (B, T)."""
    return {key: torch.tensor([getattr(row, key) for row in rows], dtype=torch.long)
            for key in ("input_ids", "labels", "positions", "doc_ids")}


def collate_padded(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` (1 = real)."""
    width = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        batch["input_ids"][b, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        batch["labels"][b, :n] = torch.tensor(example.labels, dtype=torch.long)
        batch["attention_mask"][b, :n] = 1
    return batch
