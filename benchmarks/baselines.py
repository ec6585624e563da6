#!/usr/bin/env python3
"""The two baselines a user fits before adopting Res-IC, on the same rows `resic train` uses.

TF-IDF character 1-4-grams + LinearSVC (scikit-learn) and fastText (word bigrams, character
1-4-gram subwords; both in `resic_tf.baselines`), fitted on the training rows that `resic train --seed S` keeps (the same
stratified 10% validation hold-out, or the dataset's validation file), scored on the test split:
accuracy and macro-F1 per task, fit seconds. Needs the optional extra:
`pip install -e ".[bench]"`.

    python benchmarks/baselines.py --datasets korean-hate-speech,stylekqc --seeds 42,43,44
"""
from __future__ import annotations

import argparse

import numpy as np

from resic_tf import baselines
from resic_tf.data import load_labelled_texts, split_train_val

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)


def fit_baselines(name: str, seeds, data_dir) -> dict:
    """(task, baseline) -> [(test accuracy, test macro-F1, fit+predict seconds) per seed]."""
    if not baselines.available():
        raise ImportError(baselines.EXTRA_HINT)
    train_f, val_f, test_f, text_col, label_cols = DATASETS[name]
    tasks = label_cols.split(",")
    data = load_labelled_texts(str(train_f).format(data=data_dir), text_col, tasks)
    test = load_labelled_texts(str(test_f).format(data=data_dir), text_col, tasks)
    scores: dict = {}
    for seed in seeds:
        train = data if val_f is not None else split_train_val(data, 0.1, seed)[0]
        for s in baselines.fit_baselines(train, test, tasks, seed):
            scores.setdefault((s.task, s.model), []).append((s.accuracy, s.macro_f1, s.seconds))
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="korean-hate-speech,stylekqc")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="scripts/prepare_datasets.py output")
    p.add_argument("--seeds", default="42,43,44")
    args = p.parse_args()
    print("| dataset | task | baseline | accuracy | macro-F1 | fit+predict s |\n"
          "|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        scores = fit_baselines(name, [int(s) for s in args.seeds.split(",")], args.data)
        for (task, baseline), runs in scores.items():
            acc, f1, sec = (np.array(v) for v in zip(*runs))
            print(f"| {name} | {task} | {baseline} | {acc.mean():.4f} ± {acc.std():.4f} | "
                  f"{f1.mean():.4f} ± {f1.std():.4f} | {sec.mean():.1f} |", flush=True)


if __name__ == "__main__":
    main()
