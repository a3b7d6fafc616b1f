#!/usr/bin/env bash
# The embedded default end to end: tokenize -> pretrain -> generate -> evaluate (minutes on a CPU).
set -euo pipefail
llmkit tokenize out_dir=runs/tokenize/demo
llmkit pretrain tokens_dir=runs/tokenize/demo name=demo train.overwrite=true
llmkit generate run=runs/pretrain/demo prompt="Return the" sampling.max_new_tokens=48
llmkit evaluate "runs=[runs/pretrain/demo]"
