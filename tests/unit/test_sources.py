"""Corpus sources: every file format, the hub path, and one clear UserError per kind of bad input."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmkit.data.config import CorpusConfig
from llmkit.data.sources import ReadStats, iter_documents, iter_records, list_data_files
from llmkit.errors import UserError


def docs(path, **kwargs) -> list[str]:
    return list(iter_documents(CorpusConfig(source="files", path=str(path), **kwargs)))


def fails(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        docs(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- formats


def test_txt_blocks_separated_by_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffFirst line.\nsecond line\n\n \n  Indented para\r\nwith CRLF\r\n\r\nlast".encode())
    assert docs(f) == ["First line.\nsecond line", "  Indented para\nwith CRLF", "last"]


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    assert docs(f) == ["one", "two"]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    items = [{"text": "alpha"}, {"text": "beta", "n": [1, {"text": "nested"}]}]
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"info": {"data": 1}, "data": items} if wrap else items, indent=2))
    assert docs(f) == ["alpha", "beta"]
    lines = [rec.line for rec in iter_records(f, ["text"], string_fields=[])]
    assert lines == ([6, 9] if wrap else [2, 5])


def test_csv_with_quoted_newlines_and_custom_field(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('id,body\n1,"multi\nline, with comma"\n2,plain\n', encoding="utf-8")
    assert docs(f, text_field="body") == ["multi\nline, with comma", "plain"]
    assert [r.line for r in iter_records(f, ["body"])] == [2, 4]


def test_parquet(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "n": [1, 2, 3]}), f)
    assert docs(f) == ["p1", "p2", "p3"]
    categorical = pa.array(["c1", "c2", "c1"]).dictionary_encode()  # what pandas writes for a Categorical column
    pq.write_table(pa.table({"text": categorical}), f)
    assert docs(f) == ["c1", "c2", "c1"]


def test_directory_glob_order_and_max_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b1\n\nb2")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "a1"}\n')
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "notes.md").write_text("ignored")
    assert docs(tmp_path) == ["b1", "b2", "a1"]
    assert docs(tmp_path / "**" / "*.jsonl") == ["a1"]
    assert docs(tmp_path, max_documents=2) == ["b1", "b2"]


def test_empty_documents_are_skipped(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": ""}\n{"text": "  "}\n{"text": "x"}\n')
    stats = ReadStats()
    assert list(iter_documents(CorpusConfig(source="files", path=str(f)), stats)) == ["x"]
    assert stats.documents == 1 and stats.files == 1


def test_embedded_source_respects_max_documents():
    assert len(list(iter_documents(CorpusConfig(max_documents=3)))) == 3


def test_iter_records_several_required_fields(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n', encoding="utf-8"
    )
    records = iter_records(
        f, ["prompt", "chosen", "rejected"], path_key="reward.data_path", field_hint="fix it"
    )
    first = next(records)
    assert first.data["rejected"] == "r" and first.where == f"{f}:1"
    with pytest.raises(
        UserError, match=r"pairs.jsonl:2: record has no field 'rejected' \(fields: prompt, chosen\); fix it"
    ):
        next(records)
    msgs = tmp_path / "chat.jsonl"
    msgs.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert [r.data["messages"][0]["role"] for r in iter_records(msgs, ["messages"], string_fields=[])] == [
        "user"
    ]
    with pytest.raises(UserError, match="reward.data_path=.*does not exist"):
        list(iter_records(tmp_path / "missing.jsonl", ["prompt"], path_key="reward.data_path"))


# ---------------------------------------------------------------- bad input


def test_path_missing(tmp_path):
    msg = fails(tmp_path / "nope")
    assert "nope" in msg and "does not exist" in msg and "data.path=" in msg


def test_no_files_match(tmp_path):
    assert "no files match" in fails(tmp_path / "*.jsonl")
    (tmp_path / "x.md").write_text("hello")
    assert "holds no .txt" in fails(tmp_path)
    assert "unsupported file type '.md'" in fails(tmp_path / "x.md")


def test_empty_corpus(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n  \n")
    assert "the corpus is empty" in fails(f)
    g = tmp_path / "b.jsonl"
    g.write_text('{"text": "", "body": "real text"}\n')
    msg = fails(g)
    assert "field 'text' is empty in every record" in msg and "body, text" in msg and "data.text_field" in msg


def test_malformed_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken",}\n')
    msg = fails(f)
    assert f"{f}:2: not valid JSON" in msg and "at column 19" in msg
    f.write_text('{"text": "ok"}\n{"text": "cut short"\n')
    assert "at column 21" in fails(f)  # just past the end of the line, not column 1 of the next
    f.write_text('{"text": "ok"}\n["a list"]\n')
    assert f"{f}:2: expected a JSON object" in fails(f)


def test_missing_field_lists_fields(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n{"title": "t", "body": "b"}\n')
    msg = fails(f)
    assert f"{f}:2" in msg and "no field 'text'" in msg and "title, body" in msg and "data.text_field" in msg


def test_non_string_and_null_values(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok"}\n{"text": 42}\n')
    msg = fails(f)
    assert f"{f}:2" in msg and "field 'text' is int" in msg
    g = tmp_path / "a.json"
    g.write_text('[\n{"text": "ok"},\n{"text": null}\n]')
    assert f"{g}:3: field 'text' is null" in fails(g)


def test_bad_json_file(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[{"text": "a"}\n {"text": "b"}]')
    assert f"{f}:2: not valid JSON" in fails(f)
    f.write_text('{"rows": []}')
    assert 'no "data" list (keys: rows)' in fails(f)
    f.write_text('"just a string"')
    assert "top level is str" in fails(f)


def test_non_utf8_strict_and_replace(tmp_path, caplog):
    f = tmp_path / "a.txt"
    f.write_bytes(b"good line\nbad \xff\xfe bytes\n")
    msg = fails(f)
    assert f"{f}:2" in msg and "byte offset 14" in msg and "data.encoding_errors=replace" in msg
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="llmkit.data.sources"):
        out = list(
            iter_documents(CorpusConfig(source="files", path=str(f), encoding_errors="replace"), stats)
        )
    assert out == ["good line\nbad \ufffd\ufffd bytes"] and stats.replaced == 2
    assert "replaced 2 invalid UTF-8" in caplog.text
    g = tmp_path / "a.jsonl"
    g.write_bytes(b'{"text": "ok \xef\xbf\xbd"}\n{"text": "\xc3("}\n')
    assert f"{g}:2" in fails(g)
    stats = ReadStats()
    list(iter_documents(CorpusConfig(source="files", path=str(g), encoding_errors="replace"), stats))
    assert stats.replaced == 1  # the genuine U+FFFD on line 1 is not counted
    h = tmp_path / "a.json"
    h.write_bytes(b'[{"text": "ok"},\n {"text": "\xe9t\xe9"}]')
    assert f"{h}:2" in fails(h)


def test_an_unpaired_surrogate_escape_in_json_is_named_or_replaced(tmp_path):
    """`"\\ud800"` is valid JSON but not text: it crashed the tokenizer ("internal error: UnicodeEncodeError")."""
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "ok \\ud83c\\udf89"}\n{"text": "x"}\n{"text": "lone \\ud800 here"}\n')
    msg = fails(f)
    assert f"{f}:3" in msg and "\\ud800 is half of a surrogate pair" in msg and "encoding_errors=replace" in msg
    stats = ReadStats()
    out = list(iter_documents(CorpusConfig(source="files", path=str(f), encoding_errors="replace"), stats))
    assert out == ["ok \U0001f389", "x", "lone \ufffd here"] and stats.replaced == 1  # the pair is one emoji
    g = tmp_path / "a.json"
    g.write_text('[{"text": "ok"},\n {"messages": [{"content": "\\uDC00"}], "text": "y"}]')
    assert f"{g}:2" in fails(g)  # nested too (SFT messages)


def test_csv_problems(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("title,body\nx,y\n")
    msg = fails(f)
    assert f"{f}:1" in msg and "no column 'text'" in msg and "title, body" in msg
    f.write_text("id,text\n1,ok\n2,too,many\n")
    assert f"{f}:3: row has 3 values but the header has 2" in fails(f)
    f.write_text("")
    assert "CSV file is empty" in fails(f)


def test_parquet_problems(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"title": ["x"], "body": ["y"]}), f)
    msg = fails(f)
    assert "a.parquet" in msg and "no column 'text'" in msg and "title, body" in msg
    pq.write_table(pa.table({"text": [1, 2]}), f)
    assert "column 'text' holds int64, expected strings" in fails(f)
    pq.write_table(pa.table({"text": ["a", None]}), f)
    assert "a.parquet row 2: field 'text' is null" in fails(f)
    f.write_text("not parquet")
    assert "cannot read" in fails(f)


def test_hub_unavailable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot load hub:nobody/no-such-dataset\[train\].*offline"):
        list(iter_documents(CorpusConfig(source="hub", hub_name="nobody/no-such-dataset")))


def test_hub_given_a_save_to_disk_directory_says_how_to_read_it(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError) as info:
        list(iter_documents(CorpusConfig(source="hub", hub_name=str(tmp_path / "saved"))))
    assert "save_to_disk is not read" in str(info.value) and "to_parquet" in str(info.value)
    assert "offline" not in str(info.value).split(";", 1)[1]  # not the cache advice, which does not apply


def test_hub_local_dataset_streaming(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "h1", "m": 1}\n{"text": "h2", "m": 2}\n')
    cfg = CorpusConfig(source="hub", hub_name=str(tmp_path), streaming=True)
    assert list(iter_documents(cfg)) == ["h1", "h2"]
    cfg = CorpusConfig(source="hub", hub_name=str(tmp_path), streaming=True, text_field="body")
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, m\)"):
        list(iter_documents(cfg))


def test_list_data_files_uses_the_key(tmp_path):
    with pytest.raises(UserError, match="sft.data_path="):
        list_data_files(tmp_path / "x", (".jsonl",), key="sft.data_path")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "web"}, "data.source='web'"),
        ({"source": "files"}, "data.path="),
        ({"source": "hub"}, "data.hub_name="),
        ({"encoding_errors": "ignore"}, "data.encoding_errors"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 0.9}, "data.val_fraction"),
        ({"max_documents": 1}, "data.max_documents"),
        ({"text_field": ""}, "data.text_field"),
    ],
)
def test_corpus_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        CorpusConfig(**kwargs)


def test_hub_records_name_each_row_and_explain_failures(monkeypatch):
    import sys
    import types

    from llmkit.data.sources import hub_records

    fake = types.ModuleType("datasets")

    def load_dataset(name, config, split):
        if name == "missing/set":
            raise FileNotFoundError("not cached and offline")
        return [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = hub_records("org/set", None, "train")
    assert rows[1] == ("org/set[train] row 2", {"prompt": "d", "chosen": "e", "rejected": "f"})
    with pytest.raises(UserError, match=r"data.hub_name='missing/set'.*not cached and offline"):
        hub_records("missing/set", None, "train")


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n", b"\xef\xbb\xbf\r\n"])
def test_a_record_file_without_records_is_named_not_blamed_on_later_settings(content, tmp_path):
    """sft blamed an empty file on data.loss_on / data.max_length, reward on data.max_length."""
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    with pytest.raises(UserError, match=r"data\.path=.*empty\.jsonl holds no records"):
        list(iter_records(f, ["prompt"]))


def test_what_a_data_directory_or_file_holds_that_would_be_misread_is_refused_or_counted(tmp_path):
    """A save_to_disk directory (its dataset_info.json was read as records), compressed files in a directory (skipped
    silently), a JSON-lines file named .json (no hint), and blank records (skipped without a count)."""
    (tmp_path / "saved").mkdir()
    for name in ("dataset_info.json", "state.json", "data-00000-of-00001.arrow"):
        (tmp_path / "saved" / name).write_text("{}")
    assert "save_to_disk" in fails(tmp_path / "saved") and "to_parquet" in fails(tmp_path / "saved")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("kept\n")
    (tmp_path / "mixed" / "b.jsonl.gz").write_bytes(b"\x1f\x8b")
    assert "compressed files" in fails(tmp_path / "mixed") and "b.jsonl.gz" in fails(tmp_path / "mixed")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert "lines.json:2" in fails(tmp_path / "lines.json") and "name it .jsonl" in fails(tmp_path / "lines.json")
    (tmp_path / "blank.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("one", "", "  ", "two")) + "\n")
    stats = ReadStats()
    assert list(iter_documents(CorpusConfig(source="files", path=str(tmp_path / "blank.jsonl")), stats)) == ["one", "two"]
    assert stats.empty == 2
