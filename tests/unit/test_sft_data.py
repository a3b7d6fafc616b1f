"""SFT data: formats -> messages, loading, truncation, packing, collation, and packed == unpacked loss."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmkit.data import tinyworld as tw
from llmkit.data.sft import (
    SFTExample,
    build_sft_examples,
    collate_packed,
    collate_padded,
    load_sft_records,
    pack_examples,
    record_to_messages,
)
from llmkit.data.sft_config import SFTDataConfig
from llmkit.errors import UserError
from llmkit.tokenizer.bpe import train_bpe
from llmkit.tokenizer.config import DEFAULT_SPECIAL_TOKENS

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    texts = [f"User: {t.prompt}\nAssistant: {t.answer}\n" for t in tw.make_tasks("train", 300)]
    return train_bpe(texts, vocab_size=400, special_tokens=DEFAULT_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def examples(tok):
    cfg = SFTDataConfig(tinyworld_train=60)
    built, _ = build_sft_examples(load_sft_records(cfg, "train"), tok, cfg, max_length=64)
    return built


def test_three_formats_give_the_same_messages():
    cfg = SFTDataConfig(system_prompt="Answer exactly.")
    for task in tw.make_tasks("train", 7):
        expected = record_to_messages(tw.to_chat(task), cfg)
        assert [m["role"] for m in expected] == ["system", "user", "assistant"]
        assert record_to_messages(tw.to_alpaca(task), cfg) == expected
        assert record_to_messages(tw.to_prompt_completion(task), cfg) == expected
    own_system = {"instruction": "Add.", "input": "2 + 3", "output": "5", "system": "Be terse."}
    assert record_to_messages(own_system, cfg) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Add.\n\n2 + 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_custom_field_names_and_format_errors():
    cfg = SFTDataConfig(prompt_field="q", completion_field="a")
    assert record_to_messages({"q": "hi", "a": "yo"}, cfg)[1] == {"role": "assistant", "content": "yo"}
    with pytest.raises(UserError, match=r"f\.jsonl:3: cannot tell the record's format.*data\.format"):
        record_to_messages({"question": "hi"}, cfg, "f.jsonl:3")
    strict = SFTDataConfig(format="alpaca")
    with pytest.raises(UserError, match=r"no field 'output'.*data\.output_field"):
        record_to_messages({"instruction": "hi"}, strict, "f.jsonl:4")
    with pytest.raises(UserError, match="must be a string"):
        record_to_messages({"instruction": "hi", "output": 5}, strict)
    with pytest.raises(UserError, match=r"f\.jsonl:5: field 'output' is null; give it a string"):  # not "no field"
        record_to_messages({"instruction": "hi", "output": None}, strict, "f.jsonl:5")


@pytest.mark.parametrize("overrides, key", [
    ({"source": "web"}, "data.source"),
    ({"source": "files"}, "data.path"),
    ({"source": "hub"}, "data.hub_name"),
    ({"format": "sharegpt"}, "data.format"),
    ({"loss_on": "prompt"}, "data.loss_on"),
    ({"max_length": 1}, "data.max_length"),
    ({"chat_template": "nope"}, "data.chat_template"),
    ({"tinyworld_families": ["add", "poetry"]}, "data.tinyworld_families"),
    ({"val_fraction": 0.9}, "data.val_fraction"),
])
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        SFTDataConfig(**overrides)


def test_config_is_an_omegaconf_structured_config():
    merged = OmegaConf.merge(OmegaConf.structured(SFTDataConfig), {"tinyworld_families": ["add"], "max_length": 32})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, SFTDataConfig) and cfg.tinyworld_families == ["add"] and cfg.max_length == 32


def test_labels_are_shifted_and_mask_the_prompt(tok, examples):
    eos = tok.token_to_id("<|endoftext|>")
    for ex in examples:
        assert len(ex.input_ids) == len(ex.labels)
        trained = [t for t, label in enumerate(ex.labels) if label != IGNORE]
        assert trained and trained == list(range(trained[0], len(ex.labels) - 1))  # one answer span, before "\n"
        assert all(ex.labels[t] == ex.input_ids[t + 1] for t in trained)
        assert ex.labels[trained[-1]] == eos
        assert "<|im_start|>assistant\n" in tok.decode(ex.input_ids[: trained[0] + 1], skip_special_tokens=False)


def test_truncation_and_dropping_are_counted(tok):
    cfg = SFTDataConfig(tinyworld_train=14)
    records = load_sft_records(cfg, "train")
    full, stats = build_sft_examples(records, tok, cfg, max_length=64)
    assert stats.records == stats.examples == 14 and stats.truncated == stats.dropped == 0
    assert stats.tokens == sum(len(e.input_ids) for e in full)
    lengths = sorted(len(e.input_ids) for e in full)
    prompt_lengths = [e.labels.index(next(x for x in e.labels if x != IGNORE)) for e in full]
    cut = lengths[len(lengths) // 2] - 1  # about half the examples are cut
    cut_examples, cut_stats = build_sft_examples(records, tok, cfg, max_length=cut)
    assert cut_stats.truncated == sum(n > cut for n in lengths)
    assert cut_stats.dropped == sum(p >= cut for p in prompt_lengths)  # the answer begins beyond the cut
    assert cut_stats.examples == 14 - cut_stats.dropped and all(len(e.input_ids) <= cut for e in cut_examples)
    no_answer = [{"messages": [{"role": "user", "content": "hi"}]}]
    assert build_sft_examples(no_answer, tok, cfg, max_length=64)[1].dropped == 1


def test_file_records_hold_out_and_errors(tok, tmp_path):
    records = [tw.to_alpaca(t) for t in tw.make_tasks("train", 200)]
    tw.write_jsonl(records[:100], tmp_path / "a.jsonl")
    tw.write_jsonl([tw.to_prompt_completion(t) for t in tw.make_tasks("train", 200)[100:]], tmp_path / "b.jsonl")
    cfg = SFTDataConfig(source="files", path=str(tmp_path), val_fraction=0.2)
    train, val = load_sft_records(cfg, "train"), load_sft_records(cfg, "validation")
    assert len(train) + len(val) == 200 and 10 < len(val) < 70
    assert not {json.dumps(r) for _, r in train} & {json.dumps(r) for _, r in val}
    assert train[0][0].endswith("a.jsonl:1")
    examples, stats = build_sft_examples(train, tok, cfg, max_length=64)
    assert stats.examples == len(train)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "c.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{"text": "z"}\n')
    bad = SFTDataConfig(source="files", path=str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"c\.jsonl:2: cannot tell"):
        build_sft_examples(load_sft_records(bad, "train") + load_sft_records(bad, "validation"), tok, bad, max_length=64)
    with pytest.raises(UserError, match=r"c\.jsonl:2: .*no field 'prompt'.*data\.format"):
        load_sft_records(SFTDataConfig(source="files", path=str(tmp_path / "bad"), format="prompt_completion"), "train")


def test_tinyworld_records_are_disjoint_and_sized():
    cfg = SFTDataConfig(tinyworld_train=30, tinyworld_validation=10, tinyworld_families=["add", "sub"])
    train, val = load_sft_records(cfg, "train"), load_sft_records(cfg, "validation")
    assert len(train) == 30 and len(val) == 10
    prompts = lambda rs: {r["messages"][0]["content"] for _, r in rs}  # noqa: E731
    assert not prompts(train) & prompts(val)


def test_packing_keeps_every_example_once(examples):
    seq_len = 64
    rows = pack_examples(examples, seq_len, pad_id=1)
    assert rows == pack_examples(examples, seq_len, pad_id=1)  # deterministic
    assert len(rows) < len(examples) / 1.5  # rows really hold several examples
    found = Counter()
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.positions) == len(row.doc_ids) == seq_len
        starts = [t for t in range(seq_len) if t == 0 or row.doc_ids[t] != row.doc_ids[t - 1]]
        assert len(set(row.doc_ids)) == len(starts)  # each document is one contiguous run with its own id
        for a, b in zip(starts, starts[1:] + [seq_len], strict=True):
            assert row.positions[a:b] == list(range(b - a))  # positions restart per document
            run = (tuple(row.input_ids[a:b]), tuple(row.labels[a:b]))
            if all(x == IGNORE for x in run[1]):  # padding: only at the end, pad ids, its own doc id
                assert b == seq_len and set(run[0]) == {1}
            else:
                found[run] += 1
    assert found == Counter((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    with pytest.raises(UserError, match="data.max_length"):
        pack_examples([SFTExample([1] * 65, [2] * 65)], 64)


def test_collate(examples):
    batch = collate_packed(pack_examples(examples[:6], 64))
    assert set(batch) == {"input_ids", "labels", "positions", "doc_ids"}
    assert all(t.shape == batch["input_ids"].shape and t.dtype == torch.long for t in batch.values())
    padded = collate_padded(examples[:3], pad_id=1)
    width = max(len(e.input_ids) for e in examples[:3])
    assert padded["input_ids"].shape == padded["labels"].shape == padded["attention_mask"].shape == (3, width)
    for b, e in enumerate(examples[:3]):
        n = len(e.input_ids)
        assert padded["input_ids"][b, :n].tolist() == e.input_ids and padded["attention_mask"][b].sum() == n
        assert (padded["labels"][b, n:] == IGNORE).all() and (padded["input_ids"][b, n:] == 1).all()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_packed_loss_equals_unpacked_loss(tok, examples, style):
    """THE property: each example's summed loss is the same packed (doc_ids, positions) or alone."""
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    extra = dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=1, tie_embeddings=False, bias=False)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2, d_model=32,
                      **(extra if style == "llama" else {}))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    subset = examples[:12]
    rows = pack_examples(subset, 64, pad_id=1)
    assert len(rows) < len(subset)  # several examples share a row
    batch = collate_packed(rows)
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        assert not torch.allclose(model(batch["input_ids"]), logits, atol=1e-3)  # the test can see leaks
        token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                     reduction="none").view_as(batch["labels"])
        packed = Counter()
        for r, row in enumerate(rows):
            for t in range(64):
                if row.labels[t] != IGNORE:
                    packed[(r, row.doc_ids[t])] += token_loss[r, t].item()
        alone = []
        for e in subset:
            out = model(torch.tensor([e.input_ids]))
            alone.append(F.cross_entropy(out[0], torch.tensor(e.labels), ignore_index=IGNORE, reduction="sum"))
        padded = collate_padded(subset, pad_id=1)
        out = model(padded["input_ids"], attention_mask=padded["attention_mask"])
        padded_loss = F.cross_entropy(out.flatten(0, 1), padded["labels"].flatten(), ignore_index=IGNORE,
                                      reduction="none").view_as(padded["labels"]).sum(1)
    order = {(tuple(e.input_ids)): i for i, e in enumerate(subset)}
    for (r, doc), loss in packed.items():
        ids = tuple(x for x, d in zip(rows[r].input_ids, rows[r].doc_ids, strict=True) if d == doc)
        assert loss == pytest.approx(alone[order[ids]].item(), abs=1e-5)
    assert len(packed) == len(subset)
    torch.testing.assert_close(padded_loss, torch.stack(alone), atol=1e-5, rtol=0)
    total = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    assert total.item() == pytest.approx(sum(a.item() for a in alone), abs=1e-4)
