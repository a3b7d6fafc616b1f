"""The tiny world: deterministic, disjoint splits, correct answers, every output format."""

import json
import re
from collections import Counter

import pytest

from llmkit.data import tinyworld as tw


def recompute(task: tw.Task) -> str:
    """The answer worked out again from the prompt text alone."""
    p = task.prompt
    if task.family in ("add", "sub"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if task.family == "reverse":
        return re.fullmatch(r"Reverse the letters of (\w+)\.", p).group(1)[::-1]
    if task.family == "sort":
        return "".join(sorted(re.fullmatch(r"Sort the letters of (\w+)\.", p).group(1)))
    if task.family == "count":
        letter, word = re.fullmatch(r"How many times does (\w) occur in (\w+)\?", p).groups()
        return str(word.count(letter))
    if task.family == "upper":
        return re.fullmatch(r"Write (\w+) in capital letters\.", p).group(1).upper()
    assert task.family == "lookup"
    facts = dict(re.findall(r"(\w+) has (\d+) \w+\.", p))
    return facts[re.search(r"How many does (\w+) have\?", p).group(1)]


def test_deterministic_for_a_seed_and_seed_matters():
    assert tw.make_tasks("train", 50, seed=3) == tw.make_tasks("train", 50, seed=3)
    assert tw.make_tasks("train", 50, seed=3) != tw.make_tasks("train", 50, seed=4)
    assert tw.make_choice_items("test", 20, seed=1) == tw.make_choice_items("test", 20, seed=1)


def test_splits_are_disjoint_even_across_seeds():
    prompts = {s: {t.prompt for seed in (0, 1) for t in tw.make_tasks(s, 350, seed=seed)} for s in tw.SPLITS}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for split in tw.SPLITS:
        tasks = tw.make_tasks(split, 140, seed=0)
        assert len({t.prompt for t in tasks}) == len(tasks)  # distinct within a split
        assert all(t.split == split == tw.split_of(t.family, t.prompt) for t in tasks)


def test_balanced_short_and_correct():
    tasks = tw.make_tasks("validation", 7 * 30 + 3, seed=0)
    counts = Counter(t.family for t in tasks)
    assert set(counts) == set(tw.FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    for task in tasks:
        assert len(task.prompt) < 60 and 0 < len(task.answer) <= 10
        assert recompute(task) == task.answer, task
    only = tw.make_tasks("train", 10, families=["add", "upper"])
    assert {t.family for t in only} == {"add", "upper"}
    with pytest.raises(ValueError):
        tw.make_tasks("dev", 1)
    with pytest.raises(ValueError):
        tw.make_tasks("train", 1, families=["nope"])


def test_score_exact():
    assert tw.score_exact(" 432 \nUser: more", "432")
    assert tw.score_exact("a  b", "a b")
    assert not tw.score_exact("4321", "432")
    assert not tw.score_exact("", "432")
    assert not tw.score_exact("pevo", "PEVO")


def test_formats_and_jsonl(tmp_path):
    task = tw.make_tasks("train", 1)[0]
    chat = tw.to_chat(task, system="Be brief.")
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
    assert chat["messages"][1]["content"] == task.prompt and chat["messages"][2]["content"] == task.answer
    assert [m["role"] for m in tw.to_chat(task)["messages"]] == ["user", "assistant"]
    assert tw.to_alpaca(task) == {"instruction": task.prompt, "input": "", "output": task.answer}
    assert tw.to_prompt_completion(task) == {"prompt": task.prompt, "completion": task.answer}
    path = tw.write_jsonl([tw.to_alpaca(t) for t in tw.make_tasks("train", 5)], tmp_path / "sub" / "a.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(set(json.loads(line)) == {"instruction", "input", "output"} for line in lines)


@pytest.mark.parametrize("num_choices", [2, 4, 6])
def test_choice_items(num_choices):
    tasks = {t.prompt: t for t in tw.make_tasks("test", 70, seed=2)}
    items = tw.make_choice_items("test", 70, seed=2, num_choices=num_choices)
    assert Counter(i["family"] for i in items) == Counter(t.family for t in tasks.values())
    positions = Counter()
    for item in items:
        assert len(item["choices"]) == num_choices == len(set(item["choices"]))
        assert item["choices"][item["answer_index"]] == tasks[item["question"]].answer
        assert all(not tw.score_exact(c, tasks[item["question"]].answer)
                   for i, c in enumerate(item["choices"]) if i != item["answer_index"])
        positions[item["answer_index"]] += 1
    assert len(positions) == num_choices  # the answer is not always in the same place


def test_preference_pairs_and_rl_prompts():
    pairs = tw.make_preference_pairs("train", 70, seed=5)
    tasks = tw.make_tasks("train", 70, seed=5)
    for pair, task in zip(pairs, tasks, strict=True):
        assert pair["prompt"] == task.prompt and pair["chosen"] == task.answer
        assert pair["rejected"] != pair["chosen"] and pair["rejected"]
        assert pair["family"] == task.family
    prompts = tw.make_rl_prompts("validation", 14, seed=5)
    assert [p["answer"] for p in prompts] == [t.answer for t in tw.make_tasks("validation", 14, seed=5)]
    assert set(prompts[0]) == {"prompt", "answer", "family"}


def test_style_pairs_prefer_the_bare_answer_and_keep_the_splits():
    pairs = tw.make_preference_pairs("validation", 40, seed=2, style_fraction=0.25)
    style = [p for p in pairs if p["family"] == "style"]
    assert len(pairs) == 40 and len(style) == 10
    assert 0 < pairs.index(style[0]) and pairs.index(style[-1]) < 39  # spread among the correctness pairs
    for pair in style:
        assert pair["chosen"] in pair["rejected"] and pair["chosen"] != pair["rejected"]
        assert "\n" not in pair["rejected"]
        assert any(tw.split_of(f, pair["prompt"]) == "validation" for f in tw.FAMILIES)
    correctness = [p for p in pairs if p["family"] != "style"]
    assert correctness == tw.make_preference_pairs("validation", 30, seed=2)  # the same as without style pairs
    with pytest.raises(ValueError, match="style_fraction"):
        tw.make_preference_pairs("train", 10, style_fraction=1.0)
