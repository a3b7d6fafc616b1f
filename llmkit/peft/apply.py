"""Entry points: put a PEFT method on a frozen base Transformer, count, switch off and merge it.

`apply_peft` freezes every base tensor (requires_grad False: no .grad, no optimizer state) and adds
the method in place; the trainable tensors are exactly the adapter (`adapter_state_dict`). Base
tensor names never change (LoRA layers keep `weight`/`bias`; the others add new names), so a base
checkpoint loads into the model before or after. Merging is out of place: `merge_adapter` builds a
new plain Transformer and leaves the adapted model (and its base weights) untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmkit.errors import UserError
from llmkit.fileio import save_safetensors
from llmkit.model.transformer import Transformer
from llmkit.peft.adapters import add_bias_delta, add_bottleneck_adapters, add_ia3, merged_hooked_linear
from llmkit.peft.config import MERGEABLE, TARGET_SHORTCUTS, TARGETED_METHODS, PeftConfig
from llmkit.peft.lora import DoRALinear, LoRALinear
from llmkit.peft.nf4 import NF4Linear, QLoRALinear, nf4_memory
from llmkit.peft.prefix import PrefixTuning, PromptTuning

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = 1
# Model settings that do not change the weights' meaning: ignored when matching an adapter to its base.
NON_ARCHITECTURE = ("name", "dropout")


@dataclass
class PeftState:
    """What apply_peft recorded on the model (as `model.peft_state`)."""

    cfg: PeftConfig
    base_fingerprint: str  # of the base before the method was applied (see base_fingerprint)
    adapter_keys: list[str]  # state-dict names of the adapter's (trainable) tensors


@dataclass
class PeftInfo:
    """What apply_peft did, for the log and the table printed before training."""

    method: str
    targets: list[str]  # adapted base modules, or the added modules (adapter, prefix, prompt)
    trainable_params: int
    total_params: int  # qlora: NF4 weights counted as in*out parameters
    nf4_bytes: int = 0  # qlora: bytes of the NF4 base weights (codes + scales)
    fp32_bytes: int = 0  # qlora: bytes of the same weights in fp32

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params


@dataclass
class SummaryRow:
    """One line of the trainable-parameter table: a group of adapted modules (layer index as *) or 'total'."""

    name: str
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def peft_state(model: nn.Module) -> PeftState:
    """The record apply_peft left on `model`; ValueError if it has none."""
    state = getattr(model, "peft_state", None)
    if state is None:
        raise ValueError("this model has no PEFT method applied (call apply_peft or load_adapter first)")
    return state


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base's tensor names, shapes and two checksums each (sum |w|, sum w^2 in float64,
    4 significant digits: the same weights in another precision or device give the same print)."""
    if getattr(model, "peft_state", None) is not None:
        raise ValueError("base_fingerprint needs the plain base model (this one has PEFT applied)")
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.double()
            digest.update(f"{name}:{tuple(t.shape)}:{float(t.abs().sum()):.4e}:{float(t.pow(2).sum()):.4e}\n".encode())
    return digest.hexdigest()


def _target_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers (in the blocks, or lm_head) that the patterns select, in model order."""
    linears = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (name.startswith("blocks.") or name == "lm_head")]
    chosen: set[str] = set()
    for pattern in patterns:
        leaves = TARGET_SHORTCUTS.get(pattern, (pattern,))
        hits = {name for name in linears if name == pattern or name.rsplit(".", 1)[-1] in leaves}
        if not hits:
            raise UserError(f"peft.targets: {pattern!r} matches no linear layer of this model; its layers are "
                            f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))}")
        chosen |= hits
    return [name for name in linears if name in chosen]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _prompt_ids(model: Transformer, cfg: PeftConfig, tokenizer) -> Tensor:
    """cfg.num_virtual_tokens ids: the init text's tokens repeated/cut to length, or random vocabulary ids."""
    n, device = cfg.num_virtual_tokens, model.tok_emb.weight.device
    if cfg.prompt_init_text is None:
        return torch.randint(model.cfg.vocab_size, (n,), device=device)
    ids = tokenizer.encode(cfg.prompt_init_text).ids
    return torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.long, device=device)


