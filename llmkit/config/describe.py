"""`--print-config` with each key's meaning: the comment its schema field carries in the source (the schema is the
documentation), appended to the resolved YAML line by line. No torch import."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line (and comment-only lines right below it) in the source of the class or
    the base class that declares it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first: a subclass's own comment wins
        comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    fields = {node.lineno: (node.target.id, node.end_lineno) for node in ast.parse(source).body[0].body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()

    def comment_only(n: int) -> bool:
        return n in comments and lines[n - 1].lstrip().startswith("#")

    out: dict[str, str] = {}
    for line, (name, end) in fields.items():
        text = [comments[n] for n in range(line, end + 1) if n in comments]
        below = end + 1
        while comment_only(below):
            below += 1
        if text and below not in fields:  # the inline comment goes on under the field (not: the next one's block)
            text += [comments[n] for n in range(end + 1, below)]
        above = line - 1
        while not text and comment_only(above):  # or a comment block right above it
            above -= 1
        if not text:
            text = [comments[n] for n in range(above + 1, line)]
        if text:
            out[name] = " ".join(text)
    return out


def _child_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls` (unwrapping `X | None`), or None."""
    if not dataclasses.is_dataclass(cls):
        return None
    hint = typing.get_type_hints(cls).get(name)
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _key_lines(text: str) -> set[int]:
    """0-based lines where a mapping key starts whose value ends on the same line or opens a nested block (not the
    lines inside a multi-line string, nor a key whose string value runs on: a comment there would enter it)."""
    import yaml

    tokens = list(yaml.scan(text))
    lines = set()
    for i, token in enumerate(tokens[:-3]):
        if isinstance(token, yaml.KeyToken) and isinstance(tokens[i + 1], yaml.ScalarToken):
            line, value = tokens[i + 1].start_mark.line, tokens[i + 3]
            if not isinstance(value, yaml.ScalarToken) or value.end_mark.line == line:
                lines.add(line)
    return lines


def annotated_yaml(text: str, root: type) -> str:
    """`text` (OmegaConf.to_yaml of a `root` config) with `# meaning` after each key its schema documents; the plain
    text should a comment ever change what the YAML says."""
    import yaml

    keys = _key_lines(text)
    lines, path = [], []  # path: the classes of the mappings the current line sits in
    for number, line in enumerate(text.splitlines()):
        match = KEY_LINE.match(line) if number in keys else None
        if match is None:
            lines.append(line)
            continue
        depth = len(match["indent"]) // 2
        path = path[:depth]
        owner = path[-1] if path else root
        comment = field_comments(owner).get(match["key"]) if owner is not None else None
        path.append(_child_type(owner, match["key"]) if owner is not None else None)
        lines.append(f"{line}  # {comment}" if comment else line)
    annotated = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    return annotated if yaml.safe_load(annotated) == yaml.safe_load(text) else text
