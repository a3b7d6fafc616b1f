"""scripts/bench.py, section 2: greedy generation tokens/s, llmkit `generate` vs HF `generate`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch
from bench_common import Row, Settings, alternate, build_pair, family_cfg, model_configs
from bench_train import fuse_projections

from llmkit.model.transformer import Transformer


def generation_sides(ours: Transformer, hf: Any, prompts: torch.Tensor, new: int, outs: dict[str, torch.Tensor],
                     fused: Transformer | None = None) -> dict[str, Callable[[], float]]:
    """Greedy decoding of `new` tokens after `prompts` (B, P), each side -> new tokens/s; outputs kept in outs."""
    from llmkit.generate import generate

    B, P = prompts.shape
    as_lists = prompts.tolist()

    def rate(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            outs[name] = fn()[:, P:]
            return B * new / (time.perf_counter() - start)
        return run

    def ours_on(model: Transformer, compile: bool = False) -> Callable[[], torch.Tensor]:
        return lambda: generate(model, as_lists, max_new_tokens=new, temperature=0.0, eos_id=None, compile=compile).tokens

    sides = {"llmkit": rate("llmkit", ours_on(ours)), "hf": rate("hf", lambda: hf.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
        max_new_tokens=new, min_new_tokens=new)), "llmkit compiled": rate("llmkit compiled", ours_on(ours, True))}
    return sides | ({"llmkit+fused_proj": rate("llmkit+fused_proj", ours_on(fused))} if fused is not None else {})


def bench_generate(st: Settings) -> list[Row]:
    rows: list[Row] = []
    base = next(iter(model_configs(st.quick).values()))
    new, prompt_len = (8, 8) if st.quick else (64, 16)
    for family in ("gpt2", "llama"):
        cfg = family_cfg(base, family)
        ours, hf = build_pair(cfg, family)
        fused = fuse_projections(copy.deepcopy(ours)) if st.experiments else None
        for batch in (1, 8):
            prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(2))
            outs: dict[str, torch.Tensor] = {}
            sides = generation_sides(ours, hf.eval(), prompts, new, outs, fused)
            start = time.perf_counter()
            for fn in sides.values():
                fn()  # warm-up (the compiled side compiles here)
            warmup = time.perf_counter() - start
            samples = alternate(sides, st.reps)
            full = all(o.shape == (batch, new) for o in outs.values())
            med = {k: median(v) for k, v in samples.items()}
            case = f"{family} {base.name} b{batch} P{prompt_len}+{new} greedy"
            peer = f"HF generate [{hf.config._attn_implementation}]"
            compiled_note = (f"{med['llmkit compiled'] / med['llmkit']:.2f}x eager llmkit; "
                             f"warm-up of all sides (compile incl.) {warmup:.0f} s; ")
            for side, label, note in (("llmkit", case, ""), ("llmkit compiled", f"{case}, compile=true", compiled_note)):
                same = (outs[side] == outs["hf"]).float().mean().item() if full else 0.0
                rows.append(Row(
                    "generate", label, med[side], med["hf"], "tok/s", peer,
                    f"{note}{'all' if full else 'NOT all'} {new} tokens; {same:.0%} same ids",
                    "x HF >= 2" if batch == 1 else "", med[side] / med["hf"] >= 2 if batch == 1 else None,
                    {k: samples[k] for k in (side, "hf")}))
            if "llmkit+fused_proj" in med:
                same = (outs["llmkit"] == outs["llmkit+fused_proj"]).float().mean().item()
                rows.append(Row("generate-x", f"{case}: llmkit+fused_proj", med["llmkit+fused_proj"], med["llmkit"],
                                "tok/s", "llmkit", f"{med['llmkit+fused_proj'] / med['hf']:.2f}x HF; {same:.0%} same ids",
                                samples={"llmkit+fused_proj": samples["llmkit+fused_proj"]}))
    return rows
