#!/usr/bin/env python3
"""Accuracy effect of masking: the same recipe trained fixed-length (padding to 132 takes part,
the first release) and length-adaptive (masked, batches padded to their longest text), same
data, epochs and seeds; LC and length-gate macro-F1 on each dataset's test split, plus fit time.

Modes: `fixed` (`--fixed-length`), `adaptive` (the default: masked, training batches grouped by
length), `adaptive-random` (masked, random training batches: separates masking from batching).

Each run is `resic train` (+ `--fixed-length`), `resic calibrate` (on its validation rows) and
`resic evaluate --data <test>`; the table is read from each run's `run.json` scores.

    python scripts/prepare_datasets.py                     # once: runs/paper/data/...
    python benchmarks/masking_accuracy.py --out runs/masking
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench_data import DATASETS, DEFAULT_DATA, resic  # noqa: E402 (benchmarks/ is on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="korean-hate-speech,stylekqc")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="prepare_datasets.py output")
    p.add_argument("--out", default="runs/masking")
    p.add_argument("--filters", default="32,64,128,256")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", default="42", help="comma-separated seeds; mean and sd over them")
    p.add_argument("--modes", default="fixed,adaptive")
    args = p.parse_args()
    rows = []
    for name in args.datasets.split(","):
        train, val, test, text_col, label_cols = DATASETS[name]
        train, test = (str(f).format(data=args.data) for f in (train, test))
        val_args = [] if val is None else ["--val-data", str(val).format(data=args.data)]
        for mode, seed in ((m, int(s)) for m in args.modes.split(",")
                           for s in args.seeds.split(",")):
            out = Path(args.out) / f"{name}_{mode}_seed{seed}"
            flags = {"fixed": ["--fixed-length"], "adaptive": [],
                     "adaptive-random": ["--batching", "random"]}[mode]
            if not (out / "run.json").exists() or not (out / "gate.json").exists():
                resic("train", "--data", train, "--text-col", text_col, "--label-cols",
                      label_cols, "--filters", args.filters, "--epochs", str(args.epochs),
                      "--batch-size", str(args.batch_size), "--seed", str(seed),
                      "--out", str(out), "--overwrite", "--quiet", *val_args, *flags)
                resic("calibrate", str(out))
                resic("evaluate", str(out), "--data", test)
            state = json.loads((out / "run.json").read_text(encoding="utf-8"))
            stem = Path(test).stem
            for task in label_cols.split(","):
                rows.append((name, task, mode, seed, state["fit_seconds"],
                             state["scores"][f"{stem}/{task}_lc_macro_f1"],
                             state["scores"][f"{stem}/{task}_gate_macro_f1"]))
            print(f"{name} {mode} seed {seed}: done", flush=True)
    print(f"\nfilters {args.filters}, {args.epochs} epochs, batch {args.batch_size}, seeds "
          f"{args.seeds}; macro-F1 on each test split, mean ± sd over the seeds\n")
    print("| dataset | task | model | fit s | LC macro-F1 | gate macro-F1 | per seed (LC / gate) |"
          "\n|---|---|---|---|---|---|---|")
    groups: dict = {}
    for name, task, mode, seed, seconds, lc, gate in rows:
        groups.setdefault((name, task, mode), []).append((seconds, lc, gate))
    for (name, task, mode), runs in groups.items():
        sec, lc, gate = (np.array(v) for v in zip(*runs))
        per_seed = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(lc, gate))
        print(f"| {name} | {task} | {mode} | {sec.mean():.0f} | {lc.mean():.4f} ± {lc.std():.4f} "
              f"| {gate.mean():.4f} ± {gate.std():.4f} | {per_seed} |")


if __name__ == "__main__":
    main()
