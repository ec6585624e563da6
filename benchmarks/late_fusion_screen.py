#!/usr/bin/env python3
"""Late fusion, measured without retraining: how do two branches trained apart combine?

`screen`: a finished run's exits (e.g. a deep-only `--recipe paper` run) averaged with the
probabilities of the wide branch trained alone (`wide_branch.py --save FILE.npz`, same splits);
the wide share 0.5, or chosen on the validation rows when both have the same ones.

`shares`: for a late-fusion run, the test LC macro-F1 of its deep LC alone, its wide classifier
alone, and the mix at the share each rule picks on the validation rows: macro-F1 per exit
(`resic_tf.fusion`, what `resic train` does), 0.5, or the mixture's cross-entropy.

    python benchmarks/late_fusion_screen.py screen runs/accuracy/nsmc_paper_f32-64-128-256_e3_seed42 \\
        wide.npz polarity runs/paper/data/nsmc/test.tsv
    python benchmarks/late_fusion_screen.py shares \\
        runs/accuracy_s8/clinc150_late_f32-64-128-256_e6_seed42 runs/paper/data/clinc150/test_inscope.tsv

Prints JSON lines; scores in %.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from resic_tf.fusion import SHARES, branch_predictions, choose_shares
from resic_tf.metrics import macro_f1
from resic_tf.run import Run, predict_file


def f1(y, p) -> float:
    return round(100 * macro_f1(y, p.argmax(-1), p.shape[-1]), 2)


def screen(args) -> None:
    wide = np.load(args.npz)
    run = Run.load(args.run)
    val, test = predict_file(run, run.validation), predict_file(run, args.test)
    vp, vy = val.probs[args.task], val.labels[args.task]
    tp, ty = test.probs[args.task], test.labels[args.task]
    if not (ty == wide["test_y"]).all():
        raise SystemExit("the wide model's test rows are not the run's")
    same_val = len(vy) == len(wide["val_y"]) and (vy == wide["val_y"]).all()
    print(json.dumps({"wide_alone": f1(ty, wide["test"]), "same_validation_rows": bool(same_val)}))
    for e in range(vp.shape[1]):
        share = 0.5
        if same_val:
            scores = [f1(vy, (1 - w) * vp[:, e] + w * wide["val"]) for w in SHARES]
            share = SHARES[int(np.argmax(scores))]
        print(json.dumps({"exit": e + 1, "run_alone": f1(ty, tp[:, e]),
                          "mix_0.5": f1(ty, 0.5 * tp[:, e] + 0.5 * wide["test"]),
                          "share_on_validation": share,
                          "mix_at_share": f1(ty, (1 - share) * tp[:, e] + share * wide["test"])}))


def nll_share(y, deep, wide) -> float:
    def nll(w):
        p = ((1 - w) * deep + w * wide)[np.arange(len(y)), y]
        return -np.mean(np.log(p + 1e-9))
    return min(SHARES, key=lambda w: (nll(w), abs(w - 0.5)))


def shares(args) -> None:
    run = Run.load(args.run)
    vd, vw = branch_predictions(run)  # every exit its deep head alone, the wide classifier alone
    td, tw = branch_predictions(run, args.test)
    for task in run.model.tasks:
        yv, yt = vd.labels[task], td.labels[task]
        dv, dt = vd.probs[task][:, -1], td.probs[task][:, -1]
        wv, wt = vw.probs[task][:, -1], tw.probs[task][:, -1]
        rules = {"macro_f1_per_exit": choose_shares(yv, vd.probs[task], wv)[-1], "fixed": 0.5,
                 "cross_entropy": nll_share(yv, dv, wv)}
        print(json.dumps({"run": str(args.run), "task": task, "deep_lc": f1(yt, dt),
                          "wide": f1(yt, wt),
                          **{r: {"share": w, "test": f1(yt, (1 - w) * dt + w * wt)}
                             for r, w in rules.items()}}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("screen")
    s.add_argument("run")
    s.add_argument("npz")
    s.add_argument("task")
    s.add_argument("test")
    s = sub.add_parser("shares")
    s.add_argument("run")
    s.add_argument("test")
    args = p.parse_args()
    (screen if args.what == "screen" else shares)(args)


if __name__ == "__main__":
    main()
