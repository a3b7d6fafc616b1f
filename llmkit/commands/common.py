"""Pieces every command shares: start a run, load a trained model back, print a short summary."""

from __future__ import annotations

import dataclasses
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
    """Runtime (device, processes) and the run directory, refusing clashes before anything is written."""
    runtime = setup_runtime(cfg.train.device, cfg.train.precision)
    run_dir, harmless = prepare_run_dir(command, cfg.out_dir, cfg.name, resolved_yaml, cfg.train.resume,
                                        cfg.train.overwrite, runtime.is_main)
    runtime.barrier()
    if harmless and runtime.is_main:
        print(f"resuming with changed settings: {'; '.join(harmless)}")
    return runtime, run_dir


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

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def load_trained(path: str, device: torch.device | str = "cpu") -> LoadedModel:
    """A model and its tokenizer from a run directory, checkpoint directory or `runs/<cmd>/latest`."""
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer.bpe import load_tokenizer

    checkpoint = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    if "model" not in meta:
        raise UserError(f"{checkpoint}/meta.json has no model config; was it written by llmkit?")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = Transformer(ModelConfig(**{k: v for k, v in meta["model"].items() if k in known}))
    ckpt.load_weights(model, ckpt.read_tensors(checkpoint / ckpt.WEIGHTS), checkpoint)
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return LoadedModel(model.to(device).eval(), tokenizer, meta, checkpoint)


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
