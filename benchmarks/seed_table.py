#!/usr/bin/env python3
"""Per-seed test scores of finished `benchmarks/accuracy.py` runs, paired with baselines fitted
on the same seeds' rows and, optionally, with another variant's runs of the same seeds.

    python benchmarks/seed_table.py 'runs/khs8_s17/out/korean-hate-speech_linear_*' \
        --baselines benchmarks/khs_baselines_s14.json \
        --compare 'runs/khs8_s14/out/korean-hate-speech_wide-sgd25_*'

Reads each run's `run.json` scores of the test split (`--split`, the test file's stem: `dev` for
korean-hate-speech, `test` elsewhere), LC and gate, and prints one Markdown row per seed, then the
mean ± sd (ddof 1) and the paired difference's mean ± its standard error. `--baselines`: a JSON
file `{task: {"model": name, "metric": "macro_f1" | "accuracy", "seeds": {seed: score in %}}}`.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

import numpy as np


def seed_scores(pattern: str, split: str, metric: str) -> dict[int, dict[str, float]]:
    """seed -> {"{task}_{lc|gate}": score in %} of the runs matching `pattern`."""
    out = {}
    for run in sorted(glob.glob(pattern)):
        seed = int(re.search(r"seed(\d+)$", run).group(1))
        scores = json.loads((Path(run) / "run.json").read_text(encoding="utf-8")).get("scores", {})
        prefix, suffix = f"{split}/", f"_{metric}"
        found = {k[len(prefix):-len(suffix)]: 100 * v for k, v in scores.items()
                 if k.startswith(prefix) and k.endswith(suffix)}
        if found:
            out[seed] = found
    return out


def mean_sd(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"


def paired(a, b) -> str:
    d = np.asarray(a, float) - np.asarray(b, float)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{d.mean():+.1f} ± {se:.1f} (se)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="glob of run directories, one per seed")
    p.add_argument("--compare", help="glob of another variant's runs (same seeds)")
    p.add_argument("--baselines", help="JSON of per-seed baseline scores (see above)")
    p.add_argument("--split", default="dev")
    p.add_argument("--metric", default="macro_f1", choices=("macro_f1", "accuracy"))
    args = p.parse_args()
    runs = seed_scores(args.runs, args.split, args.metric)
    other = seed_scores(args.compare, args.split, args.metric) if args.compare else {}
    base = json.loads(Path(args.baselines).read_text()) if args.baselines else {}
    tasks = sorted({k.rsplit("_", 1)[0] for s in runs.values() for k in s})
    for task in tasks:
        b = base.get(task)
        seeds = [s for s in sorted(runs) if (not b or str(s) in b["seeds"])
                 and (not other or s in other)]
        head = ["seed", "LC", "gate"] + (["compared LC"] if other else []) + \
            ([b["model"]] if b else [])
        print(f"\n{task}, test {args.metric} (%)\n\n| " + " | ".join(head) + " |\n|" +
              "---|" * len(head))
        cols = {"LC": [runs[s][f"{task}_lc"] for s in seeds],
                "gate": [runs[s][f"{task}_gate"] for s in seeds]}
        if other:
            cols["compared LC"] = [other[s][f"{task}_lc"] for s in seeds]
        if b:
            cols[b["model"]] = [b["seeds"][str(s)] for s in seeds]
        for i, s in enumerate(seeds):
            print(f"| {s} | " + " | ".join(f"{v[i]:.1f}" for v in cols.values()) + " |")
        print(f"| mean ± sd, {len(seeds)} seeds | " +
              " | ".join(mean_sd(v) for v in cols.values()) + " |")
        if b:
            print(f"| paired, minus {b['model']} | {paired(cols['LC'], cols[b['model']])} | "
                  f"{paired(cols['gate'], cols[b['model']])} |" +
                  (f" {paired(cols['compared LC'], cols[b['model']])} |" if other else "") + " |")
        if other:
            print(f"| paired, minus compared LC | {paired(cols['LC'], cols['compared LC'])} | "
                  f"{paired(cols['gate'], cols['compared LC'])} |" + " |" * (1 + bool(b)))


if __name__ == "__main__":
    main()
