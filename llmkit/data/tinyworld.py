"""The tiny world: families of small tasks with exact answers, generated from a seed.

Each family (addition, subtraction, reversing/sorting/counting letters, uppercasing, lookup of a
fact stated in the prompt) has short prompts (< 60 characters) and short answers, so a model of a
few million parameters can learn them in minutes on a CPU and progress is measurable by exact match.

Splits never overlap: a question's split is a function of its text alone (a SHA-1 of
``family:prompt``: 80% train, 10% validation, 10% test), so the same question lands in the same
split whatever the seed or the number of examples asked for. The seed only chooses which questions
are drawn; within a split prompts are distinct. Words are made-up pronounceable strings (alternating
consonants and vowels, 3-5 letters) so the question space is large and answers cannot be recalled
from pretraining text. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("add", "sub", "reverse", "sort", "count", "upper", "lookup")
SPLITS = ("train", "validation", "test")
_SPLIT_BOUNDS = (80, 90)  # hash bucket (of 100) below 80: train, below 90: validation, else test
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jay", "Kim", "Lou",
          "Max", "Ned", "Pam", "Rex", "Sue", "Tom", "Una", "Vic")
_ITEMS = ("pens", "cups", "eggs", "hats", "keys", "cats", "dogs", "figs", "jars", "maps", "books", "coins")
_MAX_TRIES_PER_TASK = 1000  # rejection sampling; validation/test keep ~1 draw in 10


@dataclass(frozen=True)
class Task:
    """One question with its exact answer; ``split`` is where its prompt belongs."""

    family: str
    prompt: str
    answer: str
    split: str


def split_of(family: str, prompt: str) -> str:
    """The split a question belongs to, from a hash of its canonical text (seed-independent)."""
    bucket = int(hashlib.sha1(f"{family}:{prompt}".encode()).hexdigest(), 16) % 100
    if bucket < _SPLIT_BOUNDS[0]:
        return "train"
    return "validation" if bucket < _SPLIT_BOUNDS[1] else "test"


def _word(rng: random.Random) -> str:
    """A made-up word of 3-5 letters alternating consonants and vowels."""
    length = rng.randint(3, 5)
    start = rng.randrange(2)
    pools = (_CONSONANTS, _VOWELS)
    return "".join(rng.choice(pools[(start + i) % 2]) for i in range(length))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"What is {a} + {b}?", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Reverse the letters of {word}.", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Sort the letters of {word}.", "".join(sorted(word))


def _count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng) + _word(rng)  # longer words make counts above 1 common
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice([c for c in _VOWELS if c not in word] or word)
    return f"How many times does {letter} occur in {word}?", str(word.count(letter))


def _upper(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"Write {word} in capital letters.", word.upper()


def _lookup(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x, y = rng.sample(range(2, 10), 2)
    asked, answer = (first, x) if rng.random() < 0.5 else (second, y)
    return f"{first} has {x} {item}. {second} has {y} {item}. How many does {asked} have?", str(answer)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sub": _sub, "reverse": _reverse, "sort": _sort,
    "count": _count, "upper": _upper, "lookup": _lookup,
}
assert set(_GENERATORS) == set(FAMILIES)


def _check_args(split: str, families: Iterable[str] | None) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    chosen = list(dict.fromkeys(FAMILIES if families is None else families))
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown or not chosen:
        raise ValueError(f"unknown or no task families {unknown}; choose from {', '.join(FAMILIES)}")
    return chosen


def _family_tasks(family: str, split: str, n: int, seed: int) -> list[Task]:
    """n distinct tasks of one family that belong to ``split``."""
    rng = random.Random(f"tinyworld:{seed}:{family}:{split}")
    seen: set[str] = set()
    tasks: list[Task] = []
    for _ in range(n * _MAX_TRIES_PER_TASK):
        if len(tasks) == n:
            break
        prompt, answer = _GENERATORS[family](rng)
        if prompt not in seen and split_of(family, prompt) == split:
            seen.add(prompt)
            tasks.append(Task(family, prompt, answer, split))
    if len(tasks) < n:
        raise ValueError(f"could only draw {len(tasks)} distinct {family!r} tasks for {split}, asked for {n}")
    return tasks


def make_tasks(split: str, n: int, seed: int = 0, families: Iterable[str] | None = None) -> list[Task]:
    """n tasks of ``split``, balanced across ``families`` (all by default) and interleaved in turn."""
    chosen = _check_args(split, families)
    per_family = [n // len(chosen) + (i < n % len(chosen)) for i in range(len(chosen))]
    pools = [_family_tasks(f, split, k, seed) for f, k in zip(chosen, per_family, strict=True)]
    return [pools[i % len(chosen)][i // len(chosen)] for i in range(n)]


def normalize(text: str) -> str:
    """The text up to the first newline, with runs of whitespace collapsed and the ends stripped."""
    return " ".join(text.split("\n", 1)[0].split())


def score_exact(prediction: str, answer: str) -> bool:
    """Whether a model's output matches the answer exactly (first line, whitespace normalised)."""
    return normalize(prediction) == normalize(answer)


# ---- instruction formats -------------------------------------------------------------------


