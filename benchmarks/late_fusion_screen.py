#!/usr/bin/env python3
"""Late fusion, measured without retraining: how do two branches trained apart combine?

`screen`: a finished run's exits (e.g. a deep-only `--recipe paper` run) averaged with the
probabilities of the wide branch trained alone (`wide_branch.py --save FILE.npz`, same splits);
the wide share 0.5, or chosen on the validation rows when both have the same ones.

`shares`: for late-fusion runs, the test LC macro-F1 (and accuracy) of the deep LC alone, the
wide classifier alone, and the mix at the share each rule picks on the validation rows: macro-F1
per exit (`resic_tf.fusion`, what `resic train` does), 0.5, the mixture's cross-entropy, the
best share that beats 0.5 on 80% of paired bootstrap resamples (`bootstrap`), or the best mean
over resamples (`bagged`).

    python benchmarks/late_fusion_screen.py screen runs/accuracy/nsmc_paper_f32-64-128-256_e3_seed42 \\
        wide.npz polarity runs/paper/data/nsmc/test.tsv
    python benchmarks/late_fusion_screen.py shares runs/accuracy_s8/*_late_*
    python benchmarks/late_fusion_screen.py swap runs/khs8_s14/out/korean-hate-speech_* \
        --task hate --wide sgd=sgd_hate.npz adamw=adamw_hate.npz

`swap`: each late-fusion run's deep LC mixed at share 0.5 with its own wide classifier and
with each wide branch trained apart (`wide_branch.py --save`, same test rows): which wide
branch helps the deep one most, on the same deep predictions.

Prints JSON lines; scores in %.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from pathlib import Path

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)
from resic_tf.config import wide_exit_name
from resic_tf.fusion import SHARES, branch_predictions, choose_shares
from resic_tf.metrics import macro_f1
from resic_tf.policies import PairedBootstrap, bootstrap_counts
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


def bootstrap_share(y, deep, wide, confidence: float = 0.8, resamples: int = 500) -> float:
    """The best share on macro-F1 among those that beat 0.5 in all but the worst `1 -
    confidence` of paired bootstrap resamples of the validation rows; 0.5 if none does."""
    n_classes = deep.shape[-1]
    half = (0.5 * deep + 0.5 * wide).argmax(-1)
    boot = PairedBootstrap(bootstrap_counts(len(y), resamples), y, half, n_classes)
    scores = {w: macro_f1(y, ((1 - w) * deep + w * wide).argmax(-1), n_classes) for w in SHARES}
    robust = [w for w in SHARES if w != 0.5 and
              boot.lower_bound(((1 - w) * deep + w * wide).argmax(-1), confidence) > 0]
    return max(robust, key=lambda w: (scores[w], -abs(w - 0.5))) if robust else 0.5


def bagged_share(y, deep, wide, resamples: int = 500) -> float:
    """The share with the best mean macro-F1 over bootstrap resamples of the validation rows."""
    n_classes = deep.shape[-1]
    half = (0.5 * deep + 0.5 * wide).argmax(-1)
    boot = PairedBootstrap(bootstrap_counts(len(y), resamples), y, half, n_classes)
    gain = {w: float(np.mean(boot.differences(((1 - w) * deep + w * wide).argmax(-1))))
            for w in SHARES}
    return max(SHARES, key=lambda w: (round(gain[w], 9), -abs(w - 0.5)))


RULES = {"macro_f1_per_exit": None, "fixed": None, "cross_entropy": nll_share,
         "bootstrap": bootstrap_share, "bagged": bagged_share}


def _branches(run_dir: str, test: str, cache: Path) -> dict:
    """Validation and test labels, deep-alone and wide probabilities (cached as .npz)."""
    path = cache / f"{Path(run_dir).name}.npz"
    if path.exists():
        return dict(np.load(path))
    run = Run.load(run_dir)
    out = {}
    for split, data in (("val", None), ("test", test)):
        p = branch_predictions(run, data)
        for task in run.model.tasks:
            out[f"{split}/{task}/y"] = p.labels[task]
            out[f"{split}/{task}/deep"] = p.probs[task]
            out[f"{split}/{task}/wide"] = p.probs[wide_exit_name(task)]
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def _run_branches(run_dir: str, args) -> dict:
    """`_branches` of a run on `args.test`, or on its dataset's test file (from its name)."""
    test = args.test or str(DATASETS[Path(run_dir).name.split("_")[0]][2]).format(
        data=args.data)
    return _branches(run_dir, test, Path(args.cache))


