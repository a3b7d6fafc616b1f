"""Evaluation tasks defined in YAML, so adding one needs no code; their examples turned into queries.

Shipped tasks live in ``conf/eval_tasks/<name>.yaml``; any other YAML path works too. Keys (strictly
checked: an unknown key is an error naming the file, the key and close matches)::

    name: my_task               # default: the file name
    description: ...
    kind: generate              # generate (free text, scored by metrics) | choice (log-likelihood of choices)
    source:                     # the scored examples
      type: tinyworld           # tinyworld | files | hub
      split: test               # tinyworld, hub
      n: 350                    # tinyworld: how many (balanced over families); files/hub: at most this many
      seed: 0                   # tinyworld: which questions are drawn
      families: null            # tinyworld: a subset of its families (default all)
      num_choices: 4            # tinyworld choice tasks
      path: data/qa.jsonl       # files: .jsonl/.json/.csv/.parquet, relative to this YAML's folder (else the cwd)
      name: squad               # hub: dataset name (imported lazily, never running remote code)
      config: null              # hub: dataset configuration
    prompt: "Q: {{ question }}\\nA:"   # Jinja over the record's fields (sandboxed)
    target_prefix: " "          # text between the prompt and an answer/choice (few-shot shots, choices)
    fields: {answer: answer, choices: choices, answer_index: answer_index, family: null}
    metrics: [exact_match]      # generate: exact_match, f1, bleu | choice: accuracy, accuracy_norm
    generation: {max_new_tokens: 32, temperature: 0.0, top_k: null, top_p: null, stop: ["\\n"], seed: 0}
    chat: false                 # render as a chat (few-shot shots as earlier user/assistant turns)
    chat_template: null         # used when the caller gives none: chatml | simple | Jinja | path
    system: null                # chat: a system message
    num_fewshot: 0              # k solved examples before each query
    fewshot: {split: train, path: null, seed: 1234, pool: 200, separator: "\\n\\n"}

Tiny-world records have the fields ``prompt, answer, family`` (generate) or ``question, choices,
answer_index, family`` (choice). ``fields.answer`` may hold a string or a list of acceptable answers;
``fields.choices`` names one list field or several string fields (one per choice, as in MMLU CSVs);
``answer_index`` is an int, a digit string or a letter (A = 0). Few-shot examples always come from a
different split (``fewshot.split``) or file (``fewshot.path``) than the scored ones, drawn with
``fewshot.seed``, and never repeat the query. No torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import random
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from llmkit.errors import UserError
from llmkit.eval.metrics import CHOICE_METRICS, GENERATE_METRICS

KINDS = ("generate", "choice")
SOURCE_TYPES = ("tinyworld", "files", "hub")
DEFAULT_METRICS = {"generate": ("exact_match",), "choice": ("accuracy", "accuracy_norm")}


@dataclass(frozen=True)
class SourceSpec:
    """Where examples come from (see the module docstring for which keys each type uses)."""

    type: str
    split: str | None = None
    n: int | None = None
    seed: int = 0
    families: tuple[str, ...] | None = None
    num_choices: int = 4
    path: str | None = None
    name: str | None = None
    config: str | None = None


@dataclass(frozen=True)
class FieldsSpec:
    """Record field names: the reference answer(s), the choices and the right choice, the family."""

    answer: str = "answer"
    choices: str | tuple[str, ...] = "choices"
    answer_index: str = "answer_index"
    family: str | None = None  # None: "family" for the tiny world, else no per-family breakdown


@dataclass(frozen=True)
class FewshotSpec:
    """Where few-shot examples come from: another split (tinyworld, hub) or another file (files)."""

    split: str = "train"
    path: str | None = None
    seed: int = 1234
    pool: int = 200  # tinyworld: examples drawn to choose shots from
    separator: str = "\n\n"


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding for generate tasks: greedy by default; the output is cut at the first stop string."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ("\n",)
    seed: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """A validated task; ``path`` is the YAML it came from (relative data paths start from its folder)."""

    name: str
    kind: str
    source: SourceSpec
    prompt: str
    path: Path
    description: str = ""
    target_prefix: str = " "
    fields: FieldsSpec = field(default_factory=FieldsSpec)
    metrics: tuple[str, ...] | None = None  # None: accuracy + accuracy_norm (choice) or exact_match
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    chat: bool = False
    chat_template: str | None = None
    system: str | None = None
    num_fewshot: int = 0
    fewshot: FewshotSpec = field(default_factory=FewshotSpec)

    @property
    def family_field(self) -> str | None:
        if self.fields.family is None and self.source.type == "tinyworld":
            return "family"
        return self.fields.family


@dataclass(frozen=True)
class Example:
    """One record and where it came from (``file:line``, ``tinyworld test #3``...)."""

    record: dict[str, Any]
    where: str


@dataclass(frozen=True)
class Query:
    """A scored example ready to tokenise: plain text, or chat messages when the task is a chat."""

    where: str
    family: str
    text: str  # the whole plain prompt, shots included (chat: the query's own prompt, for display)
    messages: list[dict[str, str]] | None  # chat: [system?] + shots as user/assistant turns + the query
    references: list[str]  # generate
    choices: list[str]  # choice
    answer_index: int  # choice


# ---------------------------------------------------------------- finding and validating YAML


def tasks_dir() -> Path:
    """The shipped tasks folder (``conf/eval_tasks``), found the same way as the other configs."""
    from llmkit.config.compose import config_roots

    return config_roots()[0] / "eval_tasks"


def list_tasks() -> list[str]:
    """Names of the shipped tasks (what :func:`load_task` takes besides a path)."""
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_task(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    """A shipped task by name, or a task YAML by path; ``overrides`` sets dotted keys (``num_fewshot``,
    ``source.n``...) before the strict validation. Raises UserError for any problem."""
    import yaml

    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = tasks_dir() / f"{spec}.yaml"
        if not path.is_file():
            known = list_tasks()
            close = difflib.get_close_matches(spec, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown task {spec!r}; {hint}shipped tasks: {', '.join(known)} (or give a .yaml path)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read task file {path}: {e.strerror}; give an existing .yaml path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task file must be a mapping of keys (kind, source, prompt, ...)")
    where = str(path)
    for key, value in (overrides or {}).items():
        where = f"{path} (with overrides)"
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key!r}: {part!r} is not a section of {path}")
        node[leaf] = value
    raw.setdefault("name", path.stem)
    task = _build(TaskSpec, raw, where, "", path=path.resolve())
    _check_task(task, where)
    return task


def _build(cls: type, raw: Any, where: str, prefix: str, **fixed: Any) -> Any:
    """A dataclass from a YAML mapping (plus ``fixed`` values the YAML may not set): unknown keys,
    missing keys and wrong types raise UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.')}' must be a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            names = [prefix + k for k in (close or fields)]
            hint = f"did you mean {', '.join(names)}?" if close else f"valid keys: {', '.join(names)}"
            raise UserError(f"{where}: unknown key '{prefix}{key}'; {hint}")
    hints = typing.get_type_hints(cls)
    values = dict(fixed)
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], where, prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing required key '{prefix}{name}'")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """``value`` checked against a type hint (str, int, float, bool, tuples, optionals, sections)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where, key)
            except UserError:
                continue
        raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {_show(value)}")
        return tuple(_coerce(v, typing.get_args(hint)[0], where, f"{key}[{i}]") for i, v in enumerate(value))
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool), str: isinstance(value, str)}[hint]
    if not ok:
        raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {_show(value)}")
    return float(value) if hint is float else value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_task(task: TaskSpec, where: str) -> None:
    """Checks across keys: kind, metrics, source and few-shot settings, the prompt template."""
    from llmkit.data.tinyworld import FAMILIES, SPLITS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"{where}: {message}")

    need(task.kind in KINDS, f"kind={task.kind!r} is not one of {', '.join(KINDS)}")
    allowed = GENERATE_METRICS if task.kind == "generate" else CHOICE_METRICS
    for metric in task.metrics or ():
        need(metric in allowed, f"metric {metric!r} does not apply to kind={task.kind}; choose from {', '.join(allowed)}")
    need(task.metrics != (), "metrics is empty; name at least one")
    src = task.source
    need(src.type in SOURCE_TYPES, f"source.type={src.type!r} is not one of {', '.join(SOURCE_TYPES)}")
    need(src.n is None or src.n > 0, f"source.n must be positive, got {src.n}")
    if src.type == "tinyworld":
        need(src.split in SPLITS, f"source.split={src.split!r} is not one of {', '.join(SPLITS)}")
        need(src.n is not None, "source.n (how many tiny-world questions) is required")
        bad = [f for f in src.families or () if f not in FAMILIES]
        need(not bad and src.families != (), f"source.families {list(bad)} unknown or empty; choose from {', '.join(FAMILIES)}")
        need(src.num_choices >= 2, f"source.num_choices must be at least 2, got {src.num_choices}")
    elif src.type == "files":
        need(bool(src.path), "source.type=files needs source.path=<a .jsonl/.json/.csv/.parquet file, folder or glob>")
    else:
        need(bool(src.name) and bool(src.split), "source.type=hub needs source.name and source.split")
    need(task.num_fewshot >= 0, f"num_fewshot must be >= 0, got {task.num_fewshot}")
    if task.num_fewshot:
        if src.type == "files":
            need(bool(task.fewshot.path), "num_fewshot > 0 needs fewshot.path=<another file to draw examples from>")
            need(task.fewshot.path != src.path, "fewshot.path must differ from source.path (shots come from other data)")
        else:
            need(task.fewshot.split != src.split,
                 f"fewshot.split={task.fewshot.split!r} must differ from source.split (shots come from another split)")
        need(src.type != "tinyworld" or task.fewshot.split in SPLITS,
             f"fewshot.split={task.fewshot.split!r} is not one of {', '.join(SPLITS)}")
        need(task.fewshot.pool >= task.num_fewshot, f"fewshot.pool must be at least num_fewshot={task.num_fewshot}")
    gen = task.generation
    need(gen.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {gen.max_new_tokens}")
    need(gen.temperature >= 0, f"generation.temperature must be >= 0 (0 = greedy), got {gen.temperature}")
    need(gen.top_k is None or gen.top_k >= 1, f"generation.top_k must be >= 1, got {gen.top_k}")
    need(gen.top_p is None or 0 < gen.top_p <= 1, f"generation.top_p must be in (0, 1], got {gen.top_p}")
    need(all(gen.stop), "generation.stop strings must not be empty")
    _template(task.prompt, where)


# ---------------------------------------------------------------- records


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(source)


def _template(source: str, where: str):
    """The compiled (sandboxed, strict: a missing field is an error) prompt template."""
    import jinja2

    try:
        return _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: prompt template has a Jinja syntax error on line {e.lineno}: {e.message}") from None


def _template_fields(source: str) -> list[str]:
    """The record fields a prompt template reads."""
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    return sorted(jinja2.meta.find_undeclared_variables(env.parse(source)) - set(env.globals))


def _required_fields(task: TaskSpec) -> list[str]:
    needed = _template_fields(task.prompt)
    if task.kind == "generate":
        needed.append(task.fields.answer)
    else:
        choices = task.fields.choices
        needed += [choices] if isinstance(choices, str) else list(choices)
        needed.append(task.fields.answer_index)
    if task.family_field:
        needed.append(task.family_field)
    return list(dict.fromkeys(needed))


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
    for rec in iter_records(_resolve(task, spec), _required_fields(task), string_fields=[],
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
        missing = [f for f in _required_fields(task) if f not in row]
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
    import jinja2

    try:
        return _template(task.prompt, str(task.path)).render(**example.record)
    except jinja2.TemplateError as e:
        raise UserError(f"{example.where}: the prompt of {task.path} failed on this record: {e}") from None


def _references(task: TaskSpec, example: Example) -> list[str]:
    value = example.record[task.fields.answer]
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{example.where}: field '{task.fields.answer}' must be a string or a non-empty list of "
                    f"strings, got {_show(value)}")


def _choices(task: TaskSpec, example: Example) -> tuple[list[str], int]:
    names = task.fields.choices
    rec = example.record
    choices = rec[names] if isinstance(names, str) else [rec[n] for n in names]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{example.where}: the choices ({names}) must be at least two non-empty strings, got "
                        f"{_show(choices)}")
    raw = rec[task.fields.answer_index]
    index = raw
    if isinstance(raw, str):
        text = raw.strip()
        index = int(text) if text.isdigit() else ord(text.upper()) - ord("A") if len(text) == 1 and text.isalpha() else None
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
        raise UserError(f"{example.where}: field '{task.fields.answer_index}' must be a choice index 0-"
                        f"{len(choices) - 1} (or a letter A-{chr(ord('A') + len(choices) - 1)}), got {_show(raw)}")
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
