#!/usr/bin/env bash
# Run, or resume, a committed study (configs/$STUDY.yaml) from its fixed commit, and commit its records.
#
#   bash scripts/cpu-study.sh            # run or resume (on any machine: committed records restore finished stages)
#   bash scripts/cpu-study.sh commit     # rebuild docs/results/$STUDY's report from its records and commit them
#   bash scripts/cpu-study.sh wall       # the study's wall time so far: its segments' durations, summed
#
# STUDY (default cpu-study) picks the study: cpu-study (the CPU study) or cpu-study-dropout0 (its control without
# LoRA dropout, run after it). Each has its own commit, records under docs/results/$STUDY and segments log.
#
# Stage keys hash pkt's whole source, so the study's code is one commit's (STUDY_COMMIT), checked out as a git
# worktree under .study/ and run with this checkout's .venv and its configs/$STUDY.yaml, while main moves on
# (a change to the config recomputes only the stages whose settings it changes). Its records go to this checkout's
# docs/results/$STUDY as the stages finish. Needs `bash scripts/setup.sh` first. One heavy job at a time:
# it takes most of a 2-core machine for hours (run it in the background with its log in a file).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STUDY=${STUDY:-cpu-study}
case $STUDY in
  cpu-study) STUDY_COMMIT=fd9b5f2 ;;
  cpu-study-dropout0) STUDY_COMMIT=871af7e ;;
  *) echo "STUDY=$STUDY: expected cpu-study or cpu-study-dropout0" >&2; exit 2 ;;
esac
RECORDS=docs/results/$STUDY
export PKT_DATA_DIR=${PKT_DATA_DIR:-$(cd .. && pwd)/shared/data}
export PKT_HOME=${PKT_HOME:-$ROOT/.pkt-home}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "commit" ]; then
  ls $RECORDS/stages/eval-*.json > /dev/null 2>&1 || { echo "no evaluation record yet: nothing to commit"; exit 0; }
  # the report is made from a snapshot and only the snapshot's records are committed: a stage finishing meanwhile
  # must not land without the report that counts it (CI rebuilds results.md from the committed records)
  snap=$(mktemp -d)
  cp -r $RECORDS/study.json $RECORDS/stages "$snap"/
  # digests of the code evaluations' outputs (per question: passed, failure kind, lines, comments) travel with the
  # records: the full outputs stay in the run dir, and `pkt study compare-predictions` reads either
  run_stages=${PKT_STUDY_OUT:-$ROOT/runs/$STUDY}/stages
  [ ! -d "$run_stages" ] || .venv/bin/pkt study compare-predictions --digest "$run_stages" \
    $RECORDS/predictions --records "$snap/stages" > /dev/null
  # and of the GSM8K ones (per question: the last number's verdict, the first stated answer's, at the cap), for
  # `pkt study gsm8k-first-answer`; only where the student's outputs are still there to set the arms against
  ! ls "$run_stages"/eval-student-gsm8k-*/predictions.jsonl > /dev/null 2>&1 || .venv/bin/pkt study \
    gsm8k-first-answer --digest "$run_stages" $RECORDS/answers --records "$snap/stages" > /dev/null
  .venv/bin/pkt report "$snap" --out $RECORDS > /dev/null
  git add $RECORDS $(ls $RECORDS.segments.log 2>/dev/null || true)
  for f in $(git diff --cached --name-only -- $RECORDS/stages); do
    [ -f "$snap/stages/$(basename "$f")" ] || git reset -q -- "$f"
  done
  n=$(ls "$snap"/stages/*.json | wc -l)
  rm -rf "$snap"
  git commit -q -m "$STUDY: records of $n finished stages; report rebuilt from them (pkt report $RECORDS)" \
    -- $RECORDS $(ls $RECORDS.segments.log 2>/dev/null || true) && echo "committed the records of $n stages"
  exit 0
fi

if [ "${1:-}" = "wall" ]; then
  # each "segment start" runs until the next "segment end" (a segment still open counts until now)
  .venv/bin/python - "$RECORDS.segments.log" <<'PY'
import datetime as dt, re, sys
# a segment runs from its "segment start" to its "segment end"; one that has none (its process stopped with the
# machine) counts until its last dated line, and the segment still open at the end of the log until now
total, start, last, n = 0.0, None, None, 0
def close(until, why=""):
    global total, start, n
    total, n = total + (until - start).total_seconds(), n + 1
    if why:
        print(f"(segment of {start:%FT%TZ}: {why})")
    start = None
for line in open(sys.argv[1]):
    m = re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line)
    if not m:
        continue
    t = dt.datetime.strptime(m.group(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    if line.startswith("segment start"):
        if start is not None:
            close(last, "no end line, counted until its last dated line")
        start = t
    elif line.startswith("segment end") and start is not None:
        close(t)
    last = t
if start is not None:
    close(dt.datetime.now(dt.timezone.utc), "still open, counted until now")
print(f"{n} segments, {total / 3600:.2f} h wall")
PY
  exit 0
fi

# fd9b5f2 computes the answer loss of a whole evaluation batch at once: ~24 GB at its peak (32 GSM8K rows of
# float32 logits, docs/benchmarks.md P10; ~20 GB for 16 HumanEval rows), which the kernel's OOM killer stopped
# twice on a 24 GiB machine (the segments log says where)
mem_gb=$(awk '/MemTotal|SwapTotal/{s+=$2} END{print int(s/1048576)}' /proc/meminfo)
if [ "$STUDY_COMMIT" = fd9b5f2 ] && [ "$mem_gb" -lt 30 ]; then
  echo "warning: memory + swap is ${mem_gb} GB; the study peaks near 24 GB. Add swap, e.g. (as root):" >&2
  echo "  fallocate -l 16G /swapfile && chmod 600 /swapfile && mkswap /swapfile && swapon /swapfile" >&2
fi

WT=$ROOT/.study/$STUDY_COMMIT
[ -d "$WT" ] || git worktree add -q --detach "$WT" $STUDY_COMMIT
echo "segment start $(date -u +%FT%TZ) $STUDY_COMMIT" >> $RECORDS.segments.log
cd "$WT"
rc=0
PYTHONPATH=$WT/src "$ROOT/.venv/bin/pkt" run "$ROOT/configs/$STUDY.yaml" \
  --out "${PKT_STUDY_OUT:-$ROOT/runs/$STUDY}" --records "$ROOT/$RECORDS" || rc=$?
echo "segment end $(date -u +%FT%TZ) rc $rc" >> "$ROOT/$RECORDS.segments.log"
exit $rc
