#!/usr/bin/env bash
# Res-IC seeds in parallel on a many-core machine, then one table of them all (accuracy.py).
#   THREADS=5 bash benchmarks/parallel_seeds.sh DATASET FILTERS EPOCHS OUT SEED [SEED ...]
# Each seed's `resic train/calibrate/evaluate` gets THREADS intra-op threads; the final
# `--no-train` call prints mean +- sd of the finished runs (no baselines: refit them with
# `python benchmarks/accuracy.py ... --no-train` where the [bench] extra is installed).
set -euo pipefail
dataset=$1 filters=$2 epochs=$3 out=$4; shift 4
export TF_NUM_INTRAOP_THREADS=${THREADS:-4} TF_NUM_INTEROP_THREADS=2
here=$(dirname "$0")
for seed in "$@"; do
  python "$here/accuracy.py" --datasets "$dataset" --variants default --seeds "$seed" \
    --filters "$filters" --epochs "$epochs" --no-baselines --no-speed --out "$out" \
    ${DATA:+--data "$DATA"} > "$out/log_${dataset}_$seed.txt" 2>&1 &
done
wait
python "$here/accuracy.py" --datasets "$dataset" --variants default --seeds "$(IFS=,; echo "$*")" \
  --filters "$filters" --epochs "$epochs" --no-baselines --no-speed --no-train --out "$out" \
  ${DATA:+--data "$DATA"}
