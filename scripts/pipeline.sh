#!/usr/bin/env bash
# Every stage on the tiny world, end to end on a CPU: tokenize -> pretrain -> sft -> reward -> ppo -> dpo -> evaluate,
# then one table of each stage's held-out metrics. Run from an empty directory: `make pipeline` or
#   bash scripts/pipeline.sh [OUT]            (OUT defaults to runs/pipeline)
set -euo pipefail
out=${1:-runs/pipeline}
limit=${LIMIT:-350}
mkdir -p "$out"
# TINY=1: the seconds-long recipes the tests use (tiny model, few steps) instead of the embedded defaults.
if [ "${TINY:-0}" = 1 ]; then
    tok=(tokenizer=bpe512 data.max_documents=400); r() { echo "tiny/$1"; }; limit=${LIMIT:-14}
else
    tok=(); r() { :; }
fi
step() { echo; echo "=== $*"; }

step tokenize;  llmkit tokenize "${tok[@]}" out_dir="$out/tokens" overwrite=true
step pretrain;  llmkit pretrain $(r pretrain) tokens_dir="$out/tokens" out_dir="$out/pretrain" train.overwrite=true
step sft;       llmkit sft $(r sft) init_from="$out/pretrain" out_dir="$out/sft" train.overwrite=true
step reward;    llmkit reward $(r reward) init_from="$out/sft" out_dir="$out/reward" train.overwrite=true
step ppo;       llmkit ppo $(r ppo) init_from="$out/sft" value_from="$out/reward" out_dir="$out/ppo" train.overwrite=true
step dpo;       llmkit dpo $(r dpo) init_from="$out/sft" out_dir="$out/dpo" train.overwrite=true
step evaluate
llmkit evaluate "runs=[$out/pretrain,$out/sft,$out/ppo,$out/dpo]" perplexity=false \
    "tasks=[tinyworld_gen,tinyworld_gen_sampled,tinyworld_choice]" limit="$limit" output="$out/eval.json"

python - "$out" <<'PY'
import json, math, sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
def logged(run, key):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]
results = {Path(r["run"]).name: {t["task"]: t for t in r["tasks"]} for r in json.loads((out / "eval.json").read_text())}
ppo_families = yaml.safe_load((out / "ppo" / "config.yaml").read_text())["data"]["tinyworld_families"]
def cell(stage, task, metric, families=None):
    t = results[stage][task]
    if families is None:
        m = t["metrics"][metric]
        return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"
    ms = [t["families"][f][metric] for f in families]  # equal-sized families: mean, spread from each interval
    value = sum(m["value"] for m in ms) / len(ms)
    half = 1.96 * math.sqrt(sum(((m["high"] - m["low"]) / 3.92) ** 2 for m in ms)) / len(ms)
    return f"{value:.3f} [{max(value - half, 0):.2f}, {min(value + half, 1):.2f}]"
ppo_sampled, ppo_greedy = logged("ppo", "val_sampled_reward"), logged("ppo", "val_reward")
extra = {
    "pretrain": f"val loss {logged('pretrain', 'val_loss')[-1]:.3f}",
    "sft": f"val loss {logged('sft', 'val_loss')[-1]:.3f}",
    "ppo": (f"held-out reward sampled {ppo_sampled[0]:.3f} -> {ppo_sampled[-1]:.3f}, greedy {ppo_greedy[0]:.3f} -> "
            f"{ppo_greedy[-1]:.3f}; KL to reference {logged('ppo', 'kl')[-1]:.3f}"),
    "dpo": f"held-out pair accuracy {logged('dpo', 'val_accuracy')[-1]:.3f}, margin {logged('dpo', 'val_margin')[-1]:.3f}",
}
fam = "/".join(ppo_families)
print(f"\n| stage | greedy exact match | sampled (T=1) exact match | sampled, PPO's families ({fam}) "
      "| choice accuracy | stage metric |")
print("|---|---|---|---|---|---|")
for stage in ("pretrain", "sft", "ppo", "dpo"):
    print(f"| {stage} | {cell(stage, 'tinyworld_gen', 'exact_match')} | {cell(stage, 'tinyworld_gen_sampled', 'exact_match')} "
          f"| {cell(stage, 'tinyworld_gen_sampled', 'exact_match', ppo_families)} "
          f"| {cell(stage, 'tinyworld_choice', 'accuracy')} | {extra[stage]} |")
held = json.loads((out / "reward" / "heldout.json").read_text())
by_family = held["by_family"]
correct = {f: v for f, v in by_family.items() if f != "style"}
pairs = sum(v["pairs"] for v in correct.values())
correctness = sum(v["accuracy"] * v["pairs"] for v in correct.values()) / pairs if pairs else float("nan")
style = f", style pairs {by_family['style']['accuracy']:.3f}" if "style" in by_family else ""
print(f"| reward model | | | | | held-out pair accuracy {held['val_accuracy']:.3f}: correctness pairs {correctness:.3f}"
      f"{style}; " + ", ".join(f"{f} {v['accuracy']:.2f}" for f, v in correct.items()) + " |")
PY