def shares(args) -> None:
    for run_dir in args.runs:
        b = _run_branches(run_dir, args)
        for task in sorted({k.split("/")[1] for k in b}):
            yv, yt = b[f"val/{task}/y"], b[f"test/{task}/y"]
            dv, dt = b[f"val/{task}/deep"], b[f"test/{task}/deep"]
            wv, wt = b[f"val/{task}/wide"], b[f"test/{task}/wide"]
            rules = {"macro_f1_per_exit": choose_shares(yv, dv, wv)[-1], "fixed": 0.5,
                     **{r: fn(yv, dv[:, -1], wv) for r, fn in RULES.items() if fn}}
            acc = lambda p: round(100 * float((p.argmax(-1) == yt).mean()), 2)  # noqa: E731
            print(json.dumps({"run": Path(run_dir).name, "task": task, "val_rows": len(yv),
                              "deep_lc": f1(yt, dt[:, -1]), "wide": f1(yt, wt),
                              **{r: {"share": w, "test": f1(yt, (1 - w) * dt[:, -1] + w * wt),
                                     "test_acc": acc((1 - w) * dt[:, -1] + w * wt)}
                                 for r, w in rules.items()}}), flush=True)


def swap(args) -> None:
    wides = dict(w.split("=", 1) for w in args.wide)
    wides = {name: np.load(path) for name, path in wides.items()}
    table = {"own": [], **{name: [] for name in wides}, "deep_lc": []}
    for run_dir in args.runs:
        b = _run_branches(run_dir, args)
        yt, dt = b[f"test/{args.task}/y"], b[f"test/{args.task}/deep"][:, -1]
        row = {"deep_lc": f1(yt, dt), "own": f1(yt, 0.5 * dt + 0.5 * b[f"test/{args.task}/wide"])}
        for name, w in wides.items():
            if not (w["test_y"] == yt).all():
                raise SystemExit(f"{name}: its test rows are not the run's")
            row[name] = f1(yt, 0.5 * dt + 0.5 * w["test"])
        for k, v in row.items():
            table[k].append(v)
        print(json.dumps({"run": Path(run_dir).name, "task": args.task, **row}), flush=True)
    print(json.dumps({"mean": {k: round(float(np.mean(v)), 2) for k, v in table.items()},
                      "sd": {k: round(float(np.std(v, ddof=1)), 2) for k, v in table.items()
                             if len(v) > 1}, "runs": len(args.runs)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("screen")
    s.add_argument("run")
    s.add_argument("npz")
    s.add_argument("task")
    s.add_argument("test")
    runs = argparse.ArgumentParser(add_help=False)  # what `shares` and `swap` read
    runs.add_argument("runs", nargs="+")
    runs.add_argument("--test", help="test file (default: the dataset's, from the run's name)")
    runs.add_argument("--data", default=str(DEFAULT_DATA), help="prepare_datasets.py output")
    runs.add_argument("--cache", default="runs/share_rules", help="branch predictions, per run")
    sub.add_parser("shares", parents=[runs])
    s = sub.add_parser("swap", parents=[runs])
    s.add_argument("--task", required=True)
    s.add_argument("--wide", nargs="+", required=True, help="NAME=FILE.npz (wide_branch.py "
                   "--save)")
    args = p.parse_args()
    {"screen": screen, "shares": shares, "swap": swap}[args.what](args)


if __name__ == "__main__":
    main()
