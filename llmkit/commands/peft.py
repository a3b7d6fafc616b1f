"""`llmkit peft`: LoRA and its family on a frozen base, trained by the shared loop; saves only the adapter."""

from __future__ import annotations

import dataclasses
from functools import partial

from rich.console import Console
from rich.table import Table

from llmkit.commands.common import (
    inherited_meta,
    kept_template,
    report_result,
    shown,
    start_run,
    write_model_checkpoint,
)
from llmkit.commands.sft import load_base
from llmkit.config.schema import PeftRunConfig
from llmkit.data.instruct import instruction_sets
from llmkit.data.lm import shard_windows
from llmkit.data.prepare import prepare_tokens
from llmkit.errors import UserError
from llmkit.model.transformer import Transformer, flops_per_token
from llmkit.peft.apply import (
    apply_peft,
    merge_adapter,
    peft_state,
    save_adapter,
    trainable_summary,
)
from llmkit.peft.config import PeftConfig
from llmkit.tokenizer.config import TokenizerConfig
from llmkit.train.loop import Trainer, TrainSpec
from llmkit.train.objectives import CausalLM
from llmkit.train.runtime import Runtime, sharded_launch

# Methods whose forward hooks fail on sharded parameters, and the launches that shard them (tested on CPU: prefix
# tuning trains under FSDP as in one process; prompt tuning runs the blocks on its virtual tokens before the forward).
NOT_SHARDED = {"prompt": ("FSDP", "DeepSpeed ZeRO-3"), "prefix": ("DeepSpeed ZeRO-3",)}


def run(cfg: PeftRunConfig, resolved_yaml: str) -> int:
    sharding = sharded_launch()
    if sharding in NOT_SHARDED.get(cfg.peft.method, ()):
        elsewhere = " or FSDP (conf/accelerate/fsdp.yaml)" if "FSDP" not in NOT_SHARDED[cfg.peft.method] else ""
        raise UserError(f"peft={cfg.peft.method} does not run under {sharding}: its hooks use the adapter's weights "
                        "outside the model's forward, where sharded weights are not gathered. Launch it with DDP "
                        "(conf/accelerate/ddp.yaml, launcher.num_processes=N), ZeRO-2 (conf/accelerate/deepspeed_zero2"
                        f".yaml){elsewhere}, or use a module-swap method such as peft=lora")
    runtime, run_dir = start_run("peft", cfg, resolved_yaml)
    base = load_base(cfg, "peft", run_dir)
    model, tokenizer, meta = base.model, base.tokenizer, base.meta
    seq_len = cfg.train.seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size:
        raise UserError(f"train.seq_len={seq_len} is longer than the model's context ({model.cfg.block_size})")
    if runtime.is_main:
        (run_dir / "tokenizer.json").write_text(tokenizer.to_str())
    if cfg.objective == "sft":
        pad_id = tokenizer.token_to_id(meta.get("pad_token", "<|pad|>")) or 0
        sets = instruction_sets(cfg.data, tokenizer, seq_len, meta.get("eos_token", "<|endoftext|>"), pad_id)
        train_set, val_set = sets.train, sets.val
    else:
        tok_cfg = TokenizerConfig(path=str(run_dir / "tokenizer.json"), eos_token=meta.get("eos_token", "<|endoftext|>"))
        tokens_dir, _ = prepare_tokens(cfg.corpus, tok_cfg, out_dir=run_dir / "tokens")
        train_set, val_set = shard_windows(tokens_dir, seq_len, cfg.train.seed)
    info = apply_peft(model, cfg.peft, tokenizer)
    if runtime.is_main:
        print_summary(model, info)
    # instruction tuning renders prompts in data.chat_template from now on; corpus tuning keeps the base's
    template = kept_template(cfg.data.chat_template) if cfg.objective == "sft" else meta.get("chat_template")
    base_info = {"checkpoint": str(base.checkpoint), **({"chat_template": template} if template else {})}
    if runtime.is_main:
        save_adapter(model, cfg.peft, run_dir / "adapter", base_info)  # the config, now
    spec = TrainSpec(
        command="peft", model=model, objective=CausalLM(fused=cfg.train.fused_loss), train_set=train_set, val_set=val_set, run_dir=run_dir,
        meta={**inherited_meta(meta), "command": "peft", "kind": "adapter", "chat_template": template,
              "base": str(base.checkpoint), "base_sha256": base.weights_sha256,
              "model": dataclasses.asdict(model.cfg)},
        flops_per_token=partial(flops_per_token, model.cfg, adapter_params=info.trainable_params),
        saved_keys=frozenset(peft_state(model).adapter_keys),
        files={"tokenizer.json": run_dir / "tokenizer.json", "adapter_config.json": run_dir / "adapter" / "adapter_config.json"},
    )
    result = Trainer(spec, cfg.train, cfg.optim, cfg.sched, cfg.logger, runtime).run()
    trained = unsharded(model, runtime, cfg.peft, tokenizer)
    if trained is not None:
        save_adapter(trained, cfg.peft, run_dir / "adapter", {**base_info, "step": result.step})
        if cfg.merge:
            merged = write_model_checkpoint(merge_adapter(trained), run_dir / "merged", {**spec.meta, "kind": "full",
                                                                                        "step": result.step},
                                             run_dir / "tokenizer.json")
            print(f"merged checkpoint: {merged}")
        report_result(result)
        size = (run_dir / "adapter" / "adapter.safetensors").stat().st_size
        print(f"adapter: {run_dir / 'adapter'} ({size / 1e3:.1f} kB)")
        print(f"next: llmkit evaluate 'runs=[{shown(base.checkpoint)},{run_dir}]' tasks=[tinyworld_gen]")
    return 0


def unsharded(model: Transformer, runtime: Runtime, peft: PeftConfig, tokenizer) -> Transformer | None:
    """The trained model as one plain module on the main process, None on the others (every process calls this).

    Under FSDP or ZeRO-3 each process holds only shards of the weights: they are gathered (a collective) into a new
    model of the same structure, which carries the live model's PEFT record (its base fingerprint included).
    """
    if not runtime.sharded:
        return model if runtime.is_main else None
    full = runtime.full_state_dict(model)  # the main process gets every tensor, tied ones once
    if not runtime.is_main:
        return None
    plain = Transformer(model.cfg)
    apply_peft(plain, peft, tokenizer)
    plain.peft_state = peft_state(model)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or set(missing) - runtime.tied:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return plain.train(model.training)


def print_summary(model, info) -> None:
    """The parameter table: total, trainable and their share, per adapted module group."""
    table = Table(title=f"peft: {info.method} (base frozen)")
    for column in ("module", "trainable", "total", "share"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in trainable_summary(model):
        table.add_row(row.name, f"{row.trainable:,}", f"{row.total:,}", f"{100 * row.share:.2f}%")
    console = Console(highlight=False)
    console.print(table)
    if info.nf4_bytes:
        console.print(f"qlora base weights: {info.nf4_bytes / 1e6:.2f} MB in NF4 vs {info.fp32_bytes / 1e6:.2f} MB fp32")


