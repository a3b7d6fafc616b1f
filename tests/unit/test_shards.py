"""Token shards: exact contents and split, dtype choice, metadata, atomicity and errors."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from llmkit.data.shards import (
    is_val_document,
    load_shard,
    read_meta,
    token_dtype,
    write_token_shards,
)
from llmkit.errors import UserError
from llmkit.tokenizer.bpe import tokenizer_fingerprint, train_bpe
from llmkit.tokenizer.config import DEFAULT_SPECIAL_TOKENS

DOCS = [
    f"Document {i}: the model reads text, tokens and numbers like {i * 37}. Ünïcode 🎉" * (1 + i % 3)
    for i in range(8)
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(DOCS * 3, vocab_size=300, special_tokens=DEFAULT_SPECIAL_TOKENS)


def expected(tok, docs, eos, want_val, fraction):
    out: list[int] = []
    for i, doc in enumerate(docs):
        if is_val_document(i, fraction) == want_val:
            out += tok.encode(doc, add_special_tokens=False).ids + [eos]
    return out


def test_contents_equal_direct_encoding_in_order(tok, tmp_path):
    progress = []
    stats = write_token_shards(
        DOCS,
        tok,
        tmp_path,
        val_fraction=0.25,
        eos_id=0,
        batch_size=3,
        on_progress=lambda d, b: progress.append((d, b)),
    )
    # the rule: ceil(n * 0.25) of the first n documents are held out, starting with document 0
    assert [i for i in range(8) if is_val_document(i, 0.25)] == [0, 4]
    train, val = load_shard(tmp_path, "train"), load_shard(tmp_path, "val")
    assert train.dtype == np.dtype("<u2") and val.dtype == np.dtype("<u2")
    assert train.tolist() == expected(tok, DOCS, 0, False, 0.25)
    assert val.tolist() == expected(tok, DOCS, 0, True, 0.25)
    total_bytes = sum(len(d.encode()) for d in DOCS)
    assert (stats.documents, stats.train_documents, stats.val_documents) == (8, 6, 2)
    assert (stats.train_tokens, stats.val_tokens, stats.tokens) == (
        len(train),
        len(val),
        len(train) + len(val),
    )
    assert stats.bytes == total_bytes and stats.bytes_per_token == total_bytes / (stats.tokens - 8)
    assert stats.tokens_per_second > 0 and stats.mb_per_second > 0
    assert progress == [
        (3, sum(len(d.encode()) for d in DOCS[:3])),
        (6, sum(len(d.encode()) for d in DOCS[:6])),
        (8, total_bytes),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_meta_json(tok, tmp_path):
    stats = write_token_shards(
        DOCS, tok, tmp_path, val_fraction=0.25, eos_id=0, extra_meta={"data": {"source": "x"}}
    )
    meta = read_meta(tmp_path)
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "<u2" and meta["vocab_size"] == 300 and meta["eos_id"] == 0
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(tok)
    assert (meta["documents"], meta["train_documents"], meta["val_documents"]) == (8, 6, 2)
    assert (meta["train_tokens"], meta["val_tokens"], meta["tokens"]) == (
        stats.train_tokens,
        stats.val_tokens,
        stats.tokens,
    )
    assert meta["bytes"] == stats.bytes and meta["data"] == {"source": "x"}


def test_special_token_text_in_a_document_is_that_token_and_is_counted(tok, tmp_path):
    """A corpus that separates stories with a literal <|endoftext|> gets the eos id there, as the tokenizer always
    encodes it; the documents holding such text are counted (meta.json) and reported, not silent."""
    eos = tok.token_to_id("<|endoftext|>")
    docs = ["first story<|endoftext|>second story", *DOCS[:3], "ask <|im_start|>user", DOCS[3]]
    stats = write_token_shards(docs, tok, tmp_path, val_fraction=0.1, eos_id=eos, parallel=False)
    assert stats.special_text_documents == 2 and read_meta(tmp_path)["special_text_documents"] == 2
    ids = load_shard(tmp_path, "train").tolist() + load_shard(tmp_path, "val").tolist()
    assert ids.count(eos) == stats.documents + 1  # one after each document, one inside the first
    from llmkit.data.prepare import describe

    assert "note: 2 document(s) hold a special token's text" in describe(stats)
    plain = write_token_shards(DOCS, tok, tmp_path / "plain", val_fraction=0.1, eos_id=eos, parallel=False)
    assert plain.special_text_documents == 0 and "note" not in describe(plain)


def test_parallel_and_serial_agree(tok, tmp_path):
    write_token_shards(DOCS, tok, tmp_path / "a", val_fraction=0.3, eos_id=0, parallel=True)
    write_token_shards(DOCS, tok, tmp_path / "b", val_fraction=0.3, eos_id=0, parallel=False)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (
            tmp_path / "b" / f"{split}.bin"
        ).read_bytes()


def test_dtype_choice():
    assert token_dtype(300) == "<u2" and token_dtype(65536) == "<u2"
    assert token_dtype(65537) == "<u4"


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    docs = ["w69999 w2", "w65536 w65535", "w70 w1000"]
    write_token_shards(docs, big, tmp_path, val_fraction=0.5, eos_id=0)
    assert read_meta(tmp_path)["dtype"] == "<u4"
    assert (tmp_path / "val.bin").read_bytes() == np.array([69999, 2, 0, 70, 1000, 0], dtype="<u4").tobytes()
    assert load_shard(tmp_path, "train").tolist() == [65536, 65535, 0]


@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.1, 1 / 3, 0.5])
def test_validation_is_never_empty_from_two_documents(fraction):
    for n in range(2, 60):
        held = sum(is_val_document(i, fraction) for i in range(n))
        assert 1 <= held <= n - 1
        assert held == math.ceil(n * Fraction(fraction).limit_denominator(1_000_000))


def test_too_small_corpus_leaves_nothing_behind(tok, tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        write_token_shards(["only one"], tok, tmp_path, val_fraction=0.1, eos_id=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="llmkit tokenize"):
        read_meta(tmp_path)


def test_rewrite_is_incomplete_until_meta(tok, tmp_path):
    write_token_shards(DOCS, tok, tmp_path, val_fraction=0.25, eos_id=0)
    with pytest.raises(UserError):
        write_token_shards(["x"], tok, tmp_path, val_fraction=0.25, eos_id=0)
    with pytest.raises(UserError, match="incomplete"):
        load_shard(tmp_path, "train")


def test_missing_and_damaged_shards(tok, tmp_path):
    with pytest.raises(UserError, match="run `llmkit tokenize` first"):
        read_meta(tmp_path / "nowhere")
    write_token_shards(DOCS, tok, tmp_path, val_fraction=0.25, eos_id=0)
    data = (tmp_path / "train.bin").read_bytes()
    (tmp_path / "train.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="train.bin has .* bytes"):
        load_shard(tmp_path, "train")
    (tmp_path / "val.bin").unlink()
    with pytest.raises(UserError, match="val.bin is missing"):
        load_shard(tmp_path, "val")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is unreadable"):
        read_meta(tmp_path)


def test_a_changed_shard_or_an_id_past_the_vocabulary_is_refused_not_trained_on(tok, tmp_path, monkeypatch):
    """A flipped bit fails the recorded sha256; an id past the vocabulary is refused when loading (shards up to
    VERIFY_BYTES) or in the batch that holds it (larger shards, checked by TokenWindows)."""
    import hashlib

    from llmkit.data import shards
    from llmkit.data.lm import shard_windows

    write_token_shards(DOCS, tok, tmp_path, val_fraction=0.25, eos_id=0)
    original = (tmp_path / "train.bin").read_bytes()
    flipped = bytearray(original)
    flipped[10] ^= 1
    (tmp_path / "train.bin").write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r"train\.bin does not match the sha256 its meta\.json records"):
        load_shard(tmp_path, "train")

    too_big = np.frombuffer(original, dtype=np.uint16).copy()
    too_big[5] = 300  # the vocabulary has 300 ids: 0..299
    (tmp_path / "train.bin").write_bytes(too_big.tobytes())
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["train_sha256"] = hashlib.sha256(too_big.tobytes()).hexdigest()  # a consistent but wrong shard
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"train\.bin holds token id 300, outside its vocabulary of 300"):
        load_shard(tmp_path, "train")
    monkeypatch.setattr(shards, "VERIFY_BYTES", 0)  # as for a shard too large to hash at every start
    train, _ = shard_windows(tmp_path, 8, seed=0)
    with pytest.raises(UserError, match=r"train\.bin holds token id 300, outside its vocabulary of 300"):
        train.collate([train.example(0, i) for i in range(train.num_examples(0))])


@pytest.mark.parametrize("text", ["5", "[1, 2]", '{"format": 1}'])
def test_a_meta_json_that_is_not_a_complete_object_is_refused(tmp_path, text):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(UserError, match=r"meta.json lacks .*run `llmkit tokenize` again"):
        read_meta(tmp_path)
