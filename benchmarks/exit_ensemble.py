"""Does averaging exits beat the LC? Scores finished runs on their test split, no retraining.

For each run: test macro-F1 of the LC, the gate (when calibrated), the mean of every exit's
probabilities, and the mean of the last k exits with k chosen on the run's own validation rows
(never the test rows). Prints one table per task with mean ± sd over the runs given.

    python benchmarks/exit_ensemble.py --data resic_tf/demo_data/korean_hate_speech/dev.tsv \\
        runs/accuracy/korean-hate-speech_default_f32-64-128-256_e6_seed4{2,3,4}
"""
from __future__ import annotations

import argparse

import numpy as np

from resic_tf.gate import gated_predictions
from resic_tf.metrics import macro_f1
from resic_tf.run import Run, predict_file


def last_k_mean(probs: np.ndarray, k: int) -> np.ndarray:
    return probs[:, -k:].mean(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data", required=True, help="the test split")
    args = p.parse_args()
    scores: dict[str, dict[str, list[float]]] = {}
    for path in args.runs:
        run = Run.load(path)
        test = predict_file(run, args.data)
        val = predict_file(run, run.validation)
        for task, classes in run.config.tasks.items():
            k_classes = len(classes)
            y, pr = test.labels[task], test.probs[task]
            # k chosen on validation rows: the best mean of the last k exits
            vy, vp = val.labels[task], val.probs[task]
            n = vp.shape[1]
            val_f1 = [macro_f1(vy, last_k_mean(vp, k).argmax(-1), k_classes)
                      for k in range(1, n + 1)]
            k_best = int(np.argmax(val_f1)) + 1
            row = {"LC": macro_f1(y, pr[:, -1].argmax(-1), k_classes),
                   "mean of all exits": macro_f1(y, pr.mean(axis=1).argmax(-1), k_classes),
                   "mean of last k (k on validation)": macro_f1(
                       y, last_k_mean(pr, k_best).argmax(-1), k_classes)}
            if run.gate is not None:
                gp = gated_predictions(run.gate, task, pr, test.lengths)[0].argmax(-1)
                row["gate"] = macro_f1(y, gp, k_classes)
            for name, value in row.items():
                scores.setdefault(task, {}).setdefault(name, []).append(100 * value)
            print(f"{path} {task}: k={k_best} " +
                  ", ".join(f"{name} {100 * v:.1f}" for name, v in row.items()), flush=True)
    for task, rows in scores.items():
        print(f"\n### {task} (test macro-F1, {len(args.runs)} runs)\n")
        print("| prediction | macro-F1 |\n|---|---|")
        for name, values in rows.items():
            # sd over the runs as the other tables of docs/RESULTS.md give it (ddof 0)
            print(f"| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} |")


if __name__ == "__main__":
    main()
