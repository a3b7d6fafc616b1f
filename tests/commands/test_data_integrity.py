"""Token shards stay true to what they are used with, through the real CLI: the data files they came from,
the tokenizer of the weights they train or score, and the earlier shards a failed re-tokenisation replaces."""

import json
from pathlib import Path


def write_corpus(path: Path, template: str, count: int) -> None:
    path.write_text("\n\n".join(template.format(i=i) for i in range(count)) + "\n")


def checkpoint_meta(run: Path) -> dict:
    root = run / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())


def test_the_shard_cache_follows_what_the_data_files_hold(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, "document {i}: the value of x is {i}.", 200)
    args = ("pretrain", "tiny/pretrain", "data=files", f"data.path={corpus}", "train.max_steps=1")
    assert cli(*args, "out_dir=a").returncode == 0
    write_corpus(corpus, "completely different text number {i}, many more words indeed.", 300)
    done = cli(*args, "out_dir=b")
    assert done.returncode == 0, done.stderr
    shards = Path(checkpoint_meta(tmp_path / "b")["tokens_dir"])
    assert json.loads((shards / "meta.json").read_text())["documents"] == 300
