"""The embedded corpus: builds from the stdlib's docstrings, deterministic, > 1 MB, cached atomically."""

from __future__ import annotations

import json

import pytest

from llmkit.data import embedded


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build once into a private cache; yields (documents, cache file)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    docs = embedded.embedded_documents()
    yield docs, embedded.embedded_cache_path()
    mp.undo()


def test_builds_more_than_a_megabyte_of_clean_text(built):
    docs, path = built
    assert path.is_file() and path.parent.parent == embedded.cache_dir()
    assert sum(len(d.encode("utf-8")) for d in docs) > 1_000_000
    assert len(docs) == len(set(docs)) > 1000
    assert all(len(d) >= embedded.MIN_CHARS and d == d.strip() for d in docs)
    assert not any("Copyright" in d or "All rights reserved" in d for d in docs)
    assert not any(d.startswith("    ") for d in docs)  # dedented
    assert not list(path.parent.glob("*.tmp"))


def test_deterministic(built):
    docs, _ = built
    assert embedded.build_embedded_documents() == docs


def test_cache_is_reused(built, monkeypatch):
    docs, path = built

    def no_rebuild(stdlib=None):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(embedded, "build_embedded_documents", no_rebuild)
    assert embedded.embedded_documents() == docs
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == docs


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    path = embedded.embedded_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{half a line")
    fake = ["a" * 100, "b" * 100]
    monkeypatch.setattr(embedded, "build_embedded_documents", lambda stdlib=None: list(fake))
    assert embedded.embedded_documents() == fake
    assert path.read_text() == '"' + "a" * 100 + '"\n"' + "b" * 100 + '"\n'


def test_missing_stdlib_is_a_user_error(tmp_path):
    from llmkit.errors import UserError

    with pytest.raises(UserError, match="data.source=files"):
        embedded.build_embedded_documents(tmp_path)