def _apply_method(model: Transformer, cfg: PeftConfig, targets: list[str], tokenizer) -> list[str]:
    """Add the method to the frozen model; returns the adapted or added modules' names."""
    lora = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "rslora": cfg.rslora}
    if cfg.method in ("lora", "dora"):
        cls = LoRALinear if cfg.method == "lora" else DoRALinear
        for name in targets:
            _swap(model, name, cls(model.get_submodule(name), **lora))
    elif cfg.method == "qlora":  # every linear in the blocks is stored in NF4; the targets also get LoRA
        nf4 = {"block_size": cfg.nf4_block_size, "double_quant": cfg.double_quant}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.startswith("blocks."):
                _swap(model, name, QLoRALinear(module, **nf4, **lora) if name in targets else NF4Linear(module, **nf4))
        if "lm_head" in targets:  # outside the blocks: stays full precision
            _swap(model, "lm_head", LoRALinear(model.lm_head, **lora))
    elif cfg.method == "ia3":
        for name in targets:
            add_ia3(model.get_submodule(name), on_input=name.endswith("down_proj"))
    elif cfg.method == "bitfit":
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and m.bias is not None]
        targets = sorted(targets + norms, key=list(dict(model.named_modules())).index)
        for name in targets:
            add_bias_delta(model.get_submodule(name))
    elif cfg.method == "adapter":
        targets = add_bottleneck_adapters(model, cfg.adapter_size)
    elif cfg.method == "prefix":
        model.prefix_tuning = PrefixTuning(model, cfg.num_virtual_tokens, cfg.prefix_projection, cfg.prefix_hidden)
        targets = ["prefix_tuning"]
    else:
        assert cfg.method == "prompt", cfg.method
        model.prompt_tuning = PromptTuning(model, _prompt_ids(model, cfg, tokenizer))
        targets = ["prompt_tuning"]
    return targets


def apply_peft(model: Transformer, cfg: PeftConfig, tokenizer=None) -> PeftInfo:
    """Freeze `model` and add cfg's method in place (tokenizer: only for prompt_init_text)."""
    if getattr(model, "peft_state", None) is not None:
        raise ValueError("a PEFT method is already applied to this model")
    targets = _target_modules(model, cfg.target_patterns()) if cfg.method in TARGETED_METHODS else []
    if cfg.method in ("prefix", "prompt") and cfg.num_virtual_tokens >= model.cfg.block_size:
        raise UserError(f"peft.num_virtual_tokens={cfg.num_virtual_tokens} must be below the model's "
                        f"block_size={model.cfg.block_size}")
    if cfg.prompt_init_text is not None and tokenizer is None:
        raise ValueError("peft.prompt_init_text needs the tokenizer: pass apply_peft(..., tokenizer=)")
    fingerprint = base_fingerprint(model)
    model.requires_grad_(False)  # after the checks: a refused config leaves the model as it was
    targets = _apply_method(model, cfg, targets, tokenizer)
    adapter_keys = [name for name, p in model.named_parameters() if p.requires_grad]
    model.peft_state = PeftState(cfg, fingerprint, adapter_keys)
    total = trainable_summary(model)[-1]
    nf4_bytes, fp32_bytes = nf4_memory(model)
    return PeftInfo(cfg.method, targets, total.trainable, total.total, nf4_bytes, fp32_bytes)


