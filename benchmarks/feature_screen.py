#!/usr/bin/env python3
"""Screen n-gram feature sets for the wide branch with the linear baseline (TF-IDF, sublinear
tf, min_df 2 + LinearSVC(C=0.5), as `resic_tf.baselines.tfidf_svc`) on a prepared dataset's
train and test files: a cheap proxy, seconds per set, before building a feature into the graph.

    python benchmarks/feature_screen.py --dataset nsmc --task polarity --text-col review \\
        s:1-4 c:1-4 s:1-4+w:1-2 j:1-6 J:1-6

A set is `+`-joined parts `KIND:LO-HI`: `s` character n-grams within words (the baseline's
`char_wb`), `c` character n-grams across words, `w` whitespace words, `j` / `J` the same as `s`
/ `c` over the text with Hangul syllables decomposed into jamo (NFD). Needs the `[bench]` extra.
Prints accuracy and macro-F1 on the test file per set.
"""
from __future__ import annotations

import argparse
import time
import unicodedata

import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="runs/paper/data", help="scripts/prepare_datasets.py's out")
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--text-col", required=True)
    p.add_argument("sets", nargs="+")
    args = p.parse_args()
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC

    read = lambda name: pd.read_csv(f"{args.data}/{args.dataset}/{name}", sep="\t",  # noqa: E731
                                    quoting=3, keep_default_na=False, dtype=str)
    train, test = read("train.tsv"), read("test.tsv")
    texts = {False: (train[args.text_col].tolist(), test[args.text_col].tolist())}
    texts[True] = tuple([unicodedata.normalize("NFD", t) for t in part] for part in texts[False])
    analyzers = {"s": ("char_wb", False), "c": ("char", False), "w": ("word", False),
                 "j": ("char_wb", True), "J": ("char", True)}
    print(f"{args.dataset} {args.task}: {len(train)} train, {len(test)} test rows\n")
    print("| features | accuracy | macro-F1 | fit + predict s |\n|---|---|---|---|")
    for spec in args.sets:
        start = time.perf_counter()
        fitted, applied = [], []
        for part in spec.split("+"):
            kind, span = part.split(":")
            lo, hi = (int(x) for x in span.split("-"))
            analyzer, jamo = analyzers[kind]
            vec = TfidfVectorizer(analyzer=analyzer, ngram_range=(lo, hi), sublinear_tf=True,
                                  min_df=2, token_pattern=r"\S+")
            fitted.append(vec.fit_transform(texts[jamo][0]))
            applied.append(vec.transform(texts[jamo][1]))
        model = LinearSVC(C=0.5).fit(hstack(fitted).tocsr(), train[args.task])
        pred = model.predict(hstack(applied).tocsr())
        print(f"| {spec} | {100 * accuracy_score(test[args.task], pred):.1f} | "
              f"{100 * f1_score(test[args.task], pred, average='macro'):.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
