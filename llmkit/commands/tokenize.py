"""`llmkit tokenize`: train a byte-level BPE tokenizer on a corpus and encode it into token shards."""

from __future__ import annotations

from llmkit.config.schema import TokenizeConfig
from llmkit.data.prepare import describe, prepare_tokens
from llmkit.train.rundir import prepare_run_dir


def run(cfg: TokenizeConfig, resolved_yaml: str) -> int:
    out, _ = prepare_run_dir("tokenize", cfg.out_dir, cfg.name, resolved_yaml, resume="never", overwrite=True)
    (out / "meta.json").unlink(missing_ok=True)  # re-tokenising a directory: incomplete until the end
    _, stats = prepare_tokens(cfg.data, cfg.tokenizer, out_dir=out)
    print(f"tokenized: {describe(stats)}")
    print(f"wrote {out}/tokenizer.json, train.bin, val.bin, meta.json")
    print(f"next: llmkit pretrain tokens_dir={out}")
    return 0
