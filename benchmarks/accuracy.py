#!/usr/bin/env python3
"""Res-IC against the two baselines a user would pick instead, on the same splits: one table.

For every dataset and task: TF-IDF char 1-4 + LinearSVC and fastText (`baselines.py`, fitted on
the very rows `resic train` keeps), and Res-IC trained with each named variant of the recipe
(`VARIANTS`: "default" is `resic train` with no tuning flags; the others change one lever, for
the ablation table). Each Res-IC run is `resic train` + `resic calibrate` (on its validation
rows) + `resic evaluate` on the test split, in its own process; its scores are read back from
`run.json`, so a finished run is reused, and an interrupted one resumes from its last epoch. Reported: test
accuracy and macro-F1 of the LC and of the length gate, mean ± sd over the seeds, fit seconds,
and predict rows/s (Keras `predict` on the test texts, length-sorted batches of 256).

    python scripts/prepare_datasets.py --datasets stylekqc,3i4k,clinc150,nsmc   # once
    python benchmarks/accuracy.py --datasets korean-hate-speech --variants default,paper \\
        --seeds 42,43,44 --out runs/accuracy
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_data import DATASETS, DEFAULT_DATA, resic  # noqa: E402 (benchmarks/ is on sys.path)

# Flags beside `resic train`'s own defaults; each changes one lever. Since 0.14 the defaults hold
# the linear branch and the wide stage, so every variant below includes them unless it says
# otherwise, and "default" is the 0.14 recipe: a run directory made by an older version under
# the same name (e.g. runs/accuracy_s13n/*_default_*) is another recipe; use a new --out.
VARIANTS = {
    "default": [],
    "v0.13-default": ["--linear-ngrams", "0", "--wide-epochs", "0"],  # 0.12-0.13's recipe
    "paper": ["--recipe", "paper"],
    "no-ngram": ["--ngram-buckets", "0"],
    "no-cw": ["--class-weighting", "none"],
    "no-ngram-no-cw": ["--ngram-buckets", "0", "--class-weighting", "none"],
    "cw-balanced": ["--class-weighting", "balanced"],
    "adam-constant": ["--optimizer", "adam", "--schedule", "constant"],
    "smooth0.1": ["--label-smoothing", "0.1"],
    "distill0.5": ["--distillation", "0.5"],
    "wide-loss1": ["--wide-loss", "1.0"],
    "rate30": ["--ngram-rate", "30"],
    "lr1e-3": ["--learning-rate", "1e-3"],
    "ngram1-5": ["--ngram-sizes", "1,2,3,4,5"],
    "buckets2^18": ["--ngram-buckets", "262144"],
    "wide18x32r1": ["--ngram-buckets", "262144", "--ngram-dim", "32", "--ngram-rate", "1"],
    "wide20x8r1": ["--ngram-buckets", "1048576", "--ngram-dim", "8", "--ngram-rate", "1"],
    "wide18x16r1": ["--ngram-buckets", "262144", "--ngram-dim", "16", "--ngram-rate", "1"],
    "rate1": ["--ngram-rate", "1"],
    "wide18x32r3": ["--ngram-buckets", "262144", "--ngram-dim", "32", "--ngram-rate", "3"],
    "wide18x32r10": ["--ngram-buckets", "262144", "--ngram-dim", "32", "--ngram-rate", "10"],
    "late": ["--wide-fusion", "late"],
    "late18x32r1": ["--wide-fusion", "late", "--ngram-buckets", "262144", "--ngram-dim", "32",
                    "--ngram-rate", "1"],
    "late34": ["--wide-fusion", "late", "--arch", "resic34"],
    "late-dim128": ["--wide-fusion", "late", "--ngram-dim", "128"],
    "late-dim256": ["--wide-fusion", "late", "--ngram-dim", "256"],
    "buckets2^18r1": ["--ngram-buckets", "262144", "--ngram-rate", "1"],  # 0.10's, from 80k rows
    "buckets2^16r10": ["--ngram-buckets", "65536", "--ngram-rate", "10"],  # 0.9's table, any size
    "hashes2": ["--ngram-hashes", "2"],
    "weighted": ["--ngram-pooling", "weighted"],
    "ema0.99": ["--ema", "0.99"],
    "ema0.999": ["--ema", "0.999"],
    "avgmax": ["--exit-pooling", "average_max"],
    "jamo": ["--jamo-embedding"],
    "select-last": ["--select", "last"],
    # session 15: the wide branch trained first, alone, by SGD as fastText trains (25 epochs),
    # then frozen (`resic_tf.training.train_wide_stage`)
    "wide-sgd25": ["--wide-epochs", "25"],
    # session 17: beside it, a third, linear branch (TF-IDF + logistic regression, fitted
    # first, frozen) mixed into every exit in equal thirds (`ResICConfig.linear_ngrams`)
    "linear": ["--wide-epochs", "25", "--linear-ngrams", "1000000"],
}


def predict_rows_per_second(run_dir: Path, texts: list[str]) -> float:
    """Keras predict on `texts` (second pass, after a warm-up), rows per second."""
    from resic_tf.run import Run
    model = Run.load(run_dir).model
    model.predict(texts[:512], batch_size=256, verbose=0)
    start = time.perf_counter()
    model.predict(texts, batch_size=256, verbose=0)
    return len(texts) / (time.perf_counter() - start)


def train_variant(name, variant, seed, args) -> dict:
    train, val, test, text_col, label_cols = DATASETS[name]
    train, test = (str(f).format(data=args.data) for f in (train, test))
    out = Path(args.out) / f"{name}_{variant}_f{args.filters.replace(',', '-')}_e{args.epochs}" \
        f"_seed{seed}"
    stem = Path(test).stem
    state_file = out / "run.json"
    done = state_file.exists() and any(k.startswith(f"{stem}/") for k in json.loads(
        state_file.read_text(encoding="utf-8")).get("scores", {}))
    if not done and args.no_train:
        return None
    if not done:
        trained = state_file.exists() and json.loads(
            state_file.read_text(encoding="utf-8")).get("status") == "finished"
        if not trained:  # a fresh run, or an interrupted one resumed from its last epoch
            val_args = [] if val is None else ["--val-data", str(val).format(data=args.data)]
            resic("train", "--data", train, "--text-col", text_col, "--label-cols", label_cols,
                  "--filters", args.filters, "--epochs", str(args.epochs), "--batch-size",
                  str(args.batch_size), "--seed", str(seed), "--out", str(out), "--quiet",
                  *val_args, *VARIANTS[variant])
        resic("calibrate", str(out))
        resic("evaluate", str(out), "--data", test)
    state = json.loads(state_file.read_text(encoding="utf-8"))
    scores = state["scores"]
    result = {"fit_seconds": state["fit_seconds"], "params": state["params"], "out": out}
    for task in label_cols.split(","):
        for exit_ in ("lc", "gate"):
            for metric in ("accuracy", "macro_f1"):
                result[(task, exit_, metric)] = scores[f"{stem}/{task}_{exit_}_{metric}"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="korean-hate-speech")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="prepare_datasets.py output")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--variants", default="default", help=f"of {sorted(VARIANTS)}")
    p.add_argument("--filters", default="32,64,128,256")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="42,43,44", help="comma-separated; mean ± sd over them")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-speed", action="store_true", help="skip predict rows/s")
    p.add_argument("--no-train", action="store_true",
                   help="report finished runs only (each row says over how many seeds)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    lines = []
    for name in args.datasets.split(","):
        _, _, test, text_col, label_cols = DATASETS[name]
        tasks = label_cols.split(",")
        if not args.no_baselines:
            try:
                from baselines import fit_baselines
                base = fit_baselines(name, seeds, args.data)
            except ImportError as e:
                print(f"baselines skipped ({e}); pip install -e '.[bench]'", file=sys.stderr)
                base = {}
            for (task, baseline), runs in base.items():
                acc, f1, sec = (np.array(v) for v in zip(*runs))
                lines.append(f"| {name} | {task} | {baseline} | {acc.mean():.4f} ± "
                             f"{acc.std():.4f} | {f1.mean():.4f} ± {f1.std():.4f} | | | "
                             f"{sec.mean():.1f} | |")
        for variant in variants:
            runs = [r for r in (train_variant(name, variant, s, args) for s in seeds) if r]
            if not runs:
                continue
            rows_s = "" if args.no_speed else \
                f"{predict_rows_per_second(runs[0]['out'], _texts(test, text_col, label_cols, args)):.0f}"
            for task in tasks:
                cell = {}
                for exit_ in ("lc", "gate"):
                    for metric in ("accuracy", "macro_f1"):
                        v = np.array([r[(task, exit_, metric)] for r in runs])
                        cell[exit_, metric] = f"{v.mean():.4f} ± {v.std():.4f}"
                fit = np.mean([r["fit_seconds"] for r in runs])
                lines.append(f"| {name} | {task} | Res-IC {variant} ({runs[0]['params']:,} "
                             f"params, {len(runs)} seeds) | {cell['lc', 'accuracy']} | {cell['lc', 'macro_f1']} | "
                             f"{cell['gate', 'accuracy']} | {cell['gate', 'macro_f1']} | "
                             f"{fit:.0f} | {rows_s} |")
            print(f"{name} {variant}: done", flush=True)
    print(f"\nRes-IC: filters {args.filters}, {args.epochs} epochs, batch {args.batch_size}; "
          f"seeds {args.seeds}; test split; mean ± sd over the seeds\n")
    print("| dataset | task | model | accuracy (LC) | macro-F1 (LC) | accuracy (gate) | "
          "macro-F1 (gate) | fit s | predict rows/s |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def _texts(path, text_col: str, label_cols: str, args) -> list[str]:
    from resic_tf.data import load_labelled_texts
    return list(load_labelled_texts(str(path).format(data=args.data), text_col,
                                    label_cols.split(",")).texts)


if __name__ == "__main__":
    main()
