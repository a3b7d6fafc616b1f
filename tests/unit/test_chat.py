"""Chat templates: built-in renderings, assistant masks (assistant/last/all), HF-style templates, validation."""

import json

import pytest
from tokenizers import Tokenizer

from llmkit.data import tinyworld as tw
from llmkit.errors import UserError
from llmkit.tokenizer.bpe import train_bpe
from llmkit.tokenizer.chat import IGNORE_INDEX, encode_chat, encode_prompt, render_prompt, resolve_template

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|pad|>", "<|im_start|>", "<|im_end|>"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse abc."},
    {"role": "assistant", "content": "cba"},
]
# The Hugging Face ChatML template as it appears in tokenizer_config.json files, with eos after each assistant turn.
HF_TEMPLATE = (
    "{% for message in messages %}\n"  # trim_blocks drops the newline after a block tag, as in transformers
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{{ '\\n' }}"
    "{% endfor %}\n"
    "    {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"  # lstrip_blocks
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A tiny byte-level BPE (llmkit's trainer) on tiny-world text, with the chat special tokens."""
    texts = [f"User: {t.prompt}\nAssistant: {t.answer}\n" for t in tw.make_tasks("train", 300)]
    return train_bpe(texts, vocab_size=400, special_tokens=SPECIALS)


def trained_text(tok: Tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    runs += [current] if current else []
    return [tok.decode(run, skip_special_tokens=False) for run in runs]


def test_chatml_renders_as_documented():
    text = render_prompt(CONVERSATION, "chatml", add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|><|endoftext|>\n<|im_start|>user\nReverse abc.<|im_end|>\n"
        "<|im_start|>assistant\ncba<|im_end|><|endoftext|>\n"
    )
    assert render_prompt(CONVERSATION[:2], "chatml").endswith("What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # eos that is <|im_end|> itself is not doubled
    assert "<|im_end|><|im_end|>" not in render_prompt(CONVERSATION, "chatml", False, eos_token="<|im_end|>")


def test_simple_renders_as_documented():
    text = render_prompt(CONVERSATION, "simple", add_generation_prompt=False, eos_token="</s>")
    assert text == "System: Be brief.\nUser: What is 2 + 3?\nAssistant: 5</s>\nUser: Reverse abc.\nAssistant: cba</s>\n"
    assert render_prompt(CONVERSATION[1:2], "simple") == "User: What is 2 + 3?\nAssistant:"


@pytest.mark.parametrize("template, expected", [
    ("chatml", ["5<|im_end|><|endoftext|>", "cba<|im_end|><|endoftext|>"]),
    ("simple", [" 5<|endoftext|>", " cba<|endoftext|>"]),
])
def test_labels_cover_exactly_assistant_turns_and_eos(tok, template, expected):
    ids, labels = encode_chat(tok, CONVERSATION, template, eos_token=EOS)
    assert len(ids) == len(labels)
    assert tok.decode(ids, skip_special_tokens=False) == render_prompt(CONVERSATION, template, False)
    assert trained_text(tok, ids, labels) == expected
    assert labels.count(tok.token_to_id(EOS)) == 2  # eos is one special id per assistant turn, trained


def test_loss_on_last_and_all(tok):
    ids, last = encode_chat(tok, CONVERSATION, "chatml", eos_token=EOS, loss_on="last")
    assert trained_text(tok, ids, last) == ["cba<|im_end|><|endoftext|>"]
    ids_all, everything = encode_chat(tok, CONVERSATION, "chatml", eos_token=EOS, loss_on="all")
    assert ids_all == ids and everything == ids
    with pytest.raises(UserError, match="loss_on"):
        encode_chat(tok, CONVERSATION, "chatml", eos_token=EOS, loss_on="prompt")


def test_prompt_tokens_match_training(tok):
    """At inference the model sees exactly the tokens that preceded the answer in training."""
    for template in ("chatml", "simple"):
        ids, labels = encode_chat(tok, CONVERSATION, template, eos_token=EOS, loss_on="last")
        prompt = encode_prompt(tok, CONVERSATION[:-1], template, eos_token=EOS)
        assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
        assert labels[len(prompt) - 1] == IGNORE_INDEX


def test_pad_equal_to_eos_still_trains_eos(tok):
    ids, labels = encode_chat(tok, CONVERSATION[1:3], "simple", eos_token="<|pad|>")
    assert trained_text(tok, ids, labels) == [" 5<|pad|>"]


def test_hf_template_string_and_tokenizer_config(tok, tmp_path):
    text = render_prompt(CONVERSATION, HF_TEMPLATE, add_generation_prompt=False)
    assert text == render_prompt(CONVERSATION, "chatml", add_generation_prompt=False)
    assert render_prompt(CONVERSATION[:2], HF_TEMPLATE) == render_prompt(CONVERSATION[:2], "chatml")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": HF_TEMPLATE, "eos_token": EOS}))
    for ref in (str(config), str(tmp_path)):
        assert resolve_template(ref) == HF_TEMPLATE
    ids, labels = encode_chat(tok, CONVERSATION, str(config), eos_token=EOS)
    assert trained_text(tok, ids, labels) == ["5<|im_end|><|endoftext|>", "cba<|im_end|><|endoftext|>"]
    raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}x"
    with pytest.raises(UserError, match="must start with user"):
        render_prompt(CONVERSATION, raising)


def test_templates_that_cannot_teach_stopping_are_refused(tok, tmp_path):
    no_eos = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="eos token"):
        encode_chat(tok, CONVERSATION, no_eos, eos_token=EOS)
    not_prefix = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{{ eos_token }}{% endfor %}"
    with pytest.raises(UserError, match="prefix by prefix"):
        encode_chat(tok, CONVERSATION, not_prefix, eos_token=EOS)
    with pytest.raises(UserError, match="not a built-in name"):
        resolve_template("nonexistent-template")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="has no chat template"):
        resolve_template(str(tmp_path))
    with pytest.raises(UserError, match="syntax error"):
        render_prompt(CONVERSATION, "{% for m in messages %}")
    with pytest.raises(UserError, match="chat template failed on data.jsonl:3: TypeError"):  # an error at run time
        encode_chat(tok, CONVERSATION, "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", eos_token=EOS,
                    location="data.jsonl:3")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first"),
])
def test_bad_messages_raise_user_error(tok, messages, match):
    with pytest.raises(UserError, match=match) as info:
        encode_chat(tok, messages, "chatml", eos_token=EOS, location="data/train.jsonl:7")
    assert "data/train.jsonl:7" in str(info.value)


