"""The embedded default corpus: docstrings of the installed Python standard library.

Real English prose (with some code) that every machine with Python has, so ``llmkit tokenize``
and ``llmkit pretrain`` work offline with no download. The sources are parsed with ``ast`` (the
modules are never imported), docstrings are dedented, licence paragraphs and tiny docstrings dropped,
exact duplicates removed, and the order is fixed (files by relative path, docstrings in source
order). The result (~1.5 MB) is cached as JSON lines under ``$LLMKIT_CACHE`` (default
``~/.cache/llmkit``), keyed by the Python version, and written atomically.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmkit.errors import UserError
from llmkit.fileio import match_umask

BUILD_VERSION = 1  # bump when the cleaning rules change, so old caches are not reused
MIN_CHARS = 80  # shorter docstrings ("Return x.") carry little text
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
BOILERPLATE = re.compile(
    r"copyright|all rights reserved|permission is hereby granted|permission to use, copy"
    r"|licen[cs]ed under|general public licen[cs]e|warranty",
    re.IGNORECASE,
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def cache_dir() -> Path:
    """llmkit's cache directory: ``$LLMKIT_CACHE`` or ``~/.cache/llmkit``."""
    return Path(os.environ.get("LLMKIT_CACHE") or Path.home() / ".cache" / "llmkit")


def embedded_cache_path() -> Path:
    """Where the embedded corpus for this Python is cached (JSON lines, one document per line)."""
    tag = sys.implementation.cache_tag or f"py{sys.version_info.major}{sys.version_info.minor}"
    micro = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return cache_dir() / "embedded" / f"stdlib-docstrings-{tag}-{micro}-v{BUILD_VERSION}.jsonl"


def embedded_documents() -> list[str]:
    """The embedded corpus as a list of documents, built on first use and then read from the cache."""
    path = embedded_cache_path()
    if path.is_file():
        try:
            docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if docs and all(isinstance(d, str) for d in docs):
                return docs
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt below
    docs = build_embedded_documents()
    _write_atomic(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return docs


def build_embedded_documents(stdlib: Path | None = None) -> list[str]:
    """Collect the cleaned, de-duplicated docstrings of the standard library, in a fixed order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for file in _stdlib_files(root):
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError, OSError):
            continue  # the odd non-parsable file (e.g. lib2to3 test data) is simply skipped
        for doc in _docstrings(tree):
            text = _clean(doc)
            if text is not None and text not in seen:
                seen.add(text)
                docs.append(text)
    if len(docs) < 2:
        raise UserError(
            f"cannot build the embedded corpus: no Python standard library sources under {root}; "
            "use your own text with data.source=files data.path=<file or directory>"
        )
    return docs


def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files, sorted by relative path, skipping tests and third-party code."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of the module, its classes and functions, in source order (pre-order)."""
    if isinstance(tree, _DOC_NODES):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.stmt, ast.excepthandler)):
            yield from _docstrings(child)


def _clean(doc: str) -> str | None:
    """Drop licence paragraphs and trailing spaces; None when under ``MIN_CHARS`` remain."""
    paragraphs = re.split(r"\n\s*\n", doc.strip())
    kept = [
        "\n".join(line.rstrip() for line in p.splitlines()) for p in paragraphs if not BOILERPLATE.search(p)
    ]
    text = "\n\n".join(p for p in kept if p.strip())
    return text if len(text) >= MIN_CHARS else None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        match_umask(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
