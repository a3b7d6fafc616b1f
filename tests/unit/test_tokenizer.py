"""Byte-level BPE: exact round trips, single-id special tokens, determinism, save/load, errors."""

from __future__ import annotations

import pytest

from llmkit.errors import UserError
from llmkit.tokenizer.bpe import (
    load_tokenizer,
    save_tokenizer,
    token_id,
    tokenizer_fingerprint,
    tokenizer_info,
    train_bpe,
)
from llmkit.tokenizer.config import DEFAULT_SPECIAL_TOKENS, TokenizerConfig

SYLLABLES = "the quick brown fox jumps over lazy dog to ken mer ge in la pie ce text an re ly ing".split()
CORPUS = [
    " ".join(
        SYLLABLES[(i * 7 + j) % len(SYLLABLES)] + SYLLABLES[(i + j * j) % len(SYLLABLES)] for j in range(40)
    )
    + f", number {i}."
    for i in range(300)
]
SAMPLES = [
    "Hello, world! The quick brown fox.",
    "  leading spaces,\ttabs\nand new lines\r\n",
    "naïve café — déjà vu; Ünïcödé ß",
    "中文字符 and русский текст",
    "emoji: 🎉🚀👍🏽 family 👨‍👩‍👧",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=400, special_tokens=DEFAULT_SPECIAL_TOKENS)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_vocab_and_merges(tok):
    assert tok.get_vocab_size() == 400
    assert len(tok.encode("the quick brown fox").ids) < len("the quick brown fox")  # merges happened


def test_digits_are_single_tokens_unless_disabled():
    numbers = ["total 1234567 of 89012 items: 345 + 678 = 1023"] * 50
    split = train_bpe(numbers, vocab_size=300)
    pieces = split.encode("x 4071 + 1023").tokens
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("40711023")
    assert split.decode(split.encode("x 4071 + 1023").ids) == "x 4071 + 1023"
    merged = train_bpe(numbers, vocab_size=300, split_digits=False)
    assert any(sum(c.isdigit() for c in p) > 1 for p in merged.encode("x 1234567").tokens)


def test_special_tokens_are_single_ids_with_the_first_ids(tok):
    for i, special in enumerate(DEFAULT_SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i
        assert tok.encode(special).ids == [i]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 2 and ids[-1] == 3 and 2 not in ids[1:-1]


def test_training_is_deterministic(tok):
    again = train_bpe(CORPUS, vocab_size=400, special_tokens=DEFAULT_SPECIAL_TOKENS)
    assert again.to_str() == tok.to_str()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_save_load_round_trip(tok, tmp_path):
    file = save_tokenizer(tok, tmp_path / "run")
    assert file == tmp_path / "run" / "tokenizer.json"
    assert not list(file.parent.glob("*.tmp"))
    for where in (file, file.parent):
        loaded = load_tokenizer(where)
        assert loaded.to_str() == tok.to_str()
        assert loaded.encode(SAMPLES[2]).ids == tok.encode(SAMPLES[2]).ids


def test_load_missing_or_corrupt_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="llmkit tokenize"):
        load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE"')
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_token_ids_and_info(tok):
    info = tokenizer_info(tok)
    assert (info.eos_id, info.pad_id, info.vocab_size) == (0, 1, 400)
    assert info.fingerprint == tokenizer_fingerprint(tok)
    with pytest.raises(UserError, match=r"tokenizer.pad_token.*<\|endoftext\|>"):
        token_id(tok, "<pad>", "tokenizer.pad_token")


def test_vocab_too_small_raises():
    with pytest.raises(UserError, match="at least 260"):
        train_bpe(CORPUS, vocab_size=100, special_tokens=DEFAULT_SPECIAL_TOKENS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 200}, "tokenizer.vocab_size"),
        ({"eos_token": "</s>"}, "tokenizer.eos_token"),
        ({"pad_token": "<|endoftext|>"}, "must differ"),
        ({"special_tokens": ["<|endoftext|>", "<|endoftext|>", "<|pad|>"]}, "distinct"),
        ({"min_frequency": 0}, "tokenizer.min_frequency"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        TokenizerConfig(**kwargs)


def test_config_is_omegaconf_structured():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(
        OmegaConf.structured(TokenizerConfig), OmegaConf.from_dotlist(["vocab_size=512"])
    )
    cfg = OmegaConf.to_object(merged)
    assert cfg.vocab_size == 512 and cfg.special_tokens == DEFAULT_SPECIAL_TOKENS
