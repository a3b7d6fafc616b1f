"""Preference pairs: records -> (prompt messages, chosen, rejected) -> token pairs -> padded pair batches.

Three record shapes (``data.format``, or ``auto`` per record, field names configurable):

- ``pairs``: ``{"prompt": str | messages, "chosen": str, "rejected": str}`` (the tiny world's shape).
- ``hh``: full transcripts as in Anthropic HH-RLHF, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``: the prompt is the shared prefix up to the last ``\\n\\nAssistant:`` they have in
  common, parsed into user/assistant turns; the rest of each transcript is the response.
- ``messages``: ``chosen`` / ``rejected`` are chat ``messages`` lists ending with the assistant answer;
  the messages before it (identical in both) are the prompt, or the ``prompt`` field when there are
  none (UltraFeedback's and TRL's conversational shapes).

Each side is tokenised with the SFT chat template exactly as SFT trained it (`encode_chat`), so the
prompt tokens equal those `encode_prompt` gives at inference, and cut just after the response's
closing eos: the last real token of every sequence is that eos, where a reward head reads.
A batch holds the N chosen sequences in rows [0, N) and their rejected partners in rows [N, 2N).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from llmkit.config.schema_align import PreferenceDataConfig
from llmkit.data import tinyworld
from llmkit.data.lm import ListDataset
from llmkit.data.sources import hub_records
from llmkit.errors import UserError
from llmkit.tokenizer.chat import IGNORE_INDEX, encode_chat, validate_messages

HH_MARKER = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """One preference: the conversation so far (ending with a user turn) and two answers to it."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str  # file:line, hub row or tinyworld index, for error messages
    family: str | None = None  # the record's "family" field when it has one (per-family held-out accuracy)


@dataclass
class PairExample:
    """Token ids of both sides; masks are 1 on response tokens (answer, end-of-turn, eos), 0 on the prompt."""

    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    family: str | None = None  # the pair's family, if its record has one


@dataclass
class PreferenceStats:
    records: int = 0
    pairs: int = 0
    identical: int = 0  # dropped: chosen == rejected carries no preference
    too_long: int = 0  # dropped: a side longer than data.max_length tokens


@dataclass
class PreferenceSets:
    train: ListDataset
    val: ListDataset | None
    stats: PreferenceStats
    val_stats: PreferenceStats = field(default_factory=PreferenceStats)


# ---------------------------------------------------------------- records -> pairs


def detect_format(record: Mapping[str, Any], cfg: PreferenceDataConfig, where: str) -> str:
    """``cfg.format``, or (auto) ``messages`` when chosen is a list, ``pairs`` with a prompt, ``hh`` otherwise."""
    if cfg.format != "auto":
        return cfg.format
    chosen = record.get(cfg.chosen_field)
    if isinstance(chosen, list):
        return "messages"
    if cfg.prompt_field in record:
        return "pairs"
    if isinstance(chosen, str) and HH_MARKER in chosen:
        return "hh"
    raise UserError(f"{where}: cannot tell the record's shape from its fields ({', '.join(sorted(record)) or 'none'}); "
                    f"expected '{cfg.prompt_field}' + '{cfg.chosen_field}' + '{cfg.rejected_field}' (pairs), HH-style "
                    f"transcripts in '{cfg.chosen_field}'/'{cfg.rejected_field}' (hh), or messages lists (messages); "
                    "set data.format and the data.*_field names")


def _prompt_messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """A prompt given as text (one user turn) or as a messages list."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return validate_messages(value, f"{where}: field '{key}'")
    raise UserError(f"{where}: field '{key}' must be a string or a messages list, got {type(value).__name__}; "
                    f"fix the record or set data.prompt_field")


def _response(value: Any, key: str, fmt: str, where: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the answer, answer text) of a chosen/rejected field."""
    if fmt == "messages":
        if not isinstance(value, list):
            raise UserError(f"{where}: field '{key}' must be a messages list (data.format=messages), got {type(value).__name__}")
        messages = validate_messages(value, f"{where}: field '{key}'")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: field '{key}' must end with the assistant's answer, "
                            f"but its last message is from {messages[-1]['role']!r}")
        return messages[:-1], messages[-1]["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string (data.format={fmt}), got {type(value).__name__}; "
                        "use data.format=messages for messages lists")
    return [], value


