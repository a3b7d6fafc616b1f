"""Activation checkpointing: peak memory and step time with and without it, one fresh process per variant.

    python scripts/bench_memory.py [--model conf/model/gpt2_14m.yaml] [--batch 8] [--seq 256] [--steps 6] [--loss plain]

Each variant runs in its own subprocess (so one's peak cannot hide the other's): the model, AdamW, then
`--steps` timed training steps (forward, backward, optimizer) after one warm-up step, on CPU with one thread.
The loss is what `llmkit pretrain` computes by default (`--loss fused`: lm_head and cross-entropy in chunks, no
(B, T, V) logits); `--loss plain` builds the full logits (`train.fused_loss=false`).
Peak memory is the process's maximum resident set size (`resource.getrusage`); "training peak" subtracts the
peak reached before the first step (Python, torch, model, optimizer). A benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args: argparse.Namespace) -> dict[str, float]:
    """One variant, in this process: returns peak RSS figures and the median step time."""
    import torch
    import yaml

    from llmkit.config.schema import OptimConfig
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.train.objectives import CausalLM
    from llmkit.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**yaml.safe_load(Path(args.model).read_text()))).train()
    model.activation_checkpointing = args.checkpointing
    optimizer = build_optimizer(model, OptimConfig(), "cpu")
    objective = CausalLM(fused=args.loss == "fused")
    x = torch.randint(model.cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    before = max_rss_mb()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss_sum, _ = objective(model, batch)
        loss = loss_sum / batch["labels"].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    peak = max_rss_mb()
    return {"peak_rss_mb": peak, "before_steps_mb": before, "training_peak_mb": peak - before,
            "step_s": statistics.median(times), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "conf" / "model" / "gpt2_14m.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", choices=["fused", "plain"], default="fused", help="train.fused_loss true / false")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
              "--threads", str(args.threads), "--loss", args.loss]
    env_note = (f"{Path(args.model).stem}, batch {args.batch} x {args.seq}, {args.loss} loss, {args.threads} thread(s), "
                f"{args.steps} steps")
    print(f"activation checkpointing: {env_note}")
    print(f"{'variant':<10} {'peak RSS':>10} {'before steps':>13} {'training peak':>14} {'step (median)':>14}")
    results = {}
    for name, flag in (("off", []), ("on", ["--checkpointing"])):
        done = subprocess.run([sys.executable, __file__, "--worker", *common, *flag], capture_output=True, text=True,
                              check=True, env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin",
                                               "PYTHONPATH": str(ROOT)})
        r = results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:<10} {r['peak_rss_mb']:>8.0f} MB {r['before_steps_mb']:>10.0f} MB {r['training_peak_mb']:>11.0f} MB "
              f"{r['step_s']:>12.3f} s")
    off, on = results["off"], results["on"]
    print(f"training peak: {on['training_peak_mb'] / off['training_peak_mb']:.2f}x; "
          f"step time: {on['step_s'] / off['step_s']:.2f}x; same loss: {abs(on['loss'] - off['loss']) < 1e-5}")


if __name__ == "__main__":
    main()
