"""Evaluation tasks defined in YAML, so adding one needs no code (their examples: `llmkit.eval.examples`).

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
    generation: {max_new_tokens: 32, temperature: 0.0, top_k: null, top_p: null, stop: ["\\n"], seed: 0, samples: 1}
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
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from llmkit.config.schema import MIN_TEMPERATURE
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
    samples: int = 1  # answers drawn per question (temperature > 0); its score is their mean


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
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
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
        raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {show_value(value)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {show_value(value)}")
        return tuple(_coerce(v, typing.get_args(hint)[0], where, f"{key}[{i}]") for i, v in enumerate(value))
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool), str: isinstance(value, str)}[hint]
    if not ok:
        raise UserError(f"{where}: '{key}' must be {_describe(hint)}, got {show_value(value)}")
    return float(value) if hint is float else value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def show_value(value: Any) -> str:
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
    need(gen.temperature == 0 or gen.temperature >= MIN_TEMPERATURE, f"generation.temperature must be 0 (greedy) or "
         f"at least {MIN_TEMPERATURE}, got {gen.temperature}")
    need(gen.top_k is None or gen.top_k >= 1, f"generation.top_k must be >= 1, got {gen.top_k}")
    need(gen.top_p is None or 0 < gen.top_p <= 1, f"generation.top_p must be in (0, 1], got {gen.top_p}")
    need(all(gen.stop), "generation.stop strings must not be empty")
    need(gen.samples >= 1, f"generation.samples must be >= 1, got {gen.samples}")
    need(gen.samples == 1 or gen.temperature > 0,
         f"generation.samples={gen.samples} needs generation.temperature > 0 (greedy answers would all be the same)")
    compile_template(task.prompt, where)


# ---------------------------------------------------------------- records


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(source)


def compile_template(source: str, where: str):
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


def required_fields(task: TaskSpec) -> list[str]:
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
