"""`llmkit pretrain`: causal language modelling; with no arguments, a small model on the embedded corpus."""

from __future__ import annotations

import dataclasses
import shutil
from functools import partial
from pathlib import Path

from llmkit.commands.common import build_model, check_tokenizer_fits, load_trained, report_result, start_run
from llmkit.config.schema import PretrainConfig
from llmkit.data.config import CorpusConfig
from llmkit.data.lm import shard_windows
from llmkit.data.prepare import describe, prepare_tokens
from llmkit.data.shards import check_tokenizer, read_meta
from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import flops_per_token
from llmkit.tokenizer.bpe import TOKENIZER_FILE, load_tokenizer
from llmkit.tokenizer.config import TokenizerConfig
from llmkit.train import checkpoint as ckpt
from llmkit.train.loop import Trainer, TrainSpec
from llmkit.train.objectives import CausalLM
from llmkit.train.runtime import Runtime


def run(cfg: PretrainConfig, resolved_yaml: str) -> int:
    runtime, run_dir = start_run("pretrain", cfg, resolved_yaml)
    source = load_trained(cfg.init_from) if cfg.init_from else None
    if source is not None:
        _refuse_other_architecture(cfg, source.config)  # before tokenising a corpus for weights that cannot load
    tok_cfg = cfg.tokenizer
    if source is not None and not tok_cfg.path:  # the weights' own token ids, not a new BPE on this corpus
        tok_cfg = dataclasses.replace(tok_cfg, path=str(source.checkpoint / TOKENIZER_FILE))
    tokens_dir = Path(cfg.tokens_dir) if cfg.tokens_dir else _cached_tokens(cfg.data, tok_cfg, runtime)
    meta = read_meta(tokens_dir)
    weights = ckpt.resume_checkpoint(cfg.train.resume, run_dir / "checkpoints") or (source.checkpoint if source else None)
    if weights is not None:
        _check_weights_tokenizer(cfg, tokens_dir, weights)
    tokenizer = load_tokenizer(tokens_dir / TOKENIZER_FILE)
    check_tokenizer_fits(tokenizer.get_vocab_size(), cfg.model, str(tokens_dir))
    seq_len = cfg.train.seq_len or cfg.model.block_size
    if seq_len > cfg.model.block_size:
        raise UserError(f"train.seq_len={seq_len} is longer than the model's context model.block_size="
                        f"{cfg.model.block_size}; lower train.seq_len or raise model.block_size")
    train_set, val_set = shard_windows(tokens_dir, seq_len, cfg.train.seed)
    model = build_model(cfg.model, cfg.train.seed)
    if source is not None:
        ckpt.load_weights(model, source.model.state_dict(), source.checkpoint)
    if runtime.is_main:
        shutil.copyfile(tokens_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        print(f"model: {cfg.model.name}, {model.num_params() / 1e6:.2f}M parameters; data: {meta['train_tokens']} "
              f"train / {meta['val_tokens']} val tokens; run directory: {run_dir}")
    spec = TrainSpec(
        command="pretrain", model=model, objective=CausalLM(fused=cfg.train.fused_loss), train_set=train_set, val_set=val_set, run_dir=run_dir,
        meta={"command": "pretrain", "model": dataclasses.asdict(cfg.model), "tokens_dir": str(tokens_dir.resolve()),
              **_special_tokens(meta, tokenizer, cfg.tokenizer)},
        flops_per_token=partial(flops_per_token, cfg.model), files={TOKENIZER_FILE: tokens_dir / TOKENIZER_FILE},
    )
    result = Trainer(spec, cfg.train, cfg.optim, cfg.sched, cfg.logger, runtime).run()
    if runtime.is_main:
        report_result(result)
        print(f"next: llmkit generate run={run_dir} prompt='Return the'   |   llmkit evaluate runs=[{run_dir}]")
    return 0


def _special_tokens(shards_meta: dict, tokenizer, tok_cfg: TokenizerConfig) -> dict[str, str]:
    """The run's eos and pad tokens: those of the shards it trains on (tokens_dir may come from another tokenizer
    than the tokenizer.* settings), so that sft, generate and evaluate end and pad sequences as the shards do."""
    written = shards_meta.get("tokenizer_config") or {}
    eos = tokenizer.id_to_token(shards_meta["eos_id"]) if "eos_id" in shards_meta else tok_cfg.eos_token
    pad = written.get("pad_token") or tok_cfg.pad_token
    return {"eos_token": eos, "pad_token": pad if tokenizer.token_to_id(pad) is not None else eos}


# What a model's weights and function do not depend on: anything else must match init_from's model.
UNSHAPED = ("name", "dropout", "init_std", "pad_vocab_multiple")


def _refuse_other_architecture(cfg: PretrainConfig, theirs: ModelConfig) -> None:
    ours = cfg.model
    skip = (*UNSHAPED, "block_size") if ours.pos == theirs.pos == "rope" else UNSHAPED  # rope: no weights per position
    names = [f.name for f in dataclasses.fields(ours)
             if f.name not in skip and getattr(ours, f.name) != getattr(theirs, f.name)]
    if names:
        differ = ", ".join(f"{name} {getattr(theirs, name)} (config: {getattr(ours, name)})" for name in names)
        add = " ".join(f"model.{name}={_override_text(getattr(theirs, name))}" for name in names)
        raise UserError(f"init_from={cfg.init_from} holds another model than model={ours.name} describes; the "
                        f"checkpoint has {differ}. To train it, add: {add} (or the model= preset it was trained "
                        "with); or drop init_from")


def _override_text(value: object) -> str:
    """A config value as a command-line override writes it (null, true, 1e-05)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _cached_tokens(corpus: CorpusConfig, tok_cfg: TokenizerConfig, runtime: Runtime) -> Path:
    """Tokenise the configured corpus once (main process) and share the cached shards; a node whose LLMKIT_CACHE
    is not the main's makes its own copy (one process per node), which the trainer checks is the same data."""
    path = None
    if runtime.is_main:
        path, stats = prepare_tokens(corpus, tok_cfg)
        if stats is not None:
            print(f"tokenized the corpus: {describe(stats)}")
    runtime.barrier()
    if path is None and runtime.is_local_main:
        path, _ = prepare_tokens(corpus, tok_cfg)  # at once where the cache is shared
    runtime.barrier()
    if path is None:
        path, _ = prepare_tokens(corpus, tok_cfg)  # cached by now
    return path


def _check_weights_tokenizer(cfg: PretrainConfig, tokens_dir: Path, weights: Path) -> None:
    """Refuse shards whose tokenizer is not the one the weights (init_from's, or the checkpoint resumed) learnt."""
    theirs = weights / TOKENIZER_FILE
    if cfg.tokens_dir:
        fix = (f"tokenize the corpus with it (llmkit tokenize tokenizer.path={theirs} out_dir=<dir>) and pass "
               "tokens_dir=<dir>, or leave tokens_dir unset")
    elif cfg.tokenizer.path:
        fix = f"set tokenizer.path={theirs}, or leave it unset"
    else:
        fix = (f"the corpus (data.*) changed since {weights} was trained: restore it, or train on the new one in a new "
               f"run with init_from={weights} out_dir=<new dir>")
    check_tokenizer(tokens_dir, load_tokenizer(theirs), f"{theirs}, the tokenizer of the weights being trained", fix)
