"""`llmkit ppo`: PPO on an SFT policy with a frozen reference, a value model and a reward model or rule."""

from __future__ import annotations

import copy

import torch

from llmkit.commands.common import same_start, shown, start_run
from llmkit.commands.reward import load_sft_base, pair_meta
from llmkit.config.schema_align import PPOConfig
from llmkit.errors import UserError
from llmkit.model.heads import ScalarModel, load_scalar_model
from llmkit.rl.ppo import PPOModels, PPOTrainer
from llmkit.rl.rewards import ModelReward, build_reward_source
from llmkit.rl.rollout import load_prompts
from llmkit.tokenizer.bpe import load_tokenizer


def value_trunk(path: str | None, base) -> torch.nn.Module | None:
    """The trunk of the reward run `path` (its head is dropped: values live on another scale), checked to read
    the policy's tokens; None when no path is given."""
    if path is None:
        return None
    model, _, checkpoint = load_scalar_model(path)
    if load_tokenizer(checkpoint / "tokenizer.json").to_str() != base.tokenizer.to_str():
        raise UserError(f"value_from={path}: {checkpoint} was trained with another tokenizer than {base.checkpoint}; "
                        "pass a reward run trained from the same SFT run (or value_from=null)")
    return model.trunk


def run(cfg: PPOConfig, resolved_yaml: str) -> int:
    runtime, run_dir = start_run("ppo", cfg, resolved_yaml)
    base = load_sft_base(cfg, "ppo", run_dir)
    tokenizer, meta, block = base.tokenizer, base.meta, base.model.cfg.block_size
    if cfg.rollout.max_new_tokens >= block:
        raise UserError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {block} tokens; lower it")
    template = cfg.data.chat_template or meta.get("chat_template") or "chatml"
    eos_token = meta.get("eos_token", "<|endoftext|>")
    room = block - cfg.rollout.max_new_tokens
    prompts, dropped = load_prompts(cfg.data, "train", tokenizer, template, eos_token, room)
    val_prompts, _ = load_prompts(cfg.data, "validation", tokenizer, template, eos_token, room)
    if len(prompts) < cfg.rollout.batch_size:
        raise UserError(f"only {len(prompts)} training prompts fit in {room} tokens ({dropped} longer dropped), fewer "
                        f"than rollout.batch_size={cfg.rollout.batch_size}; use more data or a smaller batch")
    reward = build_reward_source(cfg.reward, tokenizer, runtime.device)
    unanswered = next((p for p in [*prompts, *val_prompts] if p.answer is None), None)
    if getattr(reward, "needs_answers", False) and unanswered is not None:
        raise UserError(f"{unanswered.where}: no '{cfg.data.answer_field}' (missing or null), and reward.rule="
                        f"{reward.name} scores every response against its prompt's answer (data.answer_field); add "
                        "the answer, drop the record, or score with a trained reward model (reward.model=<reward run>)")
    torch.manual_seed(cfg.train.seed)  # the value head's initial weights
    models = PPOModels(policy=base.model, reference=copy.deepcopy(base.model),
                       value=ScalarModel(value_trunk(cfg.value_from, base) or copy.deepcopy(base.model)))
    if runtime.is_main:
        (run_dir / "tokenizer.json").write_text(tokenizer.to_str())
        print(f"ppo: {len(prompts)} training prompts ({dropped} too long dropped), {len(val_prompts)} held out; reward: "
              f"{reward.name}; {cfg.rollout.batch_size} responses of <= {cfg.rollout.max_new_tokens} tokens per "
              f"iteration; starting from {shown(base.checkpoint)}; run directory: {run_dir}")
    run_meta = {**pair_meta(base, "ppo", template, base.model.cfg), "reward": reward.name}
    if isinstance(reward, ModelReward):  # a frozen model the run reads at every iteration: a resume needs the same
        run_meta |= {"reward_checkpoint": str(reward.checkpoint.resolve()),
                     "reward_checkpoint_sha256": same_start(run_dir, cfg.train.resume, "reward.model", cfg.reward.model,
                                                            reward.checkpoint, "reward_checkpoint")}
    trainer = PPOTrainer(cfg, models, reward, tokenizer, prompts, val_prompts, runtime, run_dir, run_meta,
                         {"tokenizer.json": run_dir / "tokenizer.json"})
    checkpoint = trainer.run()
    if runtime.is_main:
        first, last = trainer.first_val, trainer.last_val
        if last:
            change = {key: (f"{first[key]:.3f} -> " if key in first else "") + f"{last[key]:.3f}"
                      for key in ("val_sampled_reward", "val_reward")}
            print(f"done: iteration {trainer.iteration}, held-out reward sampled at T={cfg.rollout.temperature:g} "
                  f"{change['val_sampled_reward']}, greedy {change['val_reward']} (score {last['val_score']:.3f}, "
                  f"{last['val_ended']:.0%} ended with eos)")
        print(f"checkpoint: {checkpoint}")
        print(f"next: llmkit generate run={run_dir} prompt='What is 12 + 30?'")
    return 0
