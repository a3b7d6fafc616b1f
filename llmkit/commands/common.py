"""Pieces every command shares: start a run, load a trained model back, print a short summary."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import UserError
from llmkit.model.config import ModelConfig
from llmkit.train import checkpoint as ckpt
from llmkit.train.rundir import prepare_run_dir
from llmkit.train.runtime import Runtime, setup_runtime


def start_run(command: str, cfg: Any, resolved_yaml: str) -> tuple[Runtime, Path]:
    """Runtime (device, processes) and the run directory, refusing clashes and a PEFT adapter as the
    starting model before anything is written."""
    refuse_adapter_start(getattr(cfg, "init_from", None), "init_from")
    runtime = setup_runtime(cfg.train.device, cfg.train.precision)
    run_dir, harmless = prepare_run_dir(command, cfg.out_dir, cfg.name, resolved_yaml, cfg.train.resume,
                                        cfg.train.overwrite, runtime.is_main)
    if runtime.world_size > 1:
        run_dir = _main_run_dir(runtime, run_dir)
    resumed = ckpt.resume_checkpoint(cfg.train.resume, run_dir / "checkpoints")
    if resumed is not None:  # before the changes are reported as allowed
        ckpt.refuse_past_the_end(resumed, cfg.train.max_steps, "iteration" if command == "ppo" else "step")
    runtime.barrier()
    seed_everything(cfg.train.seed)
    if harmless and runtime.is_main:
        print(f"resuming with changed settings: {'; '.join(harmless)}")
    return runtime, run_dir


SHARED_CHECK = ".llmkit-shared-check"


def _main_run_dir(runtime: Runtime, run_dir: Path) -> Path:
    """The main process's run directory (its timestamp, its checks), which every process must see: all of them
    write their part of each checkpoint there and resume from it. On several nodes that needs a filesystem they
    share; without one a run would train, then fail at its first checkpoint (or resume on some nodes only)."""
    import socket

    from llmkit.errors import SettingsError

    token = secrets.token_hex(8)
    if runtime.is_main:
        (run_dir / SHARED_CHECK).write_text(token)
    main_dir, token = runtime.gather((str(run_dir), token))[0]
    run_dir = Path(main_dir)
    try:
        seen = (run_dir / SHARED_CHECK).read_text() == token
    except OSError:
        seen = False
    views = runtime.gather((seen, socket.gethostname()))
    if runtime.is_main:
        (run_dir / SHARED_CHECK).unlink(missing_ok=True)
    blind = [f"{rank} (host {host})" for rank, (saw, host) in enumerate(views) if not saw]
    if blind:
        raise SettingsError(f"process(es) {', '.join(blind)} cannot see the run directory {run_dir.resolve()} that "
                            f"process 0 (host {views[0][1]}) made: every process writes its part of each checkpoint "
                            "there. On several nodes give out_dir= a path on a filesystem all nodes share, the same "
                            "path on each (start every node from the same directory, or give an absolute out_dir=)")
    return run_dir


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run (and anything it initialises, e.g. adapters) repeats exactly."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised model; the same seed gives the same weights on every process."""
    from llmkit.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(cfg)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    meta: dict[str, Any]
    checkpoint: Path
    weights_sha256: str | None = None  # of the checkpoint's weights, where a run records what it started from

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def load_trained(path: str, device: torch.device | str = "cpu") -> LoadedModel:
    """A model and its tokenizer from a run directory, checkpoint directory, `runs/<cmd>/latest`,
    or a PEFT run/adapter (the base is loaded from where the adapter says, then the adapter on top)."""
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer.bpe import load_tokenizer

    given = Path(path)
    if _is_adapter_dir(given):
        return _load_adapter_dir(given.resolve(), device)
    checkpoint = ckpt.resolve_checkpoint(path).resolve()  # absolute: runs record it as their base
    meta = ckpt.read_meta(checkpoint)
    if "model" not in meta:
        raise UserError(f"{checkpoint}/meta.json has no model config; was it written by llmkit?")
    if meta.get("kind") == "reward":
        raise UserError(f"{checkpoint} is a reward model (a scalar head, not a language model): use it as "
                        "reward.model= in `llmkit ppo`, or pick a pretrain/sft/peft/dpo/ppo run")
    tensors = ckpt.read_tensors(checkpoint / ckpt.WEIGHTS)
    if meta.get("kind") == "adapter":
        from llmkit.peft.apply import read_adapter_config

        config = read_adapter_config(checkpoint, ckpt.WEIGHTS)
        loaded = _adapter_base(meta.get("base"), checkpoint)
        _attach_adapter(loaded.model, checkpoint, config, tensors, loaded.tokenizer)
        return LoadedModel(loaded.model.to(device).eval(), load_tokenizer(checkpoint / "tokenizer.json"), meta, checkpoint)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = Transformer(ModelConfig(**{k: v for k, v in meta["model"].items() if k in known}))
    ckpt.load_weights(model, tensors, checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return LoadedModel(model.to(device).eval(), tokenizer, meta, checkpoint)


def load_start(init_from: str, default: str, needs: str, run_dir: Path, resume: str) -> LoadedModel:
    """The model a fine-tuning run starts from (`init_from`), with a how-to when the `default` run does not
    exist yet (`needs`: the command that makes it). A resumed run must start from the same checkpoint as before
    (its frozen base or reference is rebuilt from it), even when `init_from` names a moving `runs/<cmd>/latest`;
    `weights_sha256` is set for the checkpoint meta's base_sha256."""
    if init_from == default and not Path(init_from).exists():
        raise UserError(f"{default} does not exist: run {needs}; or pass init_from=<run or checkpoint>")
    base = load_trained(init_from)
    base.weights_sha256 = same_start(run_dir, resume, "init_from", init_from, base.checkpoint, "base")
    return base


def same_start(run_dir: Path, resume: str, key: str, value: str, checkpoint: Path, meta_key: str) -> str:
    """The sha256 of the weights `key`=`value` names now (`checkpoint`). A resumed run's checkpoint recorded the
    checkpoint it started from as meta[meta_key] and its weights' sha256 as meta[meta_key + "_sha256"]: a frozen
    model (a PEFT base, DPO's and PPO's reference, PPO's reward model) must still be that one, or the resumed run
    would silently train against another; UserError naming `key` when the path or the weights differ."""
    digest = ckpt.weights_sha256(checkpoint)
    previous = ckpt.resume_checkpoint(resume, run_dir / "checkpoints")
    meta = ckpt.read_meta(previous) if previous is not None else {}
    started, started_sha = meta.get(meta_key), meta.get(f"{meta_key}_sha256")
    if started and Path(started).resolve() != checkpoint.resolve():
        raise UserError(f"cannot resume {run_dir}: it started from {started} but {key}={value} is now "
                        f"{checkpoint}; pass {key}=<the original checkpoint>")
    if started_sha and started_sha != digest:
        raise UserError(f"cannot resume {run_dir}: {key}={value} ({checkpoint}) holds other weights than when the run "
                        "started (trained again or replaced at the same path since): restore that checkpoint, or "
                        "start a new run (another out_dir, or train.overwrite=true)")
    return digest


def _is_adapter_dir(path: Path) -> bool:
    """Whether `path` is a standalone adapter directory (a PEFT run's `adapter/`), not a checkpoint or run."""
    return (path / "adapter_config.json").is_file() and not (path / ckpt.COMPLETE).is_file() and \
        not (path / "checkpoints").is_dir()


def refuse_adapter_start(path: str | None, key: str) -> None:
    """Refuse (UserError) a PEFT run, checkpoint or adapter as the model a training run starts from: it is a
    base plus an adapter, and training it would save weights that no command can load."""
    from llmkit.peft.apply import read_adapter_config

    if not path:
        return
    given = Path(path)
    if _is_adapter_dir(given):
        source, run = given, given.parent
        config = read_adapter_config(source)
    else:
        try:
            source = ckpt.resolve_checkpoint(given)
        except UserError:
            return  # missing or not a checkpoint: the command's loader says so, with its how-to
        if ckpt.read_meta(source).get("kind") != "adapter":
            return
        run = source.parent.parent
        config = read_adapter_config(source, ckpt.WEIGHTS)
    base = config.get("base_info", {}).get("checkpoint", "(not recorded)")
    merged = run / "merged"
    if (merged / "latest").is_file():
        merge = f"use the run's merged copy, a plain checkpoint: {key}={merged}"
    else:
        merge = ("run `llmkit peft` again with merge=true: it also writes the merged model as a plain checkpoint "
                 f"to <its out_dir>/merged, to pass as {key}=")
    raise UserError(f"{key}={path} is a PEFT run/adapter ({config.get('peft', {}).get('method', '?')} on the base "
                    f"{base}), not a full model: training from it would save weights that no command can load. "
                    f"Start from the base ({key}={base}), or {merge}")


def _attach_adapter(model: torch.nn.Module, directory: Path, config: dict, tensors: dict, tokenizer) -> None:
    """Apply the adapter described by `config` (directory/adapter_config.json) to `model` and load its tensors,
    refusing a base that is not the one the adapter was trained on."""
    from llmkit.peft.apply import apply_peft, base_fingerprint
    from llmkit.peft.config import PeftConfig

    if config["base_fingerprint"] != base_fingerprint(model):
        raise UserError(f"the adapter in {directory} was trained on another base model "
                        f"({(config.get('base_info') or {}).get('checkpoint', 'unknown')}); load it onto that base")
    apply_peft(model, PeftConfig(**config["peft"]), tokenizer)
    missing = set(config["tensors"]) - set(tensors)
    if missing:
        raise UserError(f"{directory}: the adapter file lacks {sorted(missing)[:5]}")
    ckpt.load_weights(model, tensors, directory, strict=False)


def _adapter_base(base: str | None, adapter: Path) -> LoadedModel:
    """The plain base model that the adapter in `adapter` was trained on (older runs stored its path relative
    to the directory they were trained in; it is read from the current one)."""
    if not base:
        raise UserError(f"{adapter}: its adapter_config.json/meta.json does not say which base model it belongs to; "
                        "train the adapter again")
    if not Path(base).exists():
        relative = "" if Path(base).is_absolute() else \
            " (a relative path, read from the current directory: run from where the adapter was trained)"
        raise UserError(f"the base model of the adapter in {adapter}, {base}, does not exist{relative}; "
                        "put the base back there, or train the adapter again on a base that exists")
    return load_trained(base, "cpu")


def _load_adapter_dir(directory: Path, device) -> LoadedModel:
    """A standalone adapter directory (adapter.safetensors + adapter_config.json) on its recorded base."""
    from llmkit.peft.apply import ADAPTER_FILE, read_adapter_config

    config = read_adapter_config(directory)
    info = config.get("base_info") or {}
    base_path = info.get("checkpoint")
    loaded = _adapter_base(base_path, directory)
    _attach_adapter(loaded.model, directory, config, ckpt.read_tensors(directory / ADAPTER_FILE), loaded.tokenizer)
    meta = {**loaded.meta, "kind": "adapter", "base": base_path, "step": info.get("step")}  # the adapter's steps
    if info.get("chat_template"):  # the template the adapter was tuned with
        meta["chat_template"] = info["chat_template"]
    return LoadedModel(loaded.model.to(device).eval(), loaded.tokenizer, meta, directory)


def write_model_checkpoint(model: torch.nn.Module, directory: Path, meta: dict, tokenizer_path: Path) -> Path:
    """A plain, complete checkpoint (loadable by generate/evaluate/sft) of a model that is not a training run's:
    a merged PEFT model, an imported HF one. Returns it; `directory` names it through its `latest` pointer."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.begin_checkpoint(directory, meta.get("step", 0))
    meta = {**meta, "model": dataclasses.asdict(model.cfg)}
    return ckpt.finish_checkpoint(directory, tmp, meta.get("step", 0), model.state_dict(), {}, meta,
                                  {"tokenizer.json": tokenizer_path})


def kept_template(template: str | None) -> str | None:
    """The chat template a run records: a built-in name as is, anything else (a file, an HF directory) as its Jinja
    source, so that the run renders prompts the same from any directory and after the file moves."""
    from llmkit.tokenizer.chat import BUILTIN_TEMPLATES, resolve_template

    return template if template is None or template in BUILTIN_TEMPLATES else resolve_template(template)


def inherited_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What a run started from another keeps of its meta (tokens, tokens' names, template), not its progress."""
    return {k: v for k, v in meta.items() if k not in ("step", "val_loss", "kind")}


def report_result(result: Any) -> None:
    """The end of a supervised run: final step, validation loss and perplexity, the last checkpoint."""
    import math

    if result.last_val is not None:
        print(f"done: step {result.step}, validation loss {result.last_val:.4f} "
              f"(perplexity {math.exp(min(result.last_val, 50)):.4g})")
    print(f"checkpoint: {result.checkpoint}")


def shown(path: Path) -> str:
    """`path` as a message shows it: relative to the working directory when inside it (checkpoints are kept
    absolute, so that runs record where their base is wherever they are read from)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_tokenizer_fits(vocab_size: int, cfg: ModelConfig, source: str) -> None:
    if vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer from {source} has {vocab_size} tokens but model.vocab_size={cfg.vocab_size}; "
                        f"set model.vocab_size={vocab_size} (or more) or train a smaller tokenizer")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