def test_special_tokens_in_content_and_unknown_eos_raise(tok):
    injected = [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(UserError, match="special token"):
        encode_chat(tok, injected, "chatml", eos_token=EOS)
    with pytest.raises(UserError, match="not in the tokenizer"):
        encode_chat(tok, CONVERSATION, "chatml", eos_token="</s>")


@pytest.mark.parametrize("template", ["chatml", "simple", HF_TEMPLATE], ids=["chatml", "simple", "hf_string"])
def test_rendering_matches_transformers(tok, template):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                              chat_template=resolve_template(template))
    for messages in (CONVERSATION, CONVERSATION[:4]):
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_prompt(messages, template, gen) == expected


def test_a_template_from_a_file_or_an_hf_directory_is_kept_as_its_source_with_the_directorys_bos(tmp_path):
    """sft/peft/dpo/reward record a template given by path as its Jinja source (a relative path broke generate from
    another directory); an HF directory's template that uses bos_token gets the directory's bos, as in transformers."""
    from llmkit.commands.common import kept_template
    from llmkit.tokenizer.chat import BOS_SETTING

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert kept_template(str(tmp_path / "t.jinja")) == (tmp_path / "t.jinja").read_text()
    assert kept_template("chatml") == "chatml" and kept_template(None) is None
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "chat_template": "unused"}))
    (hf / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    source = BOS_SETTING.format('"<s>"') + (hf / "chat_template.jinja").read_text()
    assert resolve_template(str(hf)) == source == kept_template(str(hf / "tokenizer_config.json"))
    assert render_prompt([{"role": "user", "content": "hi"}], source, add_generation_prompt=False) == "<s>hi"
