"""Instruction data for the loop: records -> chat-templated examples -> packed or padded example sets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from llmkit.data.lm import ListDataset
from llmkit.data.sft import (
    SFTStats,
    build_sft_examples,
    collate_packed,
    collate_padded,
    load_sft_records,
    pack_examples,
)
from llmkit.data.sft_config import SFTDataConfig
from llmkit.errors import UserError
from llmkit.tokenizer.chat import resolve_template


@dataclass
class InstructionSets:
    train: ListDataset
    val: ListDataset | None
    stats: SFTStats
    val_stats: SFTStats | None


def instruction_sets(cfg: SFTDataConfig, tokenizer, seq_len: int, eos_token: str, pad_id: int) -> InstructionSets:
    """Tokenise train/validation records with the chat template; pack them into seq_len rows or pad per batch."""
    _check_template_tokens(cfg, tokenizer)
    max_length = min(cfg.max_length or seq_len, seq_len)
    sets, stats = [], []
    for split in ("train", "validation"):
        records = load_sft_records(cfg, split)
        examples, split_stats = build_sft_examples(records, tokenizer, cfg, max_length=max_length, eos_token=eos_token)
        if split == "train" and not examples:
            raise UserError("no training example has a token to learn from after templating and truncation; "
                            "check data.loss_on and data.max_length")
        if cfg.packing:
            sets.append(ListDataset(pack_examples(examples, seq_len, pad_id), collate_packed) if examples else None)
        else:
            sets.append(ListDataset(examples, partial(collate_padded, pad_id=pad_id)) if examples else None)
        stats.append(split_stats)
    return InstructionSets(sets[0], sets[1], stats[0], stats[1])


def _check_template_tokens(cfg: SFTDataConfig, tokenizer) -> None:
    """Refuse a tokenizer that lacks the special tokens the chat template writes."""
    template = resolve_template(cfg.chat_template)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        if token in template and token not in vocab:
            raise UserError(f"the chat template writes {token} but the model's tokenizer has no such token "
                            f"(its special tokens: {sorted(specials)}); use data.chat_template=simple or a "
                            "tokenizer trained with that special token")
