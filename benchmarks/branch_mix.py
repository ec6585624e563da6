#!/usr/bin/env python3
"""Each branch of a trained linear-branch run (`--linear-ngrams`) alone and mixed, on its test
split (and, `val_*`, its validation rows): the deep LC, the wide classifier, the linear
classifier, pairs, the served thirds, and the weights on the 0.1 simplex chosen by the
validation rows' cross-entropy (sessions 17-18: is a fixed third right where one branch is
weak, and can validation rows tell?).

    python benchmarks/branch_mix.py RUN TEST.tsv [--save RUN_BRANCHES.npz]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

SIMPLEX = [(a / 10, b / 10, round(1 - a / 10 - b / 10, 1)) for a in range(11)
           for b in range(11 - a)]

MIXES = {"deep": (1, 0, 0), "wide": (0, 1, 0), "linear": (0, 0, 1), "wide+linear": (0, .5, .5),
         "deep+linear": (.5, 0, .5), "thirds": (1 / 3, 1 / 3, 1 / 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("test")
    p.add_argument("--save", help="also write every branch's probabilities to this .npz, "
                   "keys {split}/{task}/{labels,deep,wide,linear}, to try other mixes offline")
    args = p.parse_args()
    from resic_tf.data import load_labelled_texts
    from resic_tf.fusion import linear_branch_predictions
    from resic_tf.metrics import macro_f1
    from resic_tf.run import Run
    run = Run.load(args.run)
    tasks = list(run.model.tasks)
    val = linear_branch_predictions(run)
    test = linear_branch_predictions(
        run, load_labelled_texts(args.test, run.train_config.text_col, tasks))
    if args.save:
        np.savez_compressed(args.save, **{f"{split}/{task}/{key}": array
                                          for split, parts in (("val", val), ("test", test))
                                          for task in tasks for key, array in
                                          zip(("labels", "deep", "wide", "linear"), parts[task])})
    for task in tasks:
        n = len(run.model.tasks[task])
        yv, *bv = val[task]
        yt, *bt = test[task]

        def nll(w):
            q = sum(wi * b for wi, b in zip(w, bv))
            return -np.mean(np.log(q[np.arange(len(yv)), yv] + 1e-9))
        chosen = min(SIMPLEX, key=lambda w: (round(nll(w), 9), w))
        def f1(w, y=yt, b=bt):
            return round(100 * macro_f1(y, sum(wi * p for wi, p in zip(w, b)).argmax(-1), n), 2)
        row = {"run": run.path.name, "task": task}
        for name, w in MIXES.items():
            row[name] = f1(w)
            row["val_" + name] = f1(w, yv, bv)
        print(json.dumps({**row, "by_validation": f1(chosen), "weights": chosen}), flush=True)


if __name__ == "__main__":
    main()
