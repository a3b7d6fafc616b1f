"""A task's examples and queries: records from the tiny world, files or the hub; few-shot draws; prompts.

The task itself (its YAML and validation) is `llmkit.eval.tasks`.
"""

from __future__ import annotations

import glob
import random
from pathlib import Path

from llmkit.errors import UserError
from llmkit.eval.tasks import (
    Example,
    Query,
    TaskSpec,
    compile_template,
    required_fields,
    show_value,
)


def _resolve(task: TaskSpec, spec: str) -> str:
    """A data path relative to the task's folder when something is there, else as given (the cwd)."""
    path = Path(spec).expanduser()
    if path.is_absolute():
        return str(path)
    beside = task.path.parent / path
    return str(beside) if beside.exists() or glob.glob(str(beside)) else str(path)


def _tinyworld(task: TaskSpec, split: str, n: int, seed: int) -> list[Example]:
    from llmkit.data import tinyworld

    src = task.source
    if task.kind == "choice":
        records = tinyworld.make_choice_items(split, n, seed, src.num_choices, src.families)
    else:
        records = [{"prompt": t.prompt, "answer": t.answer, "family": t.family}
                   for t in tinyworld.make_tasks(split, n, seed, src.families)]
    return [Example(r, f"tinyworld {split} #{i}") for i, r in enumerate(records)]


def _files(task: TaskSpec, spec: str, key: str, limit: int | None) -> list[Example]:
    from llmkit.data.sources import iter_records

    examples = []
    hint = f"fix the records or set fields.* in {task.path}"
    for rec in iter_records(_resolve(task, spec), required_fields(task), string_fields=[],
                            path_key=f"{key} of {task.path}", field_hint=hint):
        examples.append(Example(rec.data, rec.where))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _hub(task: TaskSpec, split: str, limit: int | None) -> list[Example]:
    import datasets

    src = task.source
    where = f"hub:{src.name}" + (f"/{src.config}" if src.config else "") + f"[{split}]"
    try:
        rows = datasets.load_dataset(src.name, src.config, split=split)
    except Exception as e:  # datasets raises many types (network, missing config or split)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{task.path}: cannot load {where}: {reason}; check source.name/config/split, the network, "
                        "or the Hugging Face cache when offline") from None
    examples = []
    for i, row in enumerate(rows, 1):
        missing = [f for f in required_fields(task) if f not in row]
        if missing:
            raise UserError(f"{where} row {i}: no field '{missing[0]}' (fields: {', '.join(row)}); set fields.* "
                            f"or fix the prompt in {task.path}")
        examples.append(Example(dict(row), f"{where} row {i}"))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def load_examples(task: TaskSpec, limit: int | None = None) -> list[Example]:
    """The scored examples in order: at most ``source.n``, then at most ``limit``."""
    src = task.source
    caps = [x for x in (src.n, limit) if x is not None]
    cap = min(caps) if caps else None
    if src.type == "tinyworld":
        assert src.n is not None and src.split is not None  # _check_task
        return _tinyworld(task, src.split, src.n, src.seed)[:cap]
    if src.type == "files":
        assert src.path is not None
        return _files(task, src.path, "source.path", cap)
    assert src.split is not None
    return _hub(task, src.split, cap)


def load_fewshot_pool(task: TaskSpec) -> list[Example]:
    """The examples few-shot shots are drawn from: another split or file than the scored ones."""
    if task.num_fewshot == 0:
        return []
    if task.source.type == "tinyworld":
        return _tinyworld(task, task.fewshot.split, task.fewshot.pool, task.fewshot.seed)
    if task.source.type == "files":
        assert task.fewshot.path is not None
        return _files(task, task.fewshot.path, "fewshot.path", None)
    return _hub(task, task.fewshot.split, None)


# ---------------------------------------------------------------- records -> queries


def _prompt(task: TaskSpec, example: Example) -> str:
    from llmkit.tokenizer.chat import describe_template_error

    try:
        return compile_template(task.prompt, str(task.path)).render(**example.record)
    except Exception as e:  # the template is the user's code: any error in it (a TypeError too) is theirs to fix
        raise UserError(f"{example.where}: the prompt of {task.path} failed on this record: "
                        f"{describe_template_error(e)}") from None


def _references(task: TaskSpec, example: Example) -> list[str]:
    value = example.record[task.fields.answer]
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{example.where}: field '{task.fields.answer}' must be a string or a non-empty list of "
                    f"strings, got {show_value(value)}")


def _choices(task: TaskSpec, example: Example) -> tuple[list[str], int]:
    names = task.fields.choices
    rec = example.record
    choices = rec[names] if isinstance(names, str) else [rec[n] for n in names]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{example.where}: the choices ({names}) must be at least two non-empty strings, got "
                        f"{show_value(choices)}")
    raw = rec[task.fields.answer_index]
    index = raw
    if isinstance(raw, str):
        text = raw.strip()
        index = int(text) if text.isdigit() else ord(text.upper()) - ord("A") if len(text) == 1 and text.isalpha() else None
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
        raise UserError(f"{example.where}: field '{task.fields.answer_index}' must be a choice index 0-"
                        f"{len(choices) - 1} (or a letter A-{chr(ord('A') + len(choices) - 1)}), got {show_value(raw)}")
    return choices, index


def target_text(task: TaskSpec, example: Example) -> str:
    """What a solved example shows after its prompt: the first reference, or the right choice."""
    if task.kind == "generate":
        return _references(task, example)[0]
    choices, index = _choices(task, example)
    return choices[index]


def draw_shots(task: TaskSpec, pool: list[Example], query_prompt: str, rng: random.Random) -> list[Example]:
    """``num_fewshot`` examples from the pool, never one whose prompt is the query's own."""
    k = task.num_fewshot
    candidates = rng.sample(range(len(pool)), min(len(pool), k + 1))
    shots = [pool[i] for i in candidates if _prompt(task, pool[i]) != query_prompt][:k]
    if len(shots) < k:
        raise UserError(f"{task.path}: num_fewshot={k} needs {k} few-shot examples besides the query, but the "
                        f"few-shot data has {len(pool)}; add examples or lower num_fewshot")
    return shots


def build_queries(task: TaskSpec, *, limit: int | None = None, chat: bool | None = None) -> list[Query]:
    """Every scored example as a :class:`Query`, shots drawn with ``fewshot.seed`` (same seed, same shots).

    Plain text: shots ``prompt + target_prefix + target`` joined by ``fewshot.separator``, then the query's
    prompt. Chat (``chat``, default the task's setting): shots become user/assistant turns before it.
    """
    chat = task.chat if chat is None else chat
    pool = load_fewshot_pool(task)
    rng = random.Random(task.fewshot.seed)
    queries = []
    for example in load_examples(task, limit):
        prompt = _prompt(task, example)
        shots = draw_shots(task, pool, prompt, rng) if task.num_fewshot else []
        family = str(example.record.get(task.family_field, "all")) if task.family_field else "all"
        references, choices, index = [], [], -1
        if task.kind == "generate":
            references = _references(task, example)
        else:
            choices, index = _choices(task, example)
        messages = None
        if chat:
            messages = [{"role": "system", "content": task.system}] if task.system else []
            for shot in shots:
                messages += [{"role": "user", "content": _prompt(task, shot)},
                             {"role": "assistant", "content": target_text(task, shot)}]
            messages.append({"role": "user", "content": prompt})
            text = prompt
        else:
            solved = [_prompt(task, s) + task.target_prefix + target_text(task, s) for s in shots]
            text = task.fewshot.separator.join([*solved, prompt])
        queries.append(Query(example.where, family, text, messages, references, choices, index))
    return queries