def _count(modules: list[nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameters of the modules and their children, shared tensors once; NF4
    weights count as in*out parameters."""
    params = {id(p): p for m in modules for p in m.parameters()}
    nf4 = {id(m): m for root in modules for m in root.modules() if isinstance(m, NF4Linear)}
    total = sum(p.numel() for p in params.values()) + sum(m.in_features * m.out_features for m in nf4.values())
    return sum(p.numel() for p in params.values() if p.requires_grad), total


def trainable_summary(model: nn.Module) -> list[SummaryRow]:
    """Rows per adapted module group (the layer index replaced by *), in model order, then 'total'.

    A group's total counts its modules' own tensors (e.g. a LoRA layer's base weight and bias plus
    lora_a and lora_b); the last row counts the whole model."""
    groups: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "peft_enabled"):
            groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), []).append(module)
    rows = [SummaryRow(group, *_count(modules)) for group, modules in groups.items()]
    return [*rows, SummaryRow("total", *_count([model]))]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter's tensors (detached, contiguous): what save_adapter writes and a peft run checkpoints."""
    keys = set(peft_state(model).adapter_keys)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keys}


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base (qlora: the NF4 base), e.g. PPO's reference policy."""
    peft_state(model)
    modules = [m for m in model.modules() if hasattr(m, "peft_enabled")]
    before = [m.peft_enabled for m in modules]
    for m in modules:
        m.peft_enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.peft_enabled = flag


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain Transformer state dict equivalent to the adapted model (lora, dora, qlora, ia3, bitfit).

    New tensors for the merged layers; the model is unchanged. qlora merges into the dequantised
    NF4 weights (it equals the qlora model, not the original fp base). BitFit on layers built without
    bias yields `bias` entries that the base lacks (merge_adapter then sets bias=True)."""
    state = peft_state(model)
    if state.cfg.method not in MERGEABLE:
        raise UserError(f"peft.method={state.cfg.method} cannot be merged into plain weights (only "
                        f"{', '.join(MERGEABLE)}); generate and evaluate load the base with its adapter instead")
    adapter_keys = set(state.adapter_keys)
    out = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, NF4Linear):
            for part in module.part_names:
                del out[f"{prefix}weight_{part}"]
        if isinstance(module, (LoRALinear, QLoRALinear)):
            out[f"{prefix}weight"] = module.merged_weight()
        elif isinstance(module, NF4Linear):
            out[f"{prefix}weight"] = module.dequantized_weight()
        if hasattr(module, "ia3_scale") or hasattr(module, "bias_delta"):
            weight, bias = merged_hooked_linear(module, out[f"{prefix}weight"], out.get(f"{prefix}bias"))
            out[f"{prefix}weight"] = weight
            if bias is not None:
                out[f"{prefix}bias"] = bias
    return out


@torch.no_grad()
def merge_adapter(model: Transformer) -> Transformer:
    """A new plain Transformer (standard keys) whose outputs match the adapted model's to fp32 tolerance.

    Its config is the base's, except bias=True when BitFit added biases the base lacks (the other layers get zero
    biases) and tie_embeddings=False when an adapted lm_head no longer equals tok_emb."""
    merged_sd = merged_state_dict(model)
    if "lm_head.bias" in merged_sd:
        raise UserError("BitFit on lm_head trained an output bias that a plain model has no place for: it cannot be "
                        "merged; generate and evaluate load the base with its adapter")
    cfg = model.cfg
    tie = cfg.tie_embeddings and torch.equal(merged_sd["lm_head.weight"], merged_sd["tok_emb.weight"])
    with torch.device("meta"):  # the base's own keys (Qwen2 style: q/k/v biases), without allocating weights
        base_keys = set(Transformer(cfg).state_dict())
    bias = cfg.bias or any(k.endswith(".bias") and k.startswith("blocks.") and k not in base_keys for k in merged_sd)
    weight = model.tok_emb.weight
    merged = Transformer(dataclasses.replace(cfg, bias=bias, tie_embeddings=tie)).to(weight.device, weight.dtype)
    for key, tensor in merged.state_dict().items():
        if key not in merged_sd:
            assert key.endswith(".bias"), f"merged state dict lacks {key}"
            merged_sd[key] = torch.zeros_like(tensor)
    merged.load_state_dict(merged_sd, strict=True)
    return merged.train(model.training)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: Transformer, cfg: PeftConfig, directory: str | Path, base_info: dict[str, Any] | None = None) -> Path:
    """Write adapter.safetensors (the adapter's tensors only) and adapter_config.json (cfg, the base's
    model config and fingerprint, and `base_info`: anything that identifies the base for people, e.g.
    its checkpoint path). Returns the directory."""
    state = peft_state(model)
    if cfg != state.cfg:
        raise ValueError(f"save_adapter got {cfg}, but the model carries {state.cfg}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    meta = {"format": ADAPTER_FORMAT, "peft": dataclasses.asdict(cfg), "base_model": dataclasses.asdict(model.cfg),
            "base_fingerprint": state.base_fingerprint, "base_info": base_info or {},
            "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    _write_atomic(out / ADAPTER_FILE, lambda p: save_safetensors(tensors, p, {"format": str(ADAPTER_FORMAT)}))
    _write_atomic(out / ADAPTER_CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_adapter_config(directory: str | Path, weights: str = ADAPTER_FILE) -> dict[str, Any]:
    """adapter_config.json of a saved adapter whose tensors are in `weights` (a PEFT run's checkpoints keep
    them in model.safetensors); UserError when the directory holds no adapter."""
    src = Path(directory)
    if not (src / ADAPTER_CONFIG_FILE).is_file() or not (src / weights).is_file():
        raise UserError(f"{src} is not a saved adapter: it needs {ADAPTER_CONFIG_FILE} and {weights}")
    try:
        meta = json.loads((src / ADAPTER_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{src / ADAPTER_CONFIG_FILE} is unreadable ({err}): the adapter is corrupted; "
                        "restore it or train it again") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{src / ADAPTER_CONFIG_FILE} is not an llmkit adapter config (format {ADAPTER_FORMAT})")
    missing = [key for key in ("peft", "base_model", "base_fingerprint", "tensors") if key not in meta]
    if missing:
        raise UserError(f"{src / ADAPTER_CONFIG_FILE} lacks {', '.join(missing)}: the adapter is incomplete or "
                        "corrupted; restore it or train it again")
    return meta


def load_adapter(model: Transformer, directory: str | Path, base_info: dict[str, Any] | None = None) -> PeftInfo:
    """Apply a saved adapter to the plain base `model` in place. Refuses (UserError) an adapter made for
    another architecture or another base (fingerprint); `base_info` describes this base in the message."""
    from safetensors.torch import load_file

    src = Path(directory)
    meta = read_adapter_config(src)
    saved_base = f" (adapter base: {meta.get('base_info')}; this base: {base_info})" if meta.get("base_info") or base_info else ""
    ours = dataclasses.asdict(model.cfg)
    diffs = [f"model.{k}={meta['base_model'].get(k)!r} vs {v!r}" for k, v in ours.items()
             if k not in NON_ARCHITECTURE and meta["base_model"].get(k) != v]
    if diffs:
        raise UserError(f"adapter {src} was trained on a different architecture (adapter vs this base: "
                        f"{'; '.join(diffs)}){saved_base}")
    if base_fingerprint(model) != meta["base_fingerprint"]:
        raise UserError(f"adapter {src} was trained on a different base model: same architecture, "
                        f"different weights (fingerprint mismatch){saved_base}")
    cfg = PeftConfig(**meta["peft"])
    info = apply_peft(model, dataclasses.replace(cfg, prompt_init_text=None))  # the init is overwritten below
    model.peft_state.cfg = cfg
    tensors = load_file(str(src / ADAPTER_FILE), device=str(model.tok_emb.weight.device))
    missing = sorted(set(model.peft_state.adapter_keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.peft_state.adapter_keys))
    if missing or unexpected:
        raise UserError(f"{src / ADAPTER_FILE} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise UserError(f"{src / ADAPTER_FILE} does not fit this model: {err}") from err
    return info