def _hh_turns(text: str, where: str) -> list[dict[str, str]]:
    """The turns of an HH transcript prefix (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as chat messages."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: an HH transcript must start with '\\n\\nHuman:' turns; got {text[:40]!r}")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def split_hh(chosen: str, rejected: str, where: str) -> tuple[list[dict[str, str]], str, str]:
    """Split two HH transcripts at the last Assistant turn they share: (prompt messages, chosen, rejected)."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_MARKER)
    if cut < 0:
        raise UserError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn, so there is no common "
                        "prompt to split off; fix the record or use data.format=pairs with a prompt field")
    start = cut + len(HH_MARKER)
    return _hh_turns(chosen[:cut], where), chosen[start:].strip(), rejected[start:].strip()


def record_to_pair(record: Mapping[str, Any], cfg: PreferenceDataConfig, where: str) -> PreferencePair:
    """A record of any shape as a preference pair (its prompt ending with a user turn)."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where}: a record must be an object, got {type(record).__name__}")
    for key, name in ((cfg.chosen_field, "chosen_field"), (cfg.rejected_field, "rejected_field")):
        if record.get(key) is None:
            raise UserError(f"{where}: the record has no field '{key}' (fields: {', '.join(sorted(record)) or 'none'}); "
                            f"fix the record or set data.{name}")
    fmt = detect_format(record, cfg, where)
    if fmt == "hh":
        chosen, rejected = (_response(record.get(k), k, fmt, where)[1] for k in (cfg.chosen_field, cfg.rejected_field))
        prompt, chosen, rejected = split_hh(chosen, rejected, where)
    else:
        before, chosen = _response(record.get(cfg.chosen_field), cfg.chosen_field, fmt, where)
        before_rejected, rejected = _response(record.get(cfg.rejected_field), cfg.rejected_field, fmt, where)
        if before != before_rejected:
            raise UserError(f"{where}: the '{cfg.chosen_field}' and '{cfg.rejected_field}' conversations differ "
                            "before their last answer; a pair must answer the same prompt")
        if not before and cfg.prompt_field not in record:
            raise UserError(f"{where}: the record has no field '{cfg.prompt_field}' (fields: "
                            f"{', '.join(sorted(record))}); fix the record or set data.prompt_field")
        prompt = before or _prompt_messages(record[cfg.prompt_field], cfg.prompt_field, where)
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn, but it ends with {prompt[-1]['role']!r}")
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    family = record.get("family")
    return PreferencePair(prompt, chosen, rejected, where, family if isinstance(family, str) else None)


# ---------------------------------------------------------------- loading records


def held_out(record: Mapping[str, Any], fraction: float) -> bool:
    """Whether a record goes to validation: a hash of its content, so the split is stable."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest, 16) % 10_000 < fraction * 10_000


def _file_records(cfg: PreferenceDataConfig, path: str, key: str) -> list[tuple[str, dict]]:
    from llmkit.data.sources import iter_records

    hint = "fix the records, or set data.format and the data.*_field names to match them"
    return [(rec.where, rec.data) for rec in iter_records(path, [cfg.chosen_field, cfg.rejected_field], string_fields=[],
                                                          encoding_errors=cfg.encoding_errors, path_key=key,
                                                          field_hint=hint)]