def to_chat(task: Task, system: str | None = None) -> dict:
    """``{"messages": [system?, user, assistant]}``."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.answer}]
    return {"messages": messages}


def to_alpaca(task: Task) -> dict:
    """``{"instruction", "input", "output"}`` (the whole prompt is the instruction; input is empty)."""
    return {"instruction": task.prompt, "input": "", "output": task.answer}


def to_prompt_completion(task: Task) -> dict:
    """``{"prompt", "completion"}``."""
    return {"prompt": task.prompt, "completion": task.answer}


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8), creating parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ---- wrong answers: multiple choice, preference pairs ---------------------------------------


def _near_numbers(answer: str, rng: random.Random, deltas: list[int]) -> list[str]:
    """Off-by-some numbers, shuffled, never negative."""
    value = int(answer)
    deltas = list(deltas)
    rng.shuffle(deltas)
    return [str(value + d) for d in deltas if value + d >= 0]


def _shuffled(word: str, rng: random.Random) -> str:
    letters = list(word)
    rng.shuffle(letters)
    return "".join(letters)


def _plausible_wrong(task: Task, rng: random.Random) -> list[str]:
    """Wrong answers a model could plausibly give, most plausible first (may repeat or be right)."""
    if task.family in ("add", "sub"):
        return _near_numbers(task.answer, rng, [1, -1, 10, -10, 100, -100, 2, -2])
    if task.family == "count":
        return _near_numbers(task.answer, rng, [1, -1, 2, -2, 3])
    if task.family == "lookup":
        other = [w for w in task.prompt.split() if w.isdigit() and w != task.answer]
        return other + _near_numbers(task.answer, rng, [1, -1, 2, -2])
    word = task.prompt.split()[-1].rstrip(".") if task.family in ("reverse", "sort") else task.prompt.split()[1]
    if task.family == "reverse":
        return [word, word[-2::-1] + word[-1], _shuffled(word, rng), "".join(sorted(word))]
    if task.family == "sort":
        return ["".join(sorted(word, reverse=True)), word, _shuffled(word, rng), _shuffled(word, rng)]
    return [word, word.capitalize(), word[::-1].upper(), word.upper()[:-1]]  # upper


def _mutate(text: str, rng: random.Random) -> str:
    """The answer with one character changed: a fallback that always yields new strings."""
    i = rng.randrange(len(text))
    pool = "0123456789" if text[i].isdigit() else (_CONSONANTS + _VOWELS).upper() if text[i].isupper() else _CONSONANTS + _VOWELS
    return text[:i] + rng.choice(pool.replace(text[i], "")) + text[i + 1:]


def wrong_answers(task: Task, k: int, rng: random.Random) -> list[str]:
    """k distinct wrong answers for a task, plausible ones first."""
    wrong: list[str] = []
    candidates = iter(_plausible_wrong(task, rng))
    for _ in range(100 * k + 100):
        if len(wrong) == k:
            return wrong
        candidate = next(candidates, None) or _mutate(task.answer, rng)
        if candidate != task.answer and candidate not in wrong and normalize(candidate) == candidate:
            wrong.append(candidate)
    raise ValueError(f"could not find {k} distinct wrong answers for {task.prompt!r}; ask for fewer choices")


def make_choice_items(split: str, n: int, seed: int = 0, num_choices: int = 4,
                      families: Iterable[str] | None = None) -> list[dict]:
    """Multiple-choice items ``{question, choices, answer_index, family}`` with plausible distractors."""
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    rng = random.Random(f"tinyworld-choices:{seed}:{split}")
    items = []
    for task in make_tasks(split, n, seed, families):
        choices = wrong_answers(task, num_choices - 1, rng) + [task.answer]
        rng.shuffle(choices)
        items.append({"question": task.prompt, "choices": choices,
                      "answer_index": choices.index(task.answer), "family": task.family})
    return items


_CHATTER = ("The answer is {}.", "{}. Let me know if you need anything else!", "Hmm, I think {}", "Sure! {}",
            "{} {}", "Answer: {}")


def _chatty(answer: str, rng: random.Random) -> str:
    """The right answer wrapped in filler: what the style preference rejects (one line, never the bare answer)."""
    return rng.choice(_CHATTER).format(answer, answer)


def make_preference_pairs(split: str, n: int, seed: int = 0, families: Iterable[str] | None = None,
                          style_fraction: float = 0.0) -> list[dict]:
    """Preference pairs ``{prompt, chosen, rejected, family}``.

    Correctness pairs: the right answer against a plausible wrong one (``family`` is the task's). A
    ``style_fraction`` of the n pairs instead prefers the bare right answer to the same answer wrapped
    in chatter ("The answer is 42.", ...), with ``family`` "style"; they are spread evenly among the rest.
    """
    if not 0.0 <= style_fraction < 1.0:
        raise ValueError(f"style_fraction must be in [0, 1), got {style_fraction}")
    rng = random.Random(f"tinyworld-pairs:{seed}:{split}")
    n_style = round(n * style_fraction)
    pairs = [{"prompt": t.prompt, "chosen": t.answer, "rejected": wrong_answers(t, 1, rng)[0], "family": t.family}
             for t in make_tasks(split, n - n_style, seed, families)]
    style_rng = random.Random(f"tinyworld-style:{seed}:{split}")
    for i, t in enumerate(make_tasks(split, n_style, seed + 1, families)):
        pairs.insert(round((i + 0.5) * n / n_style), {"prompt": t.prompt, "chosen": t.answer,
                                                      "rejected": _chatty(t.answer, style_rng), "family": "style"})
    return pairs


def make_rl_prompts(split: str, n: int, seed: int = 0, families: Iterable[str] | None = None) -> list[dict]:
    """Prompts with checkable answers for RL: ``{prompt, answer, family}`` (reward: :func:`score_exact`)."""
    return [{"prompt": t.prompt, "answer": t.answer, "family": t.family} for t in make_tasks(split, n, seed, families)]
