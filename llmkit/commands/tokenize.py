"""`llmkit tokenize`: train a byte-level BPE tokenizer on a corpus and encode it into token shards."""

from __future__ import annotations

from pathlib import Path

from llmkit.config.schema import TokenizeConfig
from llmkit.data.prepare import describe, prepare_tokens
from llmkit.errors import UserError
from llmkit.train.rundir import prepare_run_dir, run_started

SHARD_FILES = {"config.yaml", "tokenizer.json", "train.bin", "val.bin", "meta.json"}


def run(cfg: TokenizeConfig, resolved_yaml: str) -> int:
    if cfg.out_dir:
        _refuse_other_runs(Path(cfg.out_dir))
    out, _ = prepare_run_dir("tokenize", cfg.out_dir, cfg.name, resolved_yaml, resume="never", overwrite=True)
    (out / "meta.json").unlink(missing_ok=True)  # re-tokenising a directory: incomplete until the end
    _, stats = prepare_tokens(cfg.data, cfg.tokenizer, out_dir=out)
    print(f"tokenized: {describe(stats)}")
    print(f"wrote {out}/tokenizer.json, train.bin, val.bin, meta.json")
    print(f"next: llmkit pretrain tokens_dir={out}")
    return 0


def _refuse_other_runs(path: Path) -> None:
    """Re-tokenising replaces earlier shards, but never a training run (its checkpoints would be lost)."""
    if not (path / "config.yaml").is_file() or not run_started(path):
        return
    other = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.name not in SHARD_FILES)
    if other:
        raise UserError(f"{path} holds a run ({', '.join(other[:5])}), not token shards; tokenizing there would "
                        "replace it: choose another out_dir=")
