"""scripts/bench.py, section 1: training tokens/s and MFU, llmkit vs HF, and llmkit's levers (--experiments)."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from statistics import median

import torch
import torch.nn.functional as F
from bench_common import Row, Settings, alternate, build_pair, family_cfg, model_configs, sample_peak

from llmkit.model.transformer import Transformer, flops_per_token
from llmkit.train.objectives import CausalLM, linear_cross_entropy, unwrap

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """train.fused_loss=false (llmkit's CausalLM): the (B, T, V) logits, padded columns -inf, F.cross_entropy."""
    return CausalLM()(model, {"input_ids": x, "labels": y})[0] / y.numel()


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())


def fused_ce_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """llmkit's training loss (train.fused_loss=true): lm_head + cross-entropy by 256-row chunks, as a mean."""
    hidden = model(x, return_hidden=True).flatten(0, 1)
    inner = unwrap(model)
    return linear_cross_entropy(hidden, inner.lm_head.weight, y.flatten(), inner.cfg.vocab_size) / y.numel()


class _FusedLinear(torch.nn.Module):
    """Several nn.Linear on the same input as one matmul; _Part i returns slice i (computed at part 0)."""

    def __init__(self, parts: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.weight = torch.nn.Parameter(torch.cat([p.weight.detach() for p in parts]))
        self.bias = None if parts[0].bias is None else torch.nn.Parameter(torch.cat([p.bias.detach() for p in parts]))
        self.out: tuple[torch.Tensor, ...] = ()


class _Part(torch.nn.Module):
    def __init__(self, fused: _FusedLinear, index: int) -> None:
        super().__init__()
        self.fused, self.index = [fused], index  # a list: not a submodule, the parameters stay in one place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused[0]
        if self.index == 0:
            fused.out = F.linear(x, fused.weight, fused.bias).split(fused.sizes, -1)
        out = fused.out[self.index]
        if self.index == len(fused.sizes) - 1:
            fused.out = ()  # the last part: hold no activations between calls
        return out


def fuse_projections(model: Transformer) -> Transformer:
    """Experiment: q|k|v as one matmul per attention and gate|up as one per SwiGLU MLP (same weights)."""
    for block in model.blocks:
        for owner, names in ((block.attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            if not all(hasattr(owner, n) for n in names):
                continue
            fused = _FusedLinear([getattr(owner, n) for n in names])
            owner.fused = fused
            for i, n in enumerate(names):
                setattr(owner, n, _Part(fused, i))
    return model


ours_loss = fused_ce_loss  # the llmkit side trains as `llmkit pretrain` does by default
# name -> (the model change, the loss, torch's AdamW implementation: fused, foreach or for-loop)
TRAIN_EXPERIMENTS: dict[str, tuple[Callable[[Transformer], torch.nn.Module], LossFn, str]] = {
    "llmkit-fused_loss": (lambda m: m, plain_loss, "fused"),  # train.fused_loss=false
    "llmkit+compile": (torch.compile, ours_loss, "fused"),  # train.compile=true
    "llmkit+fused_proj": (fuse_projections, ours_loss, "fused"),
    "llmkit-fused_adamw": (lambda m: m, ours_loss, "for-loop"),  # optim.fused=false: torch's per-tensor AdamW on CPU
    "llmkit+foreach_adamw": (lambda m: m, ours_loss, "foreach"),  # one multi-tensor kernel per op (no switch)
}


def train_steps(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                st: Settings, adamw: str = "fused") -> tuple[Callable[[], float], Callable[[], float]]:
    """(one plain step: forward, cross-entropy, backward, AdamW, zero_grad -> loss; a peak sample, then the
    step timed -> tokens/s). The optimizer is llmkit's recipe (fused AdamW, decay on matrices) for either model;
    `adamw` picks torch's implementation of the same update: fused, foreach or for-loop."""
    from llmkit.config.schema import OptimConfig
    from llmkit.train.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=1e-3, fused=adamw == "fused"), "cpu")
    for group in opt.param_groups:
        group["foreach"] = adamw == "foreach"
    model.train()

    def step() -> float:
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed() -> float:
        sample_peak(st)  # a peak sample beside every step: the best one is the machine's peak
        start = time.perf_counter()
        step()
        return x.numel() / (time.perf_counter() - start)

    return step, timed


def bench_train(st: Settings) -> list[Row]:
    rows: list[Row] = []
    batch = 2 if st.quick else 8
    for size, base in model_configs(st.quick).items():
        for family in ("gpt2", "llama"):
            cfg = family_cfg(base, family)
            T = cfg.block_size
            data = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(1))
            x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
            ours, hf = build_pair(cfg, family)
            models: dict[str, tuple[torch.nn.Module, LossFn, str]] = {"llmkit": (ours, ours_loss, "fused"),
                                                                      "hf": (hf, hf_loss, "fused")}
            if st.experiments and size in ("14M", "toy"):
                models |= {k: (prep(copy.deepcopy(ours)), fn, adamw) for k, (prep, fn, adamw) in TRAIN_EXPERIMENTS.items()}
            sides, losses = {}, {}
            for name, (model, loss_fn, adamw) in models.items():
                warmup, sides[name] = train_steps(model, loss_fn, x, y, st, adamw)
                losses[name] = [warmup() for _ in range(2)]  # the 2nd loss checks the 1st step's gradients too
            samples = alternate(sides, st.reps)
            med = {k: median(v) for k, v in samples.items()}
            fpt = flops_per_token(cfg, T)
            mfu = {k: v * fpt / st.peak for k, v in med.items()}
            gate = "x HF >= 1.3" + (", MFU >= 60%" if size == "14M" else "")
            diff = max(abs(a - b) for a, b in zip(losses["llmkit"], losses["hf"]))
            rows.append(Row(
                "train", f"{family} {size} ({ours.num_params() / 1e6:.1f}M) b{batch} T{T}", med["llmkit"], med["hf"], "tok/s",
                f"HF {type(hf).__name__} [{hf.config._attn_implementation}]",
                f"MFU {mfu['llmkit']:.0%} vs {mfu['hf']:.0%}; loss diff {diff:.0e}", gate,
                med["llmkit"] / med["hf"] >= 1.3 and (size != "14M" or mfu["llmkit"] >= 0.6), {k: samples[k] for k in ("llmkit", "hf")}))
            for name in TRAIN_EXPERIMENTS:
                if name in samples:
                    diff = max(abs(a - b) for a, b in zip(losses["llmkit"], losses[name]))
                    rows.append(Row("train-x", f"{family} {size}: {name}", med[name], med["llmkit"], "tok/s", "llmkit",
                                    f"{med[name] / med['hf']:.2f}x HF; MFU {mfu[name]:.0%}; loss diff {diff:.0e}",
                                    samples={name: samples[name]}))
            del ours, hf, models, sides
    return rows


