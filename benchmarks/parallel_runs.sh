#!/usr/bin/env bash
# Many `benchmarks/accuracy.py` runs side by side on a many-core machine, from a queue file.
#   JOBS=4 THREADS=4 [BUDGET=SECONDS] bash benchmarks/parallel_runs.sh QUEUE OUT
# QUEUE holds one run per line: the accuracy.py arguments of one dataset, variant and seed,
# e.g. `--datasets nsmc --variants default --seeds 42 --epochs 3 --batch-size 128`; blank lines
# and lines starting with # are skipped. JOBS runs at a time, each with THREADS intra-op
# threads, each logging to OUT/log_<line number>.txt. accuracy.py reuses finished runs and
# resumes interrupted ones, so the same command continues a queue that was stopped midway.
# BUDGET (seconds, optional) ends the whole queue in time: a run still going at the deadline is
# stopped (it resumes from its last finished epoch next time) and no further run starts, so a
# lease-limited machine returns before its call's limit. Afterwards `accuracy.py --no-train`
# with the same arguments prints the tables.
set -euo pipefail
queue=$1 out=$2
mkdir -p "$out"
export TF_NUM_INTRAOP_THREADS=${THREADS:-4} TF_NUM_INTEROP_THREADS=2 OUT_DIR=$out
export DEADLINE=$(( ${BUDGET:-0} > 0 ? $(date +%s) + ${BUDGET:-0} : 0 ))
here=$(cd "$(dirname "$0")" && pwd)
grep -n -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$queue" | tr '\n' '\0' |
  xargs -0 -P "${JOBS:-4}" -I{} bash -c \
    'n=${1%%:*}; eval "set -- ${1#*:}"; limit=()
     if [ "$DEADLINE" -gt 0 ]; then
       left=$((DEADLINE - $(date +%s)))
       if [ "$left" -le 0 ]; then echo "line $n not started: past the budget"; exit 0; fi
       limit=(timeout "$left")
     fi
     "${limit[@]}" python "'"$here"'/accuracy.py" "$@" --no-baselines --no-speed \
       --out "$OUT_DIR" > "$OUT_DIR/log_$n.txt" 2>&1 || echo "line $n stopped or failed"' _ {}
