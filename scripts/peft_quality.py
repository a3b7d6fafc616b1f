"""Each PEFT method next to full SFT on the tiny world: held-out exact match, trainable share, optimizer state,
adapter size and peak memory, after the same number of steps from the same pretrained base.

    python scripts/peft_quality.py --base runs/pretrain/latest --steps 300 --limit 140

Runs the real CLI (`llmkit sft`, `llmkit peft`, `llmkit evaluate`) in subprocesses and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["full", "lora", "dora", "qlora", "ia3", "bitfit", "adapter", "prefix", "prompt"]
# Learning rates per method: adapters need larger steps than full fine-tuning.
LEARNING_RATES = {"full": 2e-3, "lora": 5e-3, "dora": 5e-3, "qlora": 5e-3, "ia3": 2e-2, "bitfit": 1e-2,
                  "adapter": 5e-3, "prefix": 1e-2, "prompt": 2e-2}


def run(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run `llmkit <args>`; returns (seconds, peak resident memory in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"llmkit {' '.join(args)} failed:\n{proc.stderr.read()}")
    return time.perf_counter() - start, usage.ru_maxrss // 1024


def optimizer_state_mb(run_dir: Path) -> float:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / latest / "state.pt", weights_only=True)["optimizer"]["state"]
    return sum(t.numel() * t.element_size() for s in state.values() for k, t in s.items() if k != "step") / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/pretrain/latest", help="the pretrained run to start from")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--limit", type=int, default=140, help="held-out tiny-world questions scored")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="runs/peft_quality")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = Path(args.out)
    rows = []
    for method in args.methods.split(","):
        run_dir = out / method
        common = [f"init_from={args.base}", f"out_dir={run_dir}", f"train.max_steps={args.steps}", "train.overwrite=true",
                  f"optim.lr={LEARNING_RATES[method]}", "logger.tensorboard=false", f"train.save_every={args.steps}"]
        command = ["sft", *common] if method == "full" else ["peft", f"peft={method}", *common]
        seconds, peak_mb = run(command, env)
        result = out / f"{method}.json"
        run(["evaluate", f"runs=[{run_dir}]", "perplexity=false", "tasks=[tinyworld_gen]", f"limit={args.limit}",
             f"output={result}"], env)
        task = json.loads(result.read_text())[0]["tasks"][0]
        em = task["metrics"]["exact_match"]
        adapter = run_dir / "adapter" / "adapter.safetensors"
        rows.append((method, em["value"], em["low"], em["high"], task["n"], optimizer_state_mb(run_dir),
                     adapter.stat().st_size / 1e3 if adapter.exists() else None, peak_mb, seconds))
        print(f"{method}: exact match {em['value']:.3f} ({seconds:.0f} s)", file=sys.stderr)
    print(f"\n{args.steps} steps from {args.base}, {args.threads} thread(s); exact match on {args.limit} held-out "
          "tiny-world questions (greedy), 95% Wilson interval\n")
    print("| method | exact match | 95% interval | optimizer state | adapter file | peak RSS | time |")
    print("|---|---|---|---|---|---|---|")
    for method, value, low, high, n, opt_mb, adapter_kb, peak, seconds in rows:
        adapter_text = f"{adapter_kb:.0f} kB" if adapter_kb is not None else "(full model)"
        print(f"| {method} | {value:.3f} | [{low:.3f}, {high:.3f}] n={n} | {opt_mb:.2f} MB | {adapter_text} | "
              f"{peak} MB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
