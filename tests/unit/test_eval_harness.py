"""Evaluation tasks and harness: strict YAML, few-shot from another split, choice log-likelihoods, generation."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from llmkit.data import tinyworld
from llmkit.errors import UserError
from llmkit.eval.examples import build_queries, load_examples
from llmkit.eval.harness import (
    Prompter,
    continuation_logprobs,
    cut_at_stops,
    encode_pair,
    results_table_rows,
    run_task,
    split_boundary,
)
from llmkit.eval.tasks import list_tasks, load_task
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.tokenizer.bpe import train_bpe

EOS, PAD = 0, 1  # train_bpe gives the default special tokens the first ids


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE with merges, trained on tiny-world text."""
    docs = [f"{t.prompt} {t.answer}" for t in tinyworld.make_tasks("train", 500, 0)] * 3
    return train_bpe(docs, 600)


@pytest.fixture(scope="module")
def chars():
    """A byte-level tokenizer without merges: one token per character."""
    return train_bpe(["abc"], 260)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


QA_YAML = """
kind: generate
source: {type: files, path: qa.jsonl}
prompt: "Q: {{ q }}\\nA:"
fields: {answer: a}
metrics: [exact_match, f1]
"""


# ---------------------------------------------------------------- YAML


def test_shipped_tasks_load():
    assert {"tinyworld_gen", "tinyworld_choice", "example_qa"} <= set(list_tasks())
    gen, choice, qa = load_task("tinyworld_gen"), load_task("tinyworld_choice"), load_task("example_qa")
    assert (gen.kind, gen.source.split, gen.metrics, gen.family_field) == ("generate", "test", ("exact_match",), "family")
    assert choice.kind == "choice" and choice.metrics == ("accuracy", "accuracy_norm")
    assert qa.source.type == "files" and qa.num_fewshot == 2 and len(load_examples(qa)) == 12


