"""llmkit vs its peers, side by side in one run: training, generation, tokenizing and start-up.

Each comparison alternates the two sides (A B, then B A, ...) in short measurements and reports
medians, so a busy machine slows both sides alike. Training MFU is flops_per_token * tokens/s over
the fp32 2048x2048 matmul peak measured in the same run with the same thread count (best sample).

    python scripts/bench.py --threads 1                # everything (~5 minutes on a quiet 2-core machine)
    python scripts/bench.py --quick                    # toy shapes, ~10-20 s: a smoke run
    python scripts/bench.py --only train,generate --experiments --json bench.json   # + llmkit variants
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer, flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "generate", "tokenize", "startup")
LLAMA_STYLE = dict(norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False, bias=False)


@dataclass
class Row:
    """One comparison: medians of both sides (peer None when there is no peer), the goal and whether it is met."""

    section: str
    case: str
    ours: float
    peer: float | None
    unit: str
    peer_name: str = ""
    note: str = ""
    goal: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None


@dataclass
class Settings:
    """The run's options and the peak samples collected along the way."""

    threads: int
    quick: bool
    reps: int
    experiments: bool = False  # also time llmkit variants (suggested model/loop changes) against llmkit
    peaks: list[float] = field(default_factory=list)  # GFLOP/s samples; the best is the peak

    @property
    def peak(self) -> float:
        return max(self.peaks) * 1e9


def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each side's measurement `reps` times, flipping the order every round (ABBA...)."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            out[name].append(sides[name]())
    return out


def sample_peak(st: Settings, n: int = 2048) -> None:
    """One fp32 n x n matmul, timed; appended to st.peaks (GFLOP/s)."""
    a, b = torch.full((n, n), 0.5), torch.full((n, n), 0.25)
    start = time.perf_counter()
    a @ b
    st.peaks.append(2 * n**3 / (time.perf_counter() - start) / 1e9)


def machine_info(threads: int) -> dict[str, Any]:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    hf_version = importlib.metadata.version("transformers") if have_transformers() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": hf_version, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_avg_start": os.getloadavg()[0]}


# ----- models -----------------------------------------------------------------------------------
def model_configs(quick: bool) -> dict[str, ModelConfig]:
    """The benchmark shapes: ~14M (conf/model/gpt2_14m.yaml) and ~30M; a toy shape with --quick."""
    if quick:
        return {"toy": ModelConfig(name="toy", vocab_size=512, block_size=64, n_layer=2, n_head=2, d_model=64)}
    import yaml

    return {"14M": ModelConfig(**yaml.safe_load((ROOT / "conf/model/gpt2_14m.yaml").read_text())),
            "30M": ModelConfig(name="gpt2_30m", vocab_size=8192, block_size=256, n_layer=8, n_head=8, d_model=512)}


def family_cfg(base: ModelConfig, family: str) -> ModelConfig:
    """The same dims GPT-2 style (as given) or Llama style (RMSNorm, RoPE, SwiGLU, untied, no bias)."""
    if family == "gpt2":
        return base
    return ModelConfig(**{**asdict(base), "name": base.name + "_llama", **LLAMA_STYLE})


def build_pair(cfg: ModelConfig, family: str) -> tuple[Transformer, Any]:
    """Our Transformer and the HF model of the same architecture with the same weights (SDPA attention)."""
    import transformers

    from llmkit.model.hf import config_to_hf, state_dict_to_hf

    transformers.logging.set_verbosity_error()  # config_to_hf's GPT-2 defaults warn about bos/eos 50256

    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_cfg = config_to_hf(cfg, family)
    hf_cfg.bos_token_id = hf_cfg.eos_token_id = None  # the family defaults (50256; 2) are not our tokens
    hf_cfg.pad_token_id = 0
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg, family))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


# ----- 1. training ------------------------------------------------------------------------------
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def ours_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())


