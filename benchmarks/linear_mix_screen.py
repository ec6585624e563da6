"""Would a third, linear branch help? Each run's deep LC and wide classifier (cached by
`late_fusion_screen.py`) mixed with a TF-IDF + logistic-regression model fitted on exactly the
run's training rows, scored on its test rows (session 16, docs/RESULTS.md).

    python benchmarks/late_fusion_screen.py shares RUN...      # caches the branches first
    python benchmarks/linear_mix_screen.py RUN... [--C 10]

The linear model: TF-IDF over character 1-4-grams (`--analyzer char_wb`: within words, the
baseline's; `char`: across words, as the wide branch hashes them), sublinear tf, min_df 2,
LogisticRegression(C) for probabilities (`[bench]` extra); with `--fit tf`, the library's own
in-graph branch instead (`resic_tf.tfidf`: `TfidfNGrams` over the wide branch's n-grams,
`LinearHead` fitted by `fit_linear`, the same objective). Mixes: deep + wide at 0.5 (what a run
serves at a fixed share), thirds of deep + wide + linear, and weights on the 0.1 simplex chosen
by the validation rows' cross-entropy. One JSON line per run and task, then the means.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)
from late_fusion_screen import f1

from resic_tf.config import TrainConfig
from resic_tf.data import load_labelled_texts
from resic_tf.training import load_splits

def graph_features(train_texts, texts_list, max_ngrams: int = 1_000_000):
    """`resic_tf.tfidf.TfidfNGrams` (the wide branch's own n-grams, across words, counted
    exactly: the n-grams of >= 2 training texts, sublinear tf, smooth idf, L2) adapted on the
    training texts: its (columns, weights) arrays for the training texts and each of
    `texts_list`, and the layer."""
    import tensorflow as tf

    from resic_tf.preprocessor import ResICPreprocessor
    from resic_tf.tfidf import TfidfNGrams
    from resic_tf.vocabulary import CharVocabulary

    to_ids = ResICPreprocessor(CharVocabulary.build(train_texts).chars, max_len=132,
                               pad_to_max_len=True)  # one width for every batch

    def batches(texts):
        for s in range(0, len(texts), 4096):
            yield to_ids(tf.constant(list(texts[s:s + 4096])))
    layer = TfidfNGrams(max_ngrams)
    layer.adapt(batches(train_texts))
    out = []
    for texts in [train_texts, *texts_list]:
        parts = [[np.asarray(v) for v in layer(ids)] for ids in batches(texts)]
        out.append(tuple(np.concatenate([p[k] for p in parts]) for k in (0, 1)))
    return out, layer


def fit_graph(features, y, n_classes: int, C: float, steps: int, max_ngrams: int):
    """`resic_tf.tfidf.LinearHead` fitted by `fit_linear` on (columns, weights); returns a
    predict_proba over (columns, weights)."""
    from resic_tf.tfidf import LinearHead, fit_linear, tfidf_matrix
    head = LinearHead(n_classes, max_ngrams)
    fit_linear(head, tfidf_matrix([features], max_ngrams), y, C=C, steps=steps)

    def predict_proba(f):
        return np.concatenate([np.asarray(head(f[0][s:s + 2048], f[1][s:s + 2048]))
                               for s in range(0, len(f[0]), 2048)])
    return predict_proba


SIMPLEX = [(a / 10, b / 10, round(1 - a / 10 - b / 10, 1)) for a in range(11)
           for b in range(11 - a)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--C", type=float, default=10.0)
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: all the run's)")
    p.add_argument("--analyzer", default="char_wb", choices=("char_wb", "char"))
    p.add_argument("--fit", default="sklearn", choices=("sklearn", "tf"), help="tf: the "
                   "wide branch's own n-grams counted exactly (`graph_features`) and the "
                   "regression fitted in TensorFlow (`fit_graph`), as an in-graph branch would be")
    p.add_argument("--steps", type=int, default=300, help="--fit tf: full-batch Adam steps")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default="runs/share_rules")
    args = p.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    table = {}
    for run_dir in args.runs:
        name = Path(run_dir).name
        b = dict(np.load(Path(args.cache) / f"{name}.npz"))
        tc = TrainConfig.load(Path(run_dir) / "train_config.json")
        train, val, tasks = load_splits(tc)
        _, _, test_file, text_col, _ = DATASETS[name.split("_")[0]]
        test = load_labelled_texts(str(test_file).format(data=args.data), text_col,
                                   list(tasks))
        if args.fit == "tf":
            xs, layer = graph_features(train.texts, [val.texts, test.texts])
        else:
            vec = TfidfVectorizer(analyzer=args.analyzer, ngram_range=(1, 4),
                                  sublinear_tf=True, min_df=2).fit(train.texts)
            xs = [vec.transform(d.texts) for d in (train, val, test)]
        for task, classes in tasks.items():
            if args.tasks and task not in args.tasks.split(","):
                continue
            ys = [np.array([classes.index(c) for c in d.labels[task]]) for d in (train, val, test)]
            if not ((ys[1] == b[f"val/{task}/y"]).all() and (ys[2] == b[f"test/{task}/y"]).all()):
                raise SystemExit(f"{name}: the rows are not the cached run's")
            if args.fit == "tf":
                proba = fit_graph(xs[0], ys[0], len(classes), args.C, args.steps,
                                  layer.max_ngrams)
            else:
                proba = LogisticRegression(C=args.C, max_iter=3000).fit(xs[0], ys[0]) \
                    .predict_proba
            lv, lt = proba(xs[1]), proba(xs[2])
            dv, dt = b[f"val/{task}/deep"][:, -1], b[f"test/{task}/deep"][:, -1]
            wv, wt = b[f"val/{task}/wide"], b[f"test/{task}/wide"]

            def nll(w):
                p = w[0] * dv + w[1] * wv + w[2] * lv
                return -np.mean(np.log(p[np.arange(len(ys[1])), ys[1]] + 1e-9))
            chosen = min(SIMPLEX, key=lambda w: (round(nll(w), 9), w))
            y = ys[2]
            row = {"deep": f1(y, dt), "wide": f1(y, wt), "linear": f1(y, lt),
                   "deep+wide": f1(y, 0.5 * dt + 0.5 * wt),
                   "deep+linear": f1(y, 0.5 * dt + 0.5 * lt),
                   "thirds": f1(y, (dt + wt + lt) / 3),
                   "by_validation": f1(y, chosen[0] * dt + chosen[1] * wt + chosen[2] * lt)}
            if len(classes) > 2 and name.startswith(("nsmc", "clinc150")):
                row["thirds_acc"] = round(100 * float((((dt + wt + lt) / 3).argmax(-1) == y)
                                                      .mean()), 2)
            print(json.dumps({"run": name, "task": task, **row, "weights": chosen}), flush=True)
            for k, v in row.items():
                table.setdefault(task, {}).setdefault(k, []).append(v)
    for task, cols in table.items():
        print(json.dumps({"task": task, "runs": len(cols["deep"]),
                          **{k: f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}"
                             for k, v in cols.items()}}))


if __name__ == "__main__":
    main()
