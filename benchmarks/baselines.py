#!/usr/bin/env python3
"""The two baselines a user fits before adopting Res-IC, on the same rows `resic train` uses.

TF-IDF character 1-4-grams + LinearSVC (scikit-learn) and fastText (word bigrams, character
1-4-gram subwords), fitted on the training rows that `resic train --seed S` keeps (the same
stratified 10% validation hold-out, or the dataset's validation file), scored on the test split:
accuracy and macro-F1 per task, fit seconds. Needs the optional extra:
`pip install -e ".[bench]"`.

    python benchmarks/baselines.py --datasets korean-hate-speech,stylekqc --seeds 42,43,44
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from resic_tf.data import load_labelled_texts, split_train_val
from resic_tf.metrics import accuracy, macro_f1

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)


def tfidf_svc(train_texts, train_labels, test_texts):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    model = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4),
                                          sublinear_tf=True, min_df=2), LinearSVC(C=0.5))
    model.fit(train_texts, train_labels)
    return model.predict(test_texts)


def fasttext_clf(train_texts, train_labels, test_texts, seed: int):
    import fasttext

    clean = lambda t: " ".join(t.split())  # noqa: E731 (fastText reads one line per example)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        for text, label in zip(train_texts, train_labels):
            f.write(f"__label__{label} {clean(text)}\n")
        path = f.name
    try:
        model = fasttext.train_supervised(path, epoch=25, lr=0.5, wordNgrams=2, minn=1, maxn=4,
                                          dim=100, seed=seed, thread=2, verbose=0)
    finally:
        os.unlink(path)
    # A list goes through multilinePredict: the one-text path breaks on NumPy 2 (copy=False).
    labels, _ = model.predict([clean(t) for t in test_texts])
    return [row[0][len("__label__"):] for row in labels]


def fit_baselines(name: str, seeds, data_dir) -> dict:
    """(task, baseline) -> [(test accuracy, test macro-F1, fit+predict seconds) per seed]."""
    import sklearn  # noqa: F401 (fail early, before any fitting, without the extra)
    import fasttext  # noqa: F401

    train_f, val_f, test_f, text_col, label_cols = DATASETS[name]
    tasks = label_cols.split(",")
    data = load_labelled_texts(str(train_f).format(data=data_dir), text_col, tasks)
    test = load_labelled_texts(str(test_f).format(data=data_dir), text_col, tasks)
    scores: dict = {}
    for seed in seeds:
        train = data if val_f is not None else split_train_val(data, 0.1, seed)[0]
        for task in tasks:
            classes = sorted(set(data.labels[task]))
            y_test = np.array([classes.index(v) for v in test.labels[task]])
            for baseline in ("TF-IDF char 1-4 + LinearSVC", "fastText"):
                start = time.perf_counter()
                if baseline == "fastText":
                    pred = fasttext_clf(train.texts, train.labels[task], test.texts, seed)
                else:
                    pred = tfidf_svc(train.texts, train.labels[task], test.texts)
                seconds = time.perf_counter() - start
                pred = np.array([classes.index(v) for v in pred])
                scores.setdefault((task, baseline), []).append(
                    (accuracy(y_test, pred), macro_f1(y_test, pred, len(classes)), seconds))
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