@pytest.mark.parametrize("text, match", [
    (QA_YAML + "promt: x\n", r"task\.yaml: unknown key 'promt'; did you mean prompt"),
    (QA_YAML + "generation: {max_new_token: 4}\n", r"unknown key 'generation.max_new_token'; did you mean .*max_new_tokens"),
    (QA_YAML + "num_fewshot: two\n", r"'num_fewshot' must be an integer, got str"),
    (QA_YAML.replace("kind: generate", "kind: choice"), r"metric 'exact_match' does not apply to kind=choice"),
    (QA_YAML.replace("prompt:", "# prompt:"), r"missing required key 'prompt'"),
    (QA_YAML + "prompt: '{{ q '\n", r"Jinja syntax error"),
    (QA_YAML + "num_fewshot: 2\n", r"num_fewshot > 0 needs fewshot.path"),
    ("kind: generate\nprompt: x\nsource: {type: tinyworld, split: test, n: 5}\nnum_fewshot: 1\nfewshot: {split: test}\n",
     r"fewshot.split='test' must differ from source.split"),
    ("kind: generate\nprompt: x\nsource: {type: tinyworld, split: test, n: 5, families: [add, mul]}\n", r"'mul'"),
    ("- not a mapping\n", r"must be a mapping"),
])
def test_strict_validation_names_file_and_key(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_task(write(tmp_path / "task.yaml", text))


def test_unknown_task_name_and_overrides():
    with pytest.raises(UserError, match="did you mean tinyworld_gen"):
        load_task("tinyworld_gne")
    task = load_task("tinyworld_gen", {"num_fewshot": 3, "source.n": 7, "chat": False})
    assert (task.num_fewshot, task.source.n, task.chat) == (3, 7, False)
    with pytest.raises(UserError, match=r"\(with overrides\): unknown key 'source.nn'; did you mean source.n"):
        load_task("tinyworld_gen", {"source.nn": 7})


def test_file_records_are_checked(tmp_path):
    write(tmp_path / "qa.jsonl", '{"q": "x?", "a": "y"}\n{"q": "z?"}\n')
    task = load_task(write(tmp_path / "task.yaml", QA_YAML))  # qa.jsonl is found beside the YAML
    with pytest.raises(UserError, match=r"qa.jsonl:2: record has no field 'a'"):
        load_examples(task)
    write(tmp_path / "qa.jsonl", '{"q": "x?", "a": "y"}\n')
    adds = load_task(write(tmp_path / "adds.yaml", QA_YAML.replace("{{ q }}", "{{ q + 1 }}")))  # fails at run time
    with pytest.raises(UserError, match=r"qa.jsonl:1: the prompt of .*adds.yaml failed on this record: TypeError"):
        build_queries(adds)


def test_hub_source_is_imported_lazily(tmp_path, monkeypatch):
    rows = {"validation": [{"q": f"q{i}", "a": str(i)} for i in range(5)], "train": [{"q": "s", "a": "t"}] * 3}
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: rows[split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    text = QA_YAML.replace("{type: files, path: qa.jsonl}", "{type: hub, name: me/qa, split: validation}")
    task = load_task(write(tmp_path / "t.yaml", text + "num_fewshot: 1\n"))
    queries = build_queries(task, limit=3)
    assert [q.references for q in queries] == [["0"], ["1"], ["2"]]
    assert queries[0].text == "Q: s\nA: t\n\nQ: q0\nA:" and queries[0].where == "hub:me/qa[validation] row 1"


# ---------------------------------------------------------------- few-shot


def test_fewshot_comes_from_the_other_split_and_never_the_query():
    task = load_task("tinyworld_gen", {"num_fewshot": 3, "chat": False, "source.n": 21})
    queries = build_queries(task)
    test_prompts = {t.prompt for t in tinyworld.make_tasks("test", 21, 0)}
    train = {t.prompt: t for t in tinyworld.make_tasks("train", task.fewshot.pool, task.fewshot.seed)}
    for query in queries:
        *shots, asked = query.text.split("\n\n")
        assert asked in test_prompts and len(shots) == 3
        for shot in shots:
            prompt, _, answer = shot.rpartition(" ")
            assert train[prompt].answer == answer and tinyworld.split_of(train[prompt].family, prompt) == "train"
            assert prompt != asked
    assert [q.text for q in build_queries(task)] == [q.text for q in queries]  # seeded
    reseeded = load_task("tinyworld_gen", {"num_fewshot": 3, "chat": False, "source.n": 21, "fewshot.seed": 9})
    assert [q.text for q in build_queries(reseeded)] != [q.text for q in queries]
    chat = build_queries(load_task("tinyworld_gen", {"num_fewshot": 2, "source.n": 3}))
    assert [m["role"] for m in chat[0].messages] == ["user", "assistant", "user", "assistant", "user"]


def test_fewshot_file_never_repeats_the_query(tmp_path):
    write(tmp_path / "qa.jsonl", '{"q": "same", "a": "1"}\n')
    write(tmp_path / "shots.jsonl", '{"q": "same", "a": "1"}\n{"q": "other", "a": "2"}\n')
    task = load_task(write(tmp_path / "t.yaml", QA_YAML + "num_fewshot: 1\nfewshot: {path: shots.jsonl, pool: 2}\n"))
    for _ in range(5):
        assert build_queries(task)[0].text == "Q: other\nA: 2\n\nQ: same\nA:"


# ---------------------------------------------------------------- multiple choice


def test_boundary_tokenisation(bpe):
    assert split_boundary("Answer: ", "yes") == ("Answer:", " yes")
    assert split_boundary("Answer:\n", "yes") == ("Answer:\n", "yes")
    ctx, cont = encode_pair(bpe, "Rev", "erse")
    assert bpe.encode("Reverse").ids != ctx + cont  # joint tokenisation would merge across the boundary
    assert (ctx, cont) == (bpe.encode("Rev").ids, bpe.encode("erse").ids)
    assert encode_pair(bpe, "What is 1 + 2? ", "3")[1] == bpe.encode(" 3").ids


class FixedLM(nn.Module):
    """Logits that are already log-probabilities, the same at every position."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logprobs = logprobs

    def forward(self, tokens):
        return self.logprobs.expand(*tokens.shape, -1).clone()


class CopyLM(nn.Module):
    """Predicts the character just before the latest '?': the right answer of 'b?' is 'b'."""

    def __init__(self, vocab: int, question_id: int):
        super().__init__()
        self.vocab, self.question_id = vocab, question_id

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                marks = [s for s in range(1, t + 1) if row[s] == self.question_id]
                if marks:
                    logits[b, t, row[marks[-1] - 1]] = 8.0
        return logits


def test_continuation_logprobs_by_hand_and_batching(bpe):
    logprobs = torch.randn(bpe.get_vocab_size()).log_softmax(-1)
    requests = [([5, 6, 7], [8, 9]), ([5], [10]), ([4, 4, 4, 4, 4], [3, 2, 11])]
    got = continuation_logprobs(FixedLM(logprobs), requests, batch_size=2)
    assert got == pytest.approx([float(logprobs[c].sum()) for _, c in requests], abs=1e-5)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()
    batched = continuation_logprobs(model, requests, batch_size=3, pad_id=PAD)
    for (ctx, cont), value in zip(requests, batched):  # each request alone, by hand
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = model(seq[:, :-1])[0].log_softmax(-1)
        expected = sum(float(lp[len(ctx) - 1 + i, tok]) for i, tok in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)


def choice_task(tmp_path: Path, items: list[tuple[str, list[str], int]], target_prefix: str = "") -> Path:
    lines = [f'{{"q": "{q}", "options": {choices}, "label": {label}}}'.replace("'", '"') for q, choices, label in items]
    write(tmp_path / "mc.jsonl", "\n".join(lines) + "\n")
    write(tmp_path / "shots.jsonl", '{"q": "d", "options": ["a", "d"], "label": 1}\n'
                                    '{"q": "e", "options": ["e", "b"], "label": 0}\n')
    return write(tmp_path / "mc.yaml", f"""
kind: choice
source: {{type: files, path: mc.jsonl}}
prompt: "{{{{ q }}}}?"
target_prefix: "{target_prefix}"
fields: {{choices: options, answer_index: label, family: q}}
fewshot: {{path: shots.jsonl}}
""")


@pytest.mark.parametrize("shots", [0, 2])
def test_choice_scoring_picks_what_the_model_prefers(tmp_path, chars, shots):
    path = choice_task(tmp_path, [("b", ["a", "b", "c"], 1), ("c", ["c", "a"], 0), ("a", ["b", "c", "a"], 2)])
    model = CopyLM(chars.get_vocab_size(), chars.token_to_id("?"))
    result = run_task(model, chars, load_task(path, {"num_fewshot": shots}), eos_id=EOS, pad_id=PAD, batch_size=2)
    assert result.metrics["accuracy"].value == 1.0 and result.metrics["accuracy"].n == 3
    assert set(result.families) == {"a", "b", "c"} and result.num_fewshot == shots
    assert result.samples[0]["predicted"] == 1 and result.samples[0]["prompt"].endswith("b?")


def test_raw_and_length_normalised_accuracy_differ(tmp_path, chars):
    # p(x) = e^-3, p(y) = e^-1.2: "x" sums to -3.0 (-3.0 per char), "yyy" to -3.6 (-1.2 per char)
    V = chars.get_vocab_size()
    x, y = chars.token_to_id("x"), chars.token_to_id("y")
    probs = torch.full((V,), (1 - torch.tensor([-3.0, -1.2]).exp().sum().item()) / (V - 2))
    probs[x], probs[y] = torch.tensor(-3.0).exp(), torch.tensor(-1.2).exp()
    path = choice_task(tmp_path, [("q", ["x", "yyy"], 1)])
    result = run_task(FixedLM(probs.log()), chars, load_task(path), eos_id=EOS, pad_id=PAD)
    assert result.samples[0]["logprobs"] == pytest.approx([-3.0, -3.6], abs=1e-3)
    assert (result.metrics["accuracy"].value, result.metrics["accuracy_norm"].value) == (0.0, 1.0)


def test_a_plain_choice_follows_the_target_prefix_and_is_normalised_by_its_own_length(tmp_path, chars):
    """The continuation is target_prefix + choice, as the shots show answers (it was the bare choice: 'Answer:Paris');
    accuracy_norm divides by the choice's length (lm-eval), not the prefix's too."""
    # per token: ' ' e^-4, 'x' e^-0.5, 'y' e^-2. ' x' sums to -4.5, ' yyy' to -10: raw picks x; per character of
    # the choice -4.5 vs -3.33 picks yyy; per character of ' x' / ' yyy' it would be -2.25 vs -2.5: x
    V = chars.get_vocab_size()
    ids = [chars.token_to_id(t) for t in ("Ġ", "x", "y")]
    wanted = torch.tensor([-4.0, -0.5, -2.0])
    probs = torch.full((V,), (1 - wanted.exp().sum().item()) / (V - 3))
    probs[ids] = wanted.exp()
    path = choice_task(tmp_path, [("q", ["x", "yyy"], 1)], target_prefix=" ")
    result = run_task(FixedLM(probs.log()), chars, load_task(path), eos_id=EOS, pad_id=PAD)
    assert result.samples[0]["logprobs"] == pytest.approx([-4.5, -10.0], abs=1e-3)
    assert (result.metrics["accuracy"].value, result.metrics["accuracy_norm"].value) == (0.0, 1.0)
    query = build_queries(load_task(path, {"num_fewshot": 1}))[0]
    assert query.text.startswith(("d? d", "e? e")) and query.text.endswith("q?")  # the shot's answer after the prefix
    assert Prompter(chars, EOS, None).choice_requests(query, " ")[1] == [" x", " yyy"]


def test_chat_choice_continuation_follows_the_template(bpe):
    query = build_queries(load_task("tinyworld_choice", {"source.n": 1}))[0]
    for template, prefix in (("chatml", ""), ("simple", " ")):
        prompter = Prompter(bpe, EOS, template)
        requests, texts = prompter.choice_requests(query)
        assert texts == [prefix + c for c in query.choices]
        assert all(ctx == prompter.ids(query) and cont == bpe.encode(t).ids for (ctx, cont), t in zip(requests, texts))


# ---------------------------------------------------------------- generation


class OracleLM(nn.Module):
    """Answers each tiny-world test question it finds in its prompt (then eos): the generate interface."""

    def __init__(self, tokenizer, questions: dict[str, str], suffix: str = ""):
        super().__init__()
        self.tokenizer, self.questions, self.suffix = tokenizer, questions, suffix
        self.cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), block_size=256, n_layer=1, n_head=1, d_model=8)
        self.tok_emb = nn.Embedding(1, 1)
        self.lm_head = nn.Identity()

    def logits(self, hidden):
        return hidden

    def new_cache(self, batch: int, total: int):
        return types.SimpleNamespace(targets=[], step=0)

    def forward(self, tokens, *, positions=None, attention_mask=None, cache=None, return_hidden=False):
        out = torch.full((*tokens.shape, self.cfg.vocab_size), -10.0)
        if not cache.targets:  # the prefill: read each prompt, plan its answer
            if attention_mask is None:  # generate passes None while no key is padding
                attention_mask = torch.ones_like(tokens)
            for row, mask in zip(tokens.tolist(), attention_mask.tolist()):
                text = self.tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=False)
                asked = max((q for q in self.questions if q in text), key=text.rfind)
                cache.targets.append(self.tokenizer.encode(" " + self.questions[asked] + self.suffix).ids + [EOS])
        for b, target in enumerate(cache.targets):
            out[b, -1, target[min(cache.step, len(target) - 1)]] = 10.0
        cache.step += 1
        return out


class CoinLM(OracleLM):
    """Like OracleLM, but its first answer token is the right one or "#" with equal odds."""

    def forward(self, tokens, *, positions=None, attention_mask=None, cache=None, return_hidden=False):
        first = not cache.targets
        out = super().forward(tokens, positions=positions, attention_mask=attention_mask, cache=cache)
        if first:
            out[:, -1, self.tokenizer.token_to_id("#")] = 10.0
        return out


def test_several_sampled_answers_per_question_are_averaged(bpe):
    answers = {t.prompt: t.answer for t in tinyworld.make_tasks("test", 14, 0)}
    one = run_task(CoinLM(bpe, answers), bpe, load_task("tinyworld_gen_sampled", {"source.n": 14, "generation.samples": 1}), eos_id=EOS,
                   pad_id=PAD, batch_size=5)
    assert one.metrics["exact_match"].interval == "wilson"  # one draw: every score is 0 or 1
    many = run_task(CoinLM(bpe, answers), bpe, load_task("tinyworld_gen_sampled", {"source.n": 14,
                    "generation.samples": 32}), eos_id=EOS, pad_id=PAD, batch_size=64)
    value = many.metrics["exact_match"]
    assert value.n == 14 and value.interval == "bootstrap" and abs(value.value - 0.5) < 0.1
    assert value.low < value.value < value.high and len(many.samples) == 5
    with pytest.raises(UserError, match="generation.samples=4 needs generation.temperature > 0"):
        load_task("tinyworld_gen", {"generation.samples": 4})


@pytest.mark.parametrize("chat", [True, False])
def test_a_model_that_knows_the_answers_scores_100(bpe, chat):
    task = load_task("tinyworld_gen", {"source.n": 14, "chat": chat, "num_fewshot": 1})
    answers = {t.prompt: t.answer for t in tinyworld.make_tasks("test", 14, 0)}
    model = OracleLM(bpe, answers, suffix="" if chat else "\nand more")  # plain: cut at the newline
    result = run_task(model, bpe, task, eos_id=EOS, pad_id=PAD, batch_size=4)
    assert result.metrics["exact_match"].value == 1.0 and result.n == 14
    assert {f: m["exact_match"].n for f, m in result.families.items()} == {f: 2 for f in tinyworld.FAMILIES}
    assert result.samples[0]["prediction"] == result.samples[0]["references"][0]


def test_generation_end_to_end_with_a_tiny_random_model(bpe):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=bpe.get_vocab_size(), block_size=256, n_layer=1, n_head=2, d_model=32))
    gen = run_task(model, bpe, load_task("tinyworld_gen"), eos_id=EOS, pad_id=PAD, batch_size=8, limit=10,
                   chat_template="simple")
    assert gen.n == 10 and set(gen.metrics) == {"exact_match"} and len(gen.samples) == 5
    assert gen.samples[0]["prompt"] == "User: What is 692 + 960?\nAssistant:"
    assert all(isinstance(s["prediction"], str) for s in gen.samples)
    qa = run_task(model, bpe, load_task("example_qa", {"generation.temperature": 1.0}), eos_id=EOS, pad_id=PAD,
                  batch_size=5)
    again = run_task(model, bpe, load_task("example_qa", {"generation.temperature": 1.0}), eos_id=EOS, pad_id=PAD,
                     batch_size=5)
    assert [s["prediction"] for s in qa.samples] == [s["prediction"] for s in again.samples]  # seeded sampling
    assert set(qa.metrics) == {"exact_match", "f1"} and set(qa.families) == {"nature", "numbers", "words"}
    assert qa.to_dict()["metrics"]["f1"]["n"] == 12
    columns, rows = results_table_rows({"a": [gen, qa], "b": [qa]})
    assert columns == ["task", "metric", "family", "a", "b"]
    assert rows[0][:3] == ["tinyworld_gen", "exact_match", "all"] and rows[0][4] == "-"
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] n=12", rows[8][3]) and rows[8][0] == "example_qa (2-shot)"


def test_clear_errors_before_running(bpe):
    model = Transformer(ModelConfig(vocab_size=bpe.get_vocab_size(), block_size=24, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(UserError, match=r"more than the model's context of 24 .*lower num_fewshot \(now 2\)"):
        run_task(model, bpe, load_task("example_qa"), eos_id=EOS, pad_id=PAD, limit=2)
    with pytest.raises(UserError, match="no chat template was given"):
        run_task(model, bpe, load_task("tinyworld_gen", {"chat_template": None}), eos_id=EOS, pad_id=PAD, limit=2)
    assert cut_at_stops("12\n\nQ: 3 ###", ["###", "\n"]) == "12"
