"""`llmkit dpo`: align an SFT policy on preference pairs with DPO or IPO, against a frozen copy of itself."""

from __future__ import annotations

import copy

from llmkit.commands.common import start_run
from llmkit.commands.reward import held_out_by_family, load_sft_base, pair_data, pair_meta, report
from llmkit.config.schema_align import DPOConfig
from llmkit.model.transformer import flops_per_token
from llmkit.rl.rewards import DPOObjective, PairTrainer
from llmkit.train.loop import TrainSpec


def run(cfg: DPOConfig, resolved_yaml: str) -> int:
    runtime, run_dir = start_run("dpo", cfg, resolved_yaml)
    base = load_sft_base(cfg, "dpo", run_dir)
    sets, template = pair_data(cfg, base, run_dir, runtime.is_main)
    policy = base.model.train()
    reference = copy.deepcopy(policy).to(runtime.device)  # the initial policy, before any resume loads newer weights
    objective = DPOObjective(reference, cfg.loss.kind, cfg.loss.beta, cfg.loss.label_smoothing, cfg.loss.nll_weight)
    losses = {"kind": cfg.loss.kind, "beta": cfg.loss.beta, "nll_weight": cfg.loss.nll_weight}
    spec = TrainSpec(
        command="dpo", model=policy, objective=objective, train_set=sets.train, val_set=sets.val, run_dir=run_dir,
        meta={**pair_meta(base, "dpo", template, policy.cfg), "dpo": losses},
        flops_per_token=lambda width: flops_per_token(policy.cfg, width) * 8 / 6,  # + the reference's forward pass
        files={"tokenizer.json": run_dir / "tokenizer.json"},
    )
    trainer = PairTrainer(spec, cfg.train, cfg.optim, cfg.sched, cfg.logger, runtime)
    result = trainer.run()
    if runtime.is_main:
        report(result, trainer, run_dir, "implicit-reward", held_out_by_family(trainer))
        print(f"next: llmkit generate run={run_dir} prompt='What is 12 + 30?'")
    return 0
