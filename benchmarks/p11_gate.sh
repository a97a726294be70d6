#!/usr/bin/env bash
# P11's gate (docs/benchmarks.md): the evaluation decoding of the study's setting before P11 (continuous engine,
# 32 rows, the vocabulary head in one product, float32) against 64 rows with the sliced head in float32 and in
# bfloat16, on the full HumanEval (164) and 150 GSM8K questions 0-shot and 8-shot, the student, <= 256 new tokens;
# one process per task, the engines one after another (one model per dtype); every answer's verdict compared with
# the first engine's. Run on quiet cores: nothing else on the machine.
#   PKT_DATA_DIR=../shared/data bash benchmarks/p11_gate.sh OUT_DIR        (TASKS="gsm8k:150" for one task,
#   ENGINES=... for other engines: ENGINE@ROWS[:DTYPE], see benchmarks/bench_decoding.py)
set -euo pipefail
out=${1:?usage: bash benchmarks/p11_gate.sh OUT_DIR}
# GSM8K's questions come from PKT_DATA_DIR (offline): without it the GSM8K runs would fail after HumanEval's
: "${PKT_DATA_DIR:?set PKT_DATA_DIR to the data directory (docs/data.md) before the gate}"
tasks=${TASKS:-humaneval:164 gsm8k:150 gsm8k-8shot:150}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
engines=${ENGINES:-continuous-whole-head@32,continuous@64,continuous@64:bfloat16}
for spec in $tasks; do
  task=${spec%%:*}; n=${spec##*:}
  "$py" -m benchmarks.bench_decoding --task "$task" --prompts "$n" --max-new-tokens 256 --engines "$engines" \
    --out "$out/p11-$task.json" > "$out/p11-$task.log"
  grep -v '"texts"' "$out/p11-$task.log"  # one line per engine: seconds, tokens, tok/s, answers/verdicts vs the first
done
grep -H . /proc/loadavg