def load_pairs(cfg: PreferenceDataConfig, split: str) -> list[PreferencePair]:
    """The ``train`` or ``validation`` pairs, in a fixed order."""
    if cfg.source == "tinyworld":
        n = cfg.tinyworld_train if split == "train" else cfg.tinyworld_validation
        raw = tinyworld.make_preference_pairs(split, n, cfg.tinyworld_seed, cfg.tinyworld_families,
                                             cfg.tinyworld_style_fraction)
        records = [(f"tinyworld {split} #{i}", r) for i, r in enumerate(raw)]
    elif cfg.source == "files" and split == "validation" and cfg.validation_path:
        records = _file_records(cfg, cfg.validation_path, "data.validation_path")
    elif cfg.source == "hub" and split == "validation" and cfg.hub_validation_split:
        records = hub_records(cfg.hub_name, cfg.hub_config, cfg.hub_validation_split)
    else:
        records = _file_records(cfg, cfg.path, "data.path") if cfg.source == "files" else hub_records(cfg.hub_name, cfg.hub_config, cfg.hub_split)
        if (cfg.validation_path if cfg.source == "files" else cfg.hub_validation_split) is None:
            records = [(w, r) for w, r in records if held_out(r, cfg.val_fraction) == (split == "validation")]
    return [record_to_pair(r, cfg, w) for w, r in records]


# ---------------------------------------------------------------- tokenising and batches


def encode_side(tokenizer, prompt: list[dict], answer: str, template: str, eos_token: str,
                where: str) -> tuple[list[int], list[int]]:
    """(ids, response mask) of prompt + answer, cut just after the answer's closing eos."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    ids, labels = encode_chat(tokenizer, messages, template, eos_token=eos_token, loss_on="last", location=where)
    mask = [int(label != IGNORE_INDEX) for label in labels]
    end = len(mask) - mask[::-1].index(1)  # one past the eos that closes the answer
    return ids[:end], mask[:end]


def build_pair_examples(pairs: list[PreferencePair], tokenizer, template: str, eos_token: str,
                        max_length: int) -> tuple[list[PairExample], PreferenceStats]:
    """Tokenise pairs; drop (and count) identical pairs and pairs with a side over max_length tokens."""
    stats = PreferenceStats(records=len(pairs))
    examples = []
    for pair in pairs:
        if pair.chosen == pair.rejected:
            stats.identical += 1
            continue
        chosen = encode_side(tokenizer, pair.prompt, pair.chosen, template, eos_token, pair.where)
        rejected = encode_side(tokenizer, pair.prompt, pair.rejected, template, eos_token, pair.where)
        if max(len(chosen[0]), len(rejected[0])) > max_length:
            stats.too_long += 1
            continue
        examples.append(PairExample(*chosen, *rejected, pair.family))
    stats.pairs = len(examples)
    return examples, stats


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (2N, T) ``input_ids``, ``attention_mask`` and ``response_mask``: chosen rows, then rejected."""
    rows = [(e.chosen_ids, e.chosen_mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "response_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for b, (ids, mask) in enumerate(rows):
        batch["input_ids"][b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["attention_mask"][b, :len(ids)] = 1
        batch["response_mask"][b, :len(ids)] = torch.tensor(mask, dtype=torch.long)
    return batch


def preference_sets(cfg: PreferenceDataConfig, tokenizer, template: str, eos_token: str, pad_id: int,
                    seq_len: int) -> PreferenceSets:
    """Train and validation pair sets for the loop (one example = one pair); UserError if no pair is left."""
    max_length = min(cfg.max_length or seq_len, seq_len)
    out = []
    for split in ("train", "validation"):
        pairs = load_pairs(cfg, split)
        examples, stats = build_pair_examples(pairs, tokenizer, template, eos_token, max_length)
        if split == "train" and not examples:
            raise UserError(f"no training pair is left ({stats.identical} identical, {stats.too_long} longer than "
                            f"{max_length} tokens); check the data or raise data.max_length")
        out.append((ListDataset(examples, partial(collate_pairs, pad_id=pad_id)) if examples else None, stats))
    return PreferenceSets(out[0][0], out[1][0], out[0][1], out[1][1])
