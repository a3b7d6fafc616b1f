"""Preference data: the three record shapes, bad records named by file:line, tokenisation and collation."""

import json

import pytest

from llmkit.config.schema_align import PreferenceDataConfig
from llmkit.data import tinyworld as tw
from llmkit.data.preference import (
    PreferencePair,
    build_pair_examples,
    collate_pairs,
    encode_side,
    load_pairs,
    preference_sets,
    record_to_pair,
    split_hh,
)
from llmkit.errors import UserError
from llmkit.tokenizer.bpe import train_bpe
from llmkit.tokenizer.chat import encode_prompt

EOS = "<|endoftext|>"
USER = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tok():
    texts = [f"User: {t.prompt}\nAssistant: {t.answer}\n" for t in tw.make_tasks("train", 300)]
    return train_bpe(texts, vocab_size=400)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def files_cfg(path, **kw) -> PreferenceDataConfig:
    return PreferenceDataConfig(source="files", path=str(path), validation_path=str(path), **kw)


def test_pairs_shape_with_text_or_messages_prompt():
    cfg = PreferenceDataConfig()
    pair = record_to_pair({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}, cfg, "r")
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "5", "6")
    system = [{"role": "system", "content": "Be brief."}, *USER]
    pair = record_to_pair({"prompt": system, "chosen": "5", "rejected": "6"}, cfg, "r")
    assert pair.prompt == system
    pair = record_to_pair({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
                          PreferenceDataConfig(system_prompt="Be brief."), "r")
    assert pair.prompt == system


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 3?\n\nAssistant:"
    record = {"chosen": prefix + " It is 5.", "rejected": prefix + " It is 6, I think."}
    pair = record_to_pair(record, PreferenceDataConfig(), "r")
    assert pair.prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "What is 2 + 3?"}]
    assert (pair.chosen, pair.rejected) == ("It is 5.", "It is 6, I think.")
    # answers sharing their first words still split at the Assistant marker
    assert split_hh(prefix + " It is 5.", prefix + " It is five.", "r")[1:] == ("It is 5.", "It is five.")


def test_messages_lists_with_shared_history_or_separate_prompt():
    cfg = PreferenceDataConfig()
    chosen = [*USER, {"role": "assistant", "content": "5"}]
    rejected = [*USER, {"role": "assistant", "content": "6"}]
    pair = record_to_pair({"chosen": chosen, "rejected": rejected}, cfg, "r")
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "5", "6")
    pair = record_to_pair({"prompt": USER, "chosen": chosen[1:], "rejected": rejected[1:]}, cfg, "r")  # TRL style
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "5", "6")
    with pytest.raises(UserError, match="differ before their last answer"):
        record_to_pair({"chosen": chosen, "rejected": [{"role": "user", "content": "Other?"}, rejected[1]]}, cfg, "r")


@pytest.mark.parametrize(("line", "kw", "match"), [
    ({"prompt": "q", "chosen": "a"}, {}, "no field 'rejected'"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, {"format": "pairs"}, "field 'chosen' must be a string"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, {}, "field 'chosen' must be a string"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, {}, "share no"),
    ({"chosen": "just text", "rejected": "other text"}, {}, "cannot tell the record's shape"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, {},
     "must end with the assistant's answer"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, {}, "role 'robot'"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, line, kw, match):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, line])
    with pytest.raises(UserError, match=match) as error:
        load_pairs(files_cfg(path, **kw), "train")
    assert f"{path}:3" in str(error.value)


def test_invalid_json_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match=f"{path}:2"):
        load_pairs(files_cfg(path), "train")


def test_files_without_validation_hold_out_by_content(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(200)]
    cfg = PreferenceDataConfig(source="files", path=str(write_jsonl(tmp_path / "p.jsonl", records)), val_fraction=0.1)
    train, val = load_pairs(cfg, "train"), load_pairs(cfg, "validation")
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in val}


def test_sides_are_the_sft_tokens_cut_after_eos(tok):
    ids, mask = encode_side(tok, USER, "5", "chatml", EOS, "r")
    prompt = encode_prompt(tok, USER, "chatml", eos_token=EOS)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    assert all(mask[len(prompt):]) and ids[-1] == tok.token_to_id(EOS)
    assert tok.decode(ids[len(prompt):], skip_special_tokens=False) == "5<|im_end|><|endoftext|>"


def test_collate_puts_chosen_rows_first_and_pads_right(tok):
    pairs = [PreferencePair(USER, "5", "six or seven", "r0"), PreferencePair(USER, "55555", "6", "r1")]
    examples, stats = build_pair_examples(pairs, tok, "chatml", EOS, 64)
    batch = collate_pairs(examples, pad_id=1)
    assert batch["input_ids"].shape[0] == 4 and stats.pairs == 2
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(examples[0].chosen_ids), len(examples[1].chosen_ids), len(examples[0].rejected_ids),
                       len(examples[1].rejected_ids)]
    for row, n in enumerate(lengths):
        assert batch["input_ids"][row, n - 1] == tok.token_to_id(EOS) and (batch["input_ids"][row, n:] == 1).all()
        assert not batch["response_mask"][row, n:].any()


def test_identical_and_too_long_pairs_are_dropped_and_counted(tok):
    pairs = [PreferencePair(USER, "5", "5", "a"), PreferencePair(USER, "5" * 200, "6", "b"),
             PreferencePair(USER, "5", "6", "c")]
    examples, stats = build_pair_examples(pairs, tok, "chatml", EOS, 40)
    assert (len(examples), stats.identical, stats.too_long, stats.pairs) == (1, 1, 1, 1)


def test_tinyworld_is_the_default(tok):
    cfg = PreferenceDataConfig(tinyworld_train=40, tinyworld_validation=10)
    sets = preference_sets(cfg, tok, "chatml", EOS, 1, 128)
    assert sets.train.num_examples(0) == 40 and sets.val.num_examples(0) == 10
    batch = sets.train.collate([sets.train.example(0, i) for i in range(4)])
    assert batch["input_ids"].shape[0] == 8
