"""`llmkit sft`: supervised fine-tuning of a pretrained run on instruction data (the tiny world by default)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from llmkit.commands.common import (
    LoadedModel,
    inherited_meta,
    kept_template,
    load_start,
    report_result,
    shown,
    start_run,
)
from llmkit.config.schema import SFTConfig
from llmkit.data.instruct import instruction_sets
from llmkit.errors import UserError
from llmkit.model.transformer import flops_per_token
from llmkit.train.loop import Trainer, TrainSpec
from llmkit.train.objectives import CausalLM


def load_base(cfg: SFTConfig, command: str, run_dir: Path) -> LoadedModel:
    """The pretrained model to fine-tune (`llmkit sft`, `llmkit peft`), with a how-to when there is none yet."""
    return load_start(cfg.init_from, "runs/pretrain/latest", f"`llmkit pretrain` (minutes on a CPU), then `llmkit "
                      f"{command}`", run_dir, cfg.train.resume)


def _held_out(sets) -> str:
    """The validation records in the sft summary: how many, and those truncated or dropped among them."""
    v = sets.val_stats
    if v is None:
        return "0 held out"
    return f"{v.examples} held out ({v.truncated} truncated, {v.dropped} dropped)"


def run(cfg: SFTConfig, resolved_yaml: str) -> int:
    runtime, run_dir = start_run("sft", cfg, resolved_yaml)
    base = load_base(cfg, "sft", run_dir)
    model, tokenizer, meta = base.model.train(), base.tokenizer, base.meta
    eos_token, pad_token = meta.get("eos_token", "<|endoftext|>"), meta.get("pad_token", "<|pad|>")
    seq_len = cfg.train.seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size:
        raise UserError(f"train.seq_len={seq_len} is longer than the model's context ({model.cfg.block_size})")
    pad_id = tokenizer.token_to_id(pad_token)
    sets = instruction_sets(cfg.data, tokenizer, seq_len, eos_token, pad_id if pad_id is not None else 0)
    if runtime.is_main:
        (run_dir / "tokenizer.json").write_text(tokenizer.to_str())
        s = sets.stats
        print(f"sft data: {s.examples} examples ({s.trained_tokens} of {s.tokens} tokens trained on; "
              f"{s.truncated} truncated, {s.dropped} dropped), {_held_out(sets)}, "
              f"{sets.train.num_examples(0)} {'packed rows' if cfg.data.packing else 'examples'} of <= {seq_len} tokens; "
              f"starting from {shown(base.checkpoint)}; run directory: {run_dir}")
    spec = TrainSpec(
        command="sft", model=model, objective=CausalLM(fused=cfg.train.fused_loss), train_set=sets.train, val_set=sets.val, run_dir=run_dir,
        meta={**inherited_meta(meta), "command": "sft",
              "model": dataclasses.asdict(model.cfg), "base": str(base.checkpoint),
              "base_sha256": base.weights_sha256,
              "chat_template": kept_template(cfg.data.chat_template)},
        flops_per_token=partial(flops_per_token, model.cfg),
        files={"tokenizer.json": run_dir / "tokenizer.json"},
    )
    result = Trainer(spec, cfg.train, cfg.optim, cfg.sched, cfg.logger, runtime).run()
    if runtime.is_main:
        report_result(result)
        print(f"next: llmkit evaluate runs=[{run_dir}] tasks=[tinyworld_gen]   |   "
              f"llmkit generate run={run_dir} prompt='What is 12 + 30?'")
    return 0
