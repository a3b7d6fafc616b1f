"""`llmkit reward`: a reward model (SFT trunk + scalar head) trained on preference pairs with Bradley-Terry."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import torch

from llmkit.commands.common import LoadedModel, inherited_meta, kept_template, load_start, shown, start_run
from llmkit.config.schema_align import RewardConfig
from llmkit.data.preference import PreferenceSets, preference_sets
from llmkit.errors import UserError
from llmkit.model.heads import ScalarModel
from llmkit.model.transformer import flops_per_token
from llmkit.rl.rewards import BradleyTerryObjective, PairTrainer, accuracy_by_family
from llmkit.train.loop import TrainSpec


def load_sft_base(cfg, command: str, run_dir: Path) -> LoadedModel:
    """The fine-tuned model to start from (`llmkit reward`, `dpo`, `ppo`), with a how-to when there is none yet."""
    return load_start(cfg.init_from, "runs/sft/latest", f"`llmkit sft` (after `llmkit pretrain`), then `llmkit "
                      f"{command}`", run_dir, cfg.train.resume)


def pair_data(cfg, base: LoadedModel, run_dir: Path, is_main: bool) -> tuple[PreferenceSets, str]:
    """Tokenised preference pairs of `cfg.data` with the base run's chat template: (sets, template)."""
    meta, block = base.meta, base.model.cfg.block_size
    seq_len = cfg.train.seq_len or block
    if seq_len > block:
        raise UserError(f"train.seq_len={seq_len} is longer than the model's context ({block})")
    template = cfg.data.chat_template or meta.get("chat_template") or "chatml"
    pad_id = base.tokenizer.token_to_id(meta.get("pad_token", "<|pad|>"))
    sets = preference_sets(cfg.data, base.tokenizer, template, meta.get("eos_token", "<|endoftext|>"),
                           pad_id if pad_id is not None else 0, seq_len)
    if is_main:
        (run_dir / "tokenizer.json").write_text(base.tokenizer.to_str())
        s, v = sets.stats, sets.val_stats
        print(f"preference data: {s.pairs} training pairs ({s.identical} identical and {s.too_long} longer than "
              f"{seq_len} tokens dropped), {v.pairs} held out; chat template {template}; "
              f"starting from {shown(base.checkpoint)}; run directory: {run_dir}")
    return sets, template


def pair_meta(base: LoadedModel, command: str, template: str, model_cfg) -> dict:
    """Checkpoint meta of a run fine-tuned from `base` on pairs (tokens, template, lineage)."""
    kept = inherited_meta(base.meta)
    return {**kept, "command": command, "model": dataclasses.asdict(model_cfg), "base": str(base.checkpoint.resolve()),
            "base_sha256": base.weights_sha256,
            "chat_template": kept_template(template)}


def held_out_by_family(trainer: PairTrainer) -> dict:
    """Held-out accuracy per family of the validation pairs that carry one (the tiny world's do): {} otherwise."""
    val = trainer.spec.val_set
    if val is None or trainer.runtime.sharded:  # sharded weights: a forward pass needs every process
        return {}
    groups: dict[str, list] = {}
    for example in val.items:
        if example.family is not None:
            groups.setdefault(example.family, []).append(example)
    return accuracy_by_family(trainer.spec.objective, trainer.spec.model, groups, val.collate, trainer.runtime.device)


def report(result, trainer: PairTrainer, run_dir: Path, what: str, by_family: dict) -> None:
    """The final held-out numbers (also written to heldout.json, per family when the pairs have one)."""
    stats = trainer.val_stats
    if stats:
        print(f"done: step {result.step}, held-out {what} accuracy {stats['val_accuracy']:.3f}, margin "
              f"{stats['val_margin']:.3f} (chosen {stats['val_chosen_mean']:.3f} ± {stats['val_chosen_std']:.3f}, "
              f"rejected {stats['val_rejected_mean']:.3f} ± {stats['val_rejected_std']:.3f}), "
              f"validation loss {result.last_val:.4f}")
    if by_family:
        print("held-out accuracy by family: " + ", ".join(f"{family} {v['accuracy']:.3f} ({v['pairs']})"
                                                          for family, v in by_family.items()))
    (run_dir / "heldout.json").write_text(json.dumps({**stats, "by_family": by_family}, indent=2) + "\n")
    print(f"checkpoint: {result.checkpoint}")


def run(cfg: RewardConfig, resolved_yaml: str) -> int:
    runtime, run_dir = start_run("reward", cfg, resolved_yaml)
    base = load_sft_base(cfg, "reward", run_dir)
    sets, template = pair_data(cfg, base, run_dir, runtime.is_main)
    torch.manual_seed(cfg.train.seed)  # the head's initial weights
    model = ScalarModel(base.model).train()
    spec = TrainSpec(
        command="reward", model=model, objective=BradleyTerryObjective(cfg.loss.margin, cfg.loss.centering),
        train_set=sets.train, val_set=sets.val, run_dir=run_dir,
        meta={**pair_meta(base, "reward", template, model.cfg), "kind": "reward"},
        flops_per_token=partial(flops_per_token, model.cfg), files={"tokenizer.json": run_dir / "tokenizer.json"},
    )
    trainer = PairTrainer(spec, cfg.train, cfg.optim, cfg.sched, cfg.logger, runtime)
    result = trainer.run()
    if runtime.is_main:
        report(result, trainer, run_dir, "pairwise", held_out_by_family(trainer))
        print(f"next: llmkit ppo reward.model={run_dir}")
    return 0
