"""`llmkit tokenize`: train a byte-level BPE tokenizer on a corpus and encode it into token shards."""

from __future__ import annotations

from pathlib import Path

from llmkit.config.schema import TokenizeConfig
from llmkit.data.prepare import describe, prepare_tokens
from llmkit.errors import UserError
from llmkit.train.rundir import default_out_dir, point_latest, run_started

SHARD_FILES = {"config.yaml", "tokenizer.json", "train.bin", "val.bin", "meta.json"}


def run(cfg: TokenizeConfig, resolved_yaml: str) -> int:
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir("tokenize", cfg.name)
    _refuse_what_is_not_shards(out)
    # built beside and swapped in when complete: a failure leaves earlier shards and their config.yaml as they were
    _, stats = prepare_tokens(cfg.data, cfg.tokenizer, out_dir=out, files={"config.yaml": resolved_yaml})
    point_latest(out, "tokenize")
    print(f"tokenized: {describe(stats)}")
    print(f"wrote {out}/tokenizer.json, train.bin, val.bin, meta.json")
    print(f"next: llmkit pretrain tokens_dir={out}")
    return 0


def _refuse_what_is_not_shards(path: Path) -> None:
    """Re-tokenising replaces earlier shards, but never a training run (its checkpoints would be lost) nor
    anything else a user keeps there."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a directory; choose another out_dir=")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is a non-empty directory that is not an llmkit run; choose another out_dir=")
    if not run_started(path):
        return
    other = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in SHARD_FILES)
    if other:
        raise UserError(f"{path} holds more than token shards ({', '.join(other[:5])}: a training run's files, or "
                        "yours); tokenizing there would replace them: choose another out_dir=")
