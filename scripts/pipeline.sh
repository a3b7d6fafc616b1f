#!/usr/bin/env bash
# Every stage on the tiny world, end to end on a CPU: tokenize -> pretrain -> sft -> reward -> ppo -> dpo -> evaluate,
# then one table of each stage's held-out metrics. Run from an empty directory: `make pipeline` or
#   bash scripts/pipeline.sh [OUT]            (OUT defaults to runs/pipeline)
set -euo pipefail
out=${1:-runs/pipeline}
limit=${LIMIT:-140}
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
step ppo;       llmkit ppo $(r ppo) init_from="$out/sft" out_dir="$out/ppo" train.overwrite=true
step dpo;       llmkit dpo $(r dpo) init_from="$out/sft" out_dir="$out/dpo" train.overwrite=true
step evaluate
llmkit evaluate "runs=[$out/pretrain,$out/sft,$out/ppo,$out/dpo]" perplexity=false \
    "tasks=[tinyworld_gen,tinyworld_gen_sampled,tinyworld_choice]" limit="$limit" output="$out/eval.json"

python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def last(run, key):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None
def first(run, key):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    return values[0] if values else None
results = {Path(r["run"]).name: {t["task"]: t["metrics"] for t in r["tasks"]} for r in json.loads((out / "eval.json").read_text())}
def cell(stage, task, metric):
    m = results[stage][task][metric]
    return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"
print("\n| stage | greedy exact match | sampled (T=1) exact match | choice accuracy | stage metric |")
print("|---|---|---|---|---|")
extra = {
    "pretrain": f"val loss {last('pretrain', 'val_loss'):.3f}",
    "sft": f"val loss {last('sft', 'val_loss'):.3f}",
    "dpo": f"held-out pair accuracy {last('dpo', 'val_accuracy'):.3f}",
}
extra["ppo"] = (f"held-out mean reward {first('ppo', 'val_reward'):.3f} -> {last('ppo', 'val_reward'):.3f}, "
                f"KL to reference {last('ppo', 'kl'):.3f}")
for stage in ("pretrain", "sft", "ppo", "dpo"):
    print(f"| {stage} | {cell(stage, 'tinyworld_gen', 'exact_match')} | {cell(stage, 'tinyworld_gen_sampled', 'exact_match')} "
          f"| {cell(stage, 'tinyworld_choice', 'accuracy')} | {extra[stage]} |")
print(f"| reward model | | | | held-out pair accuracy {last('reward', 'val_accuracy'):.3f} |")
PY