def bench_vocab_padding(st: Settings) -> list[Row]:
    """Experiment: model.pad_vocab_multiple=64 vs 1 at vocabularies that are not multiples of 64 (same weights)."""
    rows: list[Row] = []
    base = next(iter(model_configs(st.quick).values()))
    batch = 2 if st.quick else 8
    for vocab in ((500,) if st.quick else (8100, 50257)):
        unpadded = dataclasses.replace(base, vocab_size=vocab, pad_vocab_multiple=1)
        padded = dataclasses.replace(unpadded, pad_vocab_multiple=64)
        torch.manual_seed(0)
        models = {"unpadded": Transformer(unpadded), "padded": Transformer(padded)}
        models["padded"].load_state_dict(models["unpadded"].state_dict())  # zero rows appended
        T = base.block_size
        data = torch.randint(0, vocab, (batch, T + 1), generator=torch.Generator().manual_seed(1))
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        for loss_name, loss_fn in (("fused loss", ours_loss), ("plain loss", plain_loss)):
            sides, losses = {}, {}
            for name, model in models.items():
                warmup, sides[name] = train_steps(copy.deepcopy(model), loss_fn, x, y, st)
                losses[name] = [warmup() for _ in range(2)]
            samples = alternate(sides, st.reps)
            med = {k: median(v) for k, v in samples.items()}
            diff = max(abs(a - b) for a, b in zip(losses["padded"], losses["unpadded"]))
            rows.append(Row("train-x", f"gpt2 {base.name} V{vocab}: padded to {padded.padded_vocab}, {loss_name}",
                            med["padded"], med["unpadded"], "tok/s", "llmkit unpadded", f"loss diff {diff:.0e}",
                            samples=samples))
    return rows