class LinearCrossEntropy(torch.autograd.Function):
    """Experiment: mean cross-entropy of h @ w.T by row chunks, gradients made in the forward (same matmul
    FLOPs as lm_head forward + backward); only one (chunk, V) block of logits is ever live."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        n = h.size(0)
        loss, grad_h, grad_w = h.new_zeros(()), torch.empty_like(h), torch.zeros_like(w)
        for i in range(0, n, chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = hc @ w.t()  # (chunk, V)
            lse = torch.logsumexp(logits, -1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(yc)), yc] -= 1  # d(loss sum)/d(logits)
            torch.mm(probs, w, out=grad_h[i:i + chunk])
            grad_w.addmm_(probs.t(), hc)
        ctx.save_for_backward(grad_h.div_(n), grad_w.div_(n))
        return loss / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None


def fused_ce_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = model(x, return_hidden=True).flatten(0, 1)
    return LinearCrossEntropy.apply(hidden, model.lm_head.weight, y.flatten())


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


TRAIN_EXPERIMENTS: dict[str, tuple[Callable[[Transformer], torch.nn.Module], LossFn]] = {
    "llmkit+compile": (torch.compile, ours_loss),  # what train.compile=true does
    "llmkit+fused_ce": (lambda m: m, fused_ce_loss),
    "llmkit+fused_proj": (fuse_projections, ours_loss),
}


def train_steps(model: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                st: Settings) -> tuple[Callable[[], float], Callable[[], float]]:
    """(one plain step: forward, cross-entropy, backward, AdamW, zero_grad -> loss; a peak sample, then the
    step timed -> tokens/s). The optimizer is llmkit's recipe (fused AdamW, decay on matrices) for either model."""
    from llmkit.config.schema import OptimConfig
    from llmkit.train.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=1e-3, fused=True), "cpu")
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
            models: dict[str, tuple[torch.nn.Module, LossFn]] = {"llmkit": (ours, ours_loss), "hf": (hf, hf_loss)}
            if st.experiments and size in ("14M", "toy"):
                models |= {k: (prep(copy.deepcopy(ours)), fn) for k, (prep, fn) in TRAIN_EXPERIMENTS.items()}
            sides, losses = {}, {}
            for name, (model, loss_fn) in models.items():
                warmup, sides[name] = train_steps(model, loss_fn, x, y, st)
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


# ----- 2. generation ----------------------------------------------------------------------------
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

    def ours_on(model: Transformer) -> Callable[[], torch.Tensor]:
        return lambda: generate(model, as_lists, max_new_tokens=new, temperature=0.0, eos_id=None).tokens

    sides = {"llmkit": rate("llmkit", ours_on(ours)), "hf": rate("hf", lambda: hf.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
        max_new_tokens=new, min_new_tokens=new))}
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
            for fn in sides.values():
                fn()  # warm-up
            samples = alternate(sides, st.reps)
            full = all(o.shape == (batch, new) for o in outs.values())
            same = (outs["llmkit"] == outs["hf"]).float().mean().item() if full else 0.0
            med = {k: median(v) for k, v in samples.items()}
            case = f"{family} {base.name} b{batch} P{prompt_len}+{new} greedy"
            rows.append(Row(
                "generate", case, med["llmkit"], med["hf"], "tok/s", f"HF generate [{hf.config._attn_implementation}]",
                f"{'all' if full else 'NOT all'} {new} tokens; {same:.0%} same ids",
                "x HF >= 2" if batch == 1 else "", med["llmkit"] / med["hf"] >= 2 if batch == 1 else None,
                {k: samples[k] for k in ("llmkit", "hf")}))
            if "llmkit+fused_proj" in med:
                same = (outs["llmkit"] == outs["llmkit+fused_proj"]).float().mean().item()
                rows.append(Row("generate-x", f"{case}: llmkit+fused_proj", med["llmkit+fused_proj"], med["llmkit"],
                                "tok/s", "llmkit", f"{med['llmkit+fused_proj'] / med['hf']:.2f}x HF; {same:.0%} same ids",
                                samples={"llmkit+fused_proj": samples["llmkit+fused_proj"]}))
    return rows


# ----- 3. tokenizing ----------------------------------------------------------------------------
def thread_ticks() -> dict[str, int]:
    """CPU ticks (user + system) of each OS thread of this process (Linux /proc); {} elsewhere."""
    ticks = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        ticks[task.name] = int(fields[11]) + int(fields[12])
    return ticks


def bench_tokenize(st: Settings) -> list[Row]:
    from llmkit.data.embedded import embedded_documents
    from llmkit.data.shards import parallel_encoding, write_token_shards
    from llmkit.tokenizer.bpe import token_id, train_bpe
    from llmkit.tokenizer.config import EOS_TOKEN

    docs = embedded_documents()
    if st.quick:
        docs = docs[:300]
    start = time.perf_counter()
    tok = train_bpe(docs, 4096)
    train_s = time.perf_counter() - start
    eos = token_id(tok, EOS_TOKEN)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    cores: dict[str, list[float]] = {}
    workers: dict[str, list[int]] = {}

    def timed(name: str, fn: Callable[[], object]) -> float:
        before, wall, cpu = thread_ticks(), time.perf_counter(), time.process_time()
        fn()
        wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, thread_ticks()
        cores.setdefault(name, []).append(cpu / wall)  # process time: all threads' CPU seconds
        workers.setdefault(name, []).append(sum(after[t] - before.get(t, 0) >= 2 for t in after))
        return mb / wall

    def ours() -> float:
        with tempfile.TemporaryDirectory() as out:
            return timed("llmkit", lambda: write_token_shards(docs, tok, out, val_fraction=0.05, eos_id=eos))

    def bare(method: str) -> Callable[[], float]:
        def run() -> float:
            with parallel_encoding(True):  # as write_token_shards: all cores
                return timed(method, lambda: getattr(tok, method)(docs, add_special_tokens=False))
        return run

    sides = {"llmkit": ours} | {m: bare(m) for m in ("encode_batch", "encode_batch_fast") if hasattr(tok, m)}
    for fn in sides.values():
        fn()  # warm-up
    cores.clear()
    workers.clear()
    samples = alternate(sides, st.reps)
    rows = []
    for peer in sides.keys() - {"llmkit"}:
        overhead = 1 - median(samples["llmkit"]) / median(samples[peer])
        busy = (f"{median(cores['llmkit']):.1f} vs {median(cores[peer]):.1f} of {os.cpu_count()} cores busy, "
                f"work on {max(workers['llmkit'])} vs {max(workers[peer])} threads")
        rows.append(Row("tokenize", f"embedded {mb:.2f} MB, bpe 4096 (trained in {train_s:.1f}s)",
                        median(samples["llmkit"]), median(samples[peer]), "MB/s", f"tokenizers {peer}",
                        f"overhead {overhead:.0%}; {busy}; TOKENIZERS_PARALLELISM=true",
                        "overhead < 20%", overhead < 0.2, {k: samples[k] for k in ("llmkit", peer)}))
    return sorted(rows, key=lambda r: r.peer_name)


