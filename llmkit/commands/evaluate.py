"""`llmkit evaluate`: held-out perplexity and task suites of runs/checkpoints, side by side in one table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llmkit.commands.common import LoadedModel, load_trained, resolve_device, shown
from llmkit.config.schema import EvaluateConfig
from llmkit.data.shards import check_tokenizer, is_val_document, load_shard
from llmkit.data.sources import iter_documents
from llmkit.errors import UserError
from llmkit.eval.perplexity import bytes_per_token_id, evaluate_lm
from llmkit.train.checkpoint import write_text_atomic


def heldout_tokens(cfg: EvaluateConfig, loaded: LoadedModel) -> tuple[np.ndarray, str]:
    """The tokens to score and a short description of where they came from."""
    if cfg.heldout in ("data", "corpus"):
        documents = list(iter_documents(cfg.data))
        if cfg.heldout == "data":  # the documents `llmkit tokenize` holds out of this corpus, never its training ones
            documents = [doc for i, doc in enumerate(documents) if is_val_document(i, cfg.data.val_fraction)]
        eos = loaded.tokenizer.token_to_id(loaded.meta.get("eos_token", "<|endoftext|>"))
        ids: list[int] = []
        for encoding in loaded.tokenizer.encode_batch(documents, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        where = cfg.data.path or cfg.data.hub_name
        split = f"held-out {cfg.data.val_fraction:g}" if cfg.heldout == "data" else "all documents"
        return np.asarray(ids, dtype=np.int64), f"{cfg.data.source}{f':{where}' if where else ''} ({split})"
    tokens_dir = loaded.meta.get("tokens_dir")
    if not tokens_dir:
        raise UserError(f"{loaded.checkpoint} records no validation split of its own (an imported model has none); "
                        "score a corpus with heldout=corpus data.source=... , or "
                        "set perplexity=false tasks=[...]")
    if not Path(tokens_dir, "meta.json").is_file():
        raise UserError(f"{loaded.checkpoint}: its validation split ({tokens_dir}) is not available here; "
                        "evaluate on a corpus instead with heldout=data (its held-out documents) or heldout=corpus "
                        "(all of them) and data.source=... ")
    check_tokenizer(tokens_dir, loaded.tokenizer, f"the tokenizer of {loaded.checkpoint}",
                    "the shards were re-tokenised since it was trained; score a corpus instead with heldout=data "
                    "(its held-out documents) or heldout=corpus (all of them) and data.source=...")
    return load_shard(tokens_dir, "val"), "validation split"


def perplexity(cfg: EvaluateConfig, name: str, loaded: LoadedModel, device) -> dict:
    seq_len = cfg.seq_len or loaded.config.block_size
    if seq_len > loaded.config.block_size:
        raise UserError(f"seq_len={seq_len} is longer than {name}'s context of {loaded.config.block_size}")
    tokens, source = heldout_tokens(cfg, loaded)
    scores = evaluate_lm(loaded.model, tokens, seq_len, cfg.batch_size, bytes_per_token_id(loaded.tokenizer),
                         cfg.max_batches, device)
    return {"heldout": source, **scores}


def run(cfg: EvaluateConfig, resolved_yaml: str) -> int:
    from llmkit.eval.harness import results_table_rows, run_task
    from llmkit.eval.tasks import load_task

    device = resolve_device(cfg.device)
    overrides = {"num_fewshot": cfg.num_fewshot} if cfg.num_fewshot is not None else None
    tasks = [load_task(name, overrides) for name in cfg.tasks]  # validate every task before any model loads
    for i, task in enumerate(tasks):
        earlier = next((other for other in tasks[:i] if other.name == task.name), None)
        if earlier is not None:  # results are keyed by task name: one would hide the other
            raise UserError(f"tasks {earlier.path} and {task.path} are both named {task.name!r}: give one of them "
                            "another name (its name: key), or list each task once")
    results, task_results = [], {}
    for name in cfg.runs:
        loaded = load_trained(name, device)
        entry = {"run": name, "checkpoint": str(loaded.checkpoint), "step": loaded.meta.get("step")}
        if cfg.perplexity:
            entry["perplexity"] = perplexity(cfg, name, loaded, device)
        tok, meta = loaded.tokenizer, loaded.meta
        eos_id = tok.token_to_id(meta.get("eos_token", "<|endoftext|>"))
        pad_id = tok.token_to_id(meta.get("pad_token", "<|pad|>")) or 0
        task_results[name] = [run_task(loaded.model, tok, task, eos_id=eos_id, pad_id=pad_id, batch_size=cfg.batch_size,
                                       limit=cfg.limit, chat_template=meta.get("chat_template"), device=device)
                              for task in tasks]
        entry["tasks"] = [r.to_dict() for r in task_results[name]]
        results.append(entry)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200
    if cfg.perplexity:
        console.print(_perplexity_table(results))
    if tasks:
        columns, rows = results_table_rows(task_results)
        table = Table(title="tasks (value [95% interval] n)")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for path in write_results(results, cfg.output):
        print(f"wrote {shown(path)}")
    return 0


def write_results(results: list[dict], output: str | None) -> list[Path]:
    """Write the results to `output`, or each run's to its own `<run>/eval.json`; nothing is written when any target
    exists and is not an earlier evaluate result (a run's metrics.jsonl, config.yaml, ... would be lost)."""
    targets: dict[Path, list[dict]] = {}
    for entry in results:
        path = Path(output) if output else _run_of(Path(entry["checkpoint"])) / "eval.json"
        targets.setdefault(path, []).append(entry)
    for path in targets:
        _refuse_to_replace(path)
    for path, entries in targets.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(entries, indent=2))
        except OSError as error:
            raise UserError(f"cannot write {path} ({error.strerror}); set output=<path>") from None
    return list(targets)


def _refuse_to_replace(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"output={path} is a directory; give a file path, e.g. output={path / 'eval.json'}")
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(earlier, list) and bool(earlier) and all(  # [] is no result: evaluate writes one per run
            isinstance(e, dict) and {"run", "checkpoint"} <= e.keys() for e in earlier)
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not an earlier `llmkit evaluate` result, so writing the results there "
                        "would lose it; choose another output=<path>")


def _run_of(checkpoint: Path) -> Path:
    """The run directory holding `<run>/checkpoints/step_N`; a checkpoint or adapter kept elsewhere is its own."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def _perplexity_table(results: list[dict]) -> Table:
    table = Table(title="held-out language modelling")
    for column in ("run", "step", "heldout", "tokens", "loss", "perplexity", "bits/byte"):
        table.add_column(column, justify="left" if column in ("run", "heldout") else "right")
    for r in results:
        p = r["perplexity"]
        table.add_row(r["run"], "-" if r["step"] is None else str(r["step"]), p["heldout"], str(p["tokens"]), f"{p['loss']:.4f}",
                      f"{p['perplexity']:.2f}", f"{p['bits_per_byte']:.4f}")
    return table
