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
from dataclasses import asdict
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules beside this script
from bench_common import Row, Settings, alternate, have_transformers, sample_peak  # noqa: E402
from bench_generate import bench_generate  # noqa: E402
from bench_train import bench_train, bench_vocab_padding  # noqa: E402

SECTIONS = ("train", "generate", "tokenize", "startup")


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
                        help="also time llmkit variants (plain loss, torch.compile, fused projections, AdamW kinds, vocab padding)")
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
            if name == "train" and st.experiments:
                rows += bench_vocab_padding(st)
    info["load_avg_end"] = os.getloadavg()[0]
    print_table(info, st, rows, notes)
    if args.json:
        payload = {"machine": info, "peak_gflops": st.peak / 1e9 if st.peaks else None, "peak_samples": st.peaks,
                   "reps": st.reps, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows], "notes": notes}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
