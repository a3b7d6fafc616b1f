"""`llmkit evaluate`: held-out loss, perplexity and bits per byte of runs/checkpoints, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llmkit.commands.common import LoadedModel, load_trained, resolve_device
from llmkit.config.schema import EvaluateConfig
from llmkit.data.shards import load_shard
from llmkit.data.sources import iter_documents
from llmkit.errors import UserError
from llmkit.eval.perplexity import bytes_per_token_id, evaluate_lm


def heldout_tokens(cfg: EvaluateConfig, loaded: LoadedModel) -> tuple[np.ndarray, str]:
    """The tokens to score and a short description of where they came from."""
    if cfg.heldout == "data":
        eos = loaded.tokenizer.token_to_id(loaded.meta.get("eos_token", "<|endoftext|>"))
        ids: list[int] = []
        for encoding in loaded.tokenizer.encode_batch(list(iter_documents(cfg.data)), add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64), f"{cfg.data.source}:{cfg.data.path or cfg.data.hub_name or ''}"
    tokens_dir = loaded.meta.get("tokens_dir")
    if not tokens_dir or not Path(tokens_dir, "meta.json").is_file():
        raise UserError(f"{loaded.checkpoint}: its validation split ({tokens_dir}) is not available here; "
                        "evaluate on a corpus instead with heldout=data data.source=... ")
    return load_shard(tokens_dir, "val"), "validation split"


def run(cfg: EvaluateConfig, resolved_yaml: str) -> int:
    device = resolve_device(cfg.device)
    results = []
    for name in cfg.runs:
        loaded = load_trained(name, device)
        seq_len = cfg.seq_len or loaded.config.block_size
        if seq_len > loaded.config.block_size:
            raise UserError(f"seq_len={seq_len} is longer than {name}'s context of {loaded.config.block_size}")
        tokens, source = heldout_tokens(cfg, loaded)
        scores = evaluate_lm(loaded.model, tokens, seq_len, cfg.batch_size, bytes_per_token_id(loaded.tokenizer),
                             cfg.max_batches, device)
        results.append({"run": name, "checkpoint": str(loaded.checkpoint), "step": loaded.meta.get("step"),
                        "heldout": source, **scores})
    table = Table(title="held-out language modelling")
    for column in ("run", "step", "heldout", "tokens", "loss", "perplexity", "bits/byte"):
        table.add_column(column, justify="left" if column in ("run", "heldout") else "right")
    for r in results:
        table.add_row(r["run"], str(r["step"]), r["heldout"], str(r["tokens"]), f"{r['loss']:.4f}",
                      f"{r['perplexity']:.2f}", f"{r['bits_per_byte']:.4f}")
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    output = Path(cfg.output) if cfg.output else Path(results[0]["checkpoint"]).parent.parent / "eval.json"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
    except OSError as error:
        blocker = next((parent for parent in output.parents if parent.is_file()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else error.strerror
        raise UserError(f"cannot write {output} ({reason}); set output=<path>") from None
    print(f"wrote {output}")
    return 0
