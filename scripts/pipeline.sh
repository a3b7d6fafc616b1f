#!/usr/bin/env bash
# Every stage on the tiny world, end to end on a CPU: tokenize -> pretrain -> sft -> reward -> ppo -> dpo -> evaluate,
# then one table of each stage's held-out metrics. Run from an empty directory: `make pipeline` or
#   bash scripts/pipeline.sh [OUT]            (OUT defaults to runs/pipeline)
set -euo pipefail
out=${1:-runs/pipeline}
limit=${LIMIT:-350}
family_limit=${FAMILY_LIMIT:-400}  # PPO's own families: more test questions than their 50 each in the main table
mkdir -p "$out"
# TINY=1: the seconds-long recipes the tests use (tiny model, few steps) instead of the embedded defaults.
if [ "${TINY:-0}" = 1 ]; then
    tok=(tokenizer=bpe512 data.max_documents=400); r() { echo "tiny/$1"; }; limit=${LIMIT:-14}; family_limit=${FAMILY_LIMIT:-8}
else
    tok=(); r() { :; }
fi
step() { echo; echo "=== $*"; }

step tokenize;  llmkit tokenize "${tok[@]}" out_dir="$out/tokens"
step pretrain;  llmkit pretrain $(r pretrain) tokens_dir="$out/tokens" out_dir="$out/pretrain" train.overwrite=true
step sft;       llmkit sft $(r sft) init_from="$out/pretrain" out_dir="$out/sft" train.overwrite=true
step reward;    llmkit reward $(r reward) init_from="$out/sft" out_dir="$out/reward" train.overwrite=true
step ppo;       llmkit ppo $(r ppo) init_from="$out/sft" value_from="$out/reward" out_dir="$out/ppo" train.overwrite=true
step dpo;       llmkit dpo $(r dpo) init_from="$out/sft" out_dir="$out/dpo" train.overwrite=true
step evaluate
llmkit evaluate "runs=[$out/pretrain,$out/sft,$out/ppo,$out/dpo]" perplexity=false \
    "tasks=[tinyworld_gen,tinyworld_gen_sampled,tinyworld_choice]" limit="$limit" output="$out/eval.json"
# The sampled task again, on PPO's prompt families only, with more questions: their interval is the narrow one.
python - "$out" "$family_limit" <<'PY'
import sys
from pathlib import Path

import yaml

from llmkit.eval.tasks import tasks_dir

out, n = Path(sys.argv[1]), int(sys.argv[2])
task = yaml.safe_load((tasks_dir() / "tinyworld_gen_sampled.yaml").read_text())
families = yaml.safe_load((out / "ppo" / "config.yaml").read_text())["data"]["tinyworld_families"]
task["name"] = "tinyworld_gen_sampled_ppo_families"
task["description"] = f"{task['description']}; families {families} only"
task["source"].update(n=n, families=families)
(out / "ppo_families_sampled.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
PY
llmkit evaluate "runs=[$out/sft,$out/ppo,$out/dpo]" perplexity=false "tasks=[$out/ppo_families_sampled.yaml]" \
    limit="$family_limit" output="$out/eval_ppo_families.json"

python - "$out" <<'PY'
import json, sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
def logged(run, key):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]
results = {Path(r["run"]).name: {t["task"]: t for t in r["tasks"]} for r in json.loads((out / "eval.json").read_text())}
for r in json.loads((out / "eval_ppo_families.json").read_text()):
    results[Path(r["run"]).name].update({t["task"]: t for t in r["tasks"]})
ppo_families = yaml.safe_load((out / "ppo" / "config.yaml").read_text())["data"]["tinyworld_families"]
def cell(stage, task, metric):
    m = results[stage][task]["metrics"][metric]
    return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"
ppo_sampled, ppo_greedy = logged("ppo", "val_sampled_reward"), logged("ppo", "val_reward")
extra = {
    "pretrain": f"val loss {logged('pretrain', 'val_loss')[-1]:.3f}",
    "sft": f"val loss {logged('sft', 'val_loss')[-1]:.3f}",
    "ppo": (f"held-out reward sampled {ppo_sampled[0]:.3f} -> {ppo_sampled[-1]:.3f}, greedy {ppo_greedy[0]:.3f} -> "
            f"{ppo_greedy[-1]:.3f}; KL to reference {logged('ppo', 'kl')[-1]:.3f}"),
    "dpo": f"held-out pair accuracy {logged('dpo', 'val_accuracy')[-1]:.3f}, margin {logged('dpo', 'val_margin')[-1]:.3f}",
}
fam = "/".join(ppo_families)
n_family = results["sft"]["tinyworld_gen_sampled_ppo_families"]["n"]
print(f"\n| stage | greedy exact match | sampled (T=1) exact match | sampled, PPO's families ({fam}; {n_family} questions) "
      "| choice accuracy | stage metric |")
print("|---|---|---|---|---|---|")
for stage in ("pretrain", "sft", "ppo", "dpo"):
    print(f"| {stage} | {cell(stage, 'tinyworld_gen', 'exact_match')} | {cell(stage, 'tinyworld_gen_sampled', 'exact_match')} "
          f"| {cell(stage, 'tinyworld_gen_sampled_ppo_families', 'exact_match') if stage != 'pretrain' else '-'} "
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