# ----- 4. start-up ------------------------------------------------------------------------------
def llmkit_command() -> list[str]:
    """The console script beside this Python (else on PATH, else `python -m llmkit`)."""
    script = Path(sys.executable).parent / "llmkit"
    found = str(script) if script.is_file() else shutil.which("llmkit")
    return [found] if found else [sys.executable, "-m", "llmkit"]


def bench_startup(st: Settings) -> list[Row]:
    cmd = llmkit_command()
    env = {**os.environ, "COLUMNS": "120"}

    def timed(args: list[str]) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as cwd:
                start = time.perf_counter()
                subprocess.run(cmd + args, cwd=cwd, env=env, check=True, capture_output=True)
                return time.perf_counter() - start
        return run

    samples = alternate({"--help": timed(["--help"]), "pretrain --print-config": timed(["pretrain", "--print-config"])},
                        5 if not st.quick else 3)
    rows = []
    for args, limit in (("--help", 0.3), ("pretrain --print-config", 2.0)):
        value = median(samples[args])
        rows.append(Row("startup", f"{Path(cmd[-1]).name} {args}", value, None, "s", note=" ".join(cmd),
                        goal=f"< {limit} s", met=value < limit, samples={args: samples[args]}))
    return rows


# ----- report -----------------------------------------------------------------------------------
def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} {unit}" if unit == "s" else f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def print_table(info: dict[str, Any], st: Settings, rows: list[Row], notes: list[str]) -> None:
    print(f"machine: {info['cpu']} ({info['cores']} cores), threads {info['threads']}, torch {info['torch']}, "
          f"transformers {info['transformers'] or 'not installed'}, python {info['python']}, {info['date']}, "
          f"load avg at start {info['load_avg_start']:.2f}")
    if st.peaks:
        print(f"fp32 matmul peak (2048^3, {info['threads']} thread(s)): {st.peak / 1e9:.1f} GFLOP/s "
              f"(best of {len(st.peaks)}; median {median(st.peaks):.1f})")
    print(f"medians of {st.reps} alternating measurements per side" + (" (--quick: toy shapes)" if st.quick else "")
          + f"; load avg at end {info['load_avg_end']:.2f}")
    header = ("section", "case", "llmkit", "peer", "ratio", "peer is", "notes", "goal", "met")
    table = [header] + [(r.section, r.case, fmt(r.ours, r.unit), fmt(r.peer, r.unit),
                         f"{r.ratio:.2f}x" if r.ratio else "-", r.peer_name or "-", r.note or "-", r.goal or "-",
                         "-" if r.met is None else "yes" if r.met else "NO") for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (default 1)")
    parser.add_argument("--quick", action="store_true", help="toy shapes and few repetitions: a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--reps", type=int, default=None, help="alternating measurements per side (default 5; 2 quick)")
    parser.add_argument("--experiments", action="store_true",
                        help="also time llmkit variants (torch.compile, fused lm_head+CE, fused projections)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results (all samples) here")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    st = Settings(args.threads, args.quick, args.reps or (2 if args.quick else 5), args.experiments)
    info = machine_info(args.threads)
    rows: list[Row] = []
    notes: list[str] = []
    needs_hf = {"train", "generate"} & set(only)
    if needs_hf and not have_transformers():
        notes.append(f"transformers is not installed: {', '.join(sorted(needs_hf))} skipped (pip install transformers)")
        only = [s for s in only if s not in needs_hf]
    if "train" in only:
        for _ in range(2 if st.quick else 5):
            sample_peak(st)
    sections = {"train": bench_train, "generate": bench_generate, "tokenize": bench_tokenize, "startup": bench_startup}
    for name in SECTIONS:
        if name in only:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            rows += sections[name](st)
    info["load_avg_end"] = os.getloadavg()[0]
    print_table(info, st, rows, notes)
    if args.json:
        payload = {"machine": info, "peak_gflops": st.peak / 1e9 if st.peaks else None, "peak_samples": st.peaks,
                   "reps": st.reps, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows], "notes": notes}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
