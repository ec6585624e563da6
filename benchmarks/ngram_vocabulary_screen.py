"""Hashed n-gram buckets against an n-gram vocabulary (one row per n-gram seen in training,
unseen n-grams left out), on the wide branch's own n-grams (`NGramEmbedding.buckets`).

Two screens (session 16, docs/RESULTS.md):

    # the linear baseline's model (TF-IDF, sublinear tf + LinearSVC C=0.5) over the branch's
    # n-grams: hashed into B buckets, with or without the columns no training row has
    python benchmarks/ngram_vocabulary_screen.py linear --task bias --buckets 65536,1048576
    # the wide branch alone (mean of 64-wide rows -> dense softmax, SGD lr 8, 25 epochs, as
    # `--wide-epochs` trains it): hashed into 65,536 buckets, or a vocabulary of the n-grams
    # in at least K training texts
    python benchmarks/ngram_vocabulary_screen.py neural --task hate --split-seed 1 --min-df 2
    python benchmarks/ngram_vocabulary_screen.py neural --task hate --hashed 65536

One JSON line per setting: validation and test macro-F1 (%). Same korean-hate-speech splits as
`wide_branch.py` (`--split-seed`: 10% of train.tsv held out; test = dev.tsv).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)
from wide_branch import load


def id_batches(splits):
    """Each split's texts as character ids (the training rows' vocabulary, 132 steps), in
    batches of 4096."""
    import tensorflow as tf

    from resic_tf.preprocessor import ResICPreprocessor
    from resic_tf.vocabulary import CharVocabulary

    to_ids = ResICPreprocessor(CharVocabulary.build(splits[0][0]).chars, max_len=132,
                               pad_to_max_len=True)
    return [[to_ids(tf.constant(list(texts[s:s + 4096]))) for s in range(0, len(texts), 4096)]
            for texts, _ in splits]


def branch_hashes(batches):
    """Each split's n-gram hashes as the wide branch computes them
    (`resic_tf.layers.text_ngram_hashes`), `(rows, features)` int64, -1 where an n-gram is not
    within the text."""
    from resic_tf.layers import text_ngram_hashes
    out = []
    for split in batches:
        parts = [np.where(inside.numpy(), h.numpy(), -1) for h, inside in
                 (text_ngram_hashes(ids, (1, 2, 3, 4)) for ids in split)]
        out.append(np.concatenate(parts))
    return out


def vocabulary_rows(batches, min_df: int):
    """Each split's n-grams as rows of a vocabulary of the n-grams in >= `min_df` training
    texts (`resic_tf.tfidf.TfidfNGrams`' columns, + 1), 0 where an n-gram has no row or is not
    within the text; and the table's rows (vocabulary + 1)."""
    from resic_tf.tfidf import TfidfNGrams
    layer = TfidfNGrams(2 ** 21, min_count=min_df)
    stats = layer.adapt(batches[0])
    if stats["columns"] == layer.max_ngrams:
        raise SystemExit(f"more than {layer.max_ngrams} n-grams: raise the vocabulary's cap")
    rows = []
    for split in batches:  # every known n-gram weighs > 0 (its idf is >= 1)
        rows.append(np.concatenate([np.where(w.numpy() > 0, c.numpy() + 1, 0) for c, w in
                                    (layer(ids) for ids in split)]))
    return rows, stats["columns"] + 1


def linear(args, splits, batches) -> None:
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.metrics import f1_score
    from sklearn.svm import LinearSVC

    ys = [y for _, y in splits]
    hashes = branch_hashes(batches)
    for buckets in (int(b) for b in args.buckets.split(",")):
        xs = []
        for h in hashes:
            r, c = np.nonzero(h >= 0)
            xs.append(sp.csr_matrix((np.ones(len(r)), (r, h[r, c] % buckets)),
                                    shape=(len(h), buckets)))
        seen = np.asarray((xs[0] > 0).sum(0)).ravel() > 0
        row = {"task": args.task, "split_seed": args.split_seed, "buckets": buckets,
               "unseen_share_test": round(float(xs[2][:, ~seen].sum() / xs[2].sum()), 3)}
        for name, keep in (("all_columns", np.arange(buckets)), ("seen_columns",
                                                                  np.flatnonzero(seen))):
            x = [m[:, keep] for m in xs]
            tfidf = TfidfTransformer(sublinear_tf=True).fit(x[0])
            clf = LinearSVC(C=0.5).fit(tfidf.transform(x[0]), ys[0])
            row[name] = [round(100 * f1_score(y, clf.predict(tfidf.transform(m)),
                                              average="macro"), 2)
                         for m, y in zip(x[1:], ys[1:])]
        print(json.dumps(row), flush=True)


def neural(args, splits, batches) -> None:
    import keras
    import tensorflow as tf
    from sklearn.metrics import f1_score

    from resic_tf.layers import masked_average

    if args.hashed:
        rows = [np.where(h >= 0, h % args.hashed + 1, 0) for h in branch_hashes(batches)]
        size = args.hashed + 1
    else:  # row i + 1 for the i-th n-gram (sorted) found in >= min_df training texts
        rows, size = vocabulary_rows(batches, args.min_df)
    ys = [y for _, y in splits]
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    vectors = keras.layers.Embedding(size, args.dim, embeddings_initializer=keras.initializers
                                     .RandomUniform(-0.05, 0.05))(ids)
    pooled = keras.layers.Lambda(lambda t: masked_average(t[0], tf.not_equal(t[1], 0)))(
        [vectors, ids])
    model = keras.Model(ids, keras.layers.Dense(int(max(ys[0]) + 1),
                                                activation="softmax")(pooled))
    steps = args.epochs * (len(rows[0]) // args.batch_size)
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.PolynomialDecay(
        args.learning_rate, steps, 0.0)), loss="sparse_categorical_crossentropy")
    start = time.time()
    model.fit(rows[0], ys[0], batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              shuffle=True)
    scores = [round(100 * f1_score(y, model.predict(r, verbose=0, batch_size=1024).argmax(-1),
                                   average="macro"), 2) for r, y in zip(rows[1:], ys[1:])]
    print(json.dumps({"task": args.task, "split_seed": args.split_seed,
                      "rows": f"hashed {args.hashed}" if args.hashed else
                      f"vocabulary df >= {args.min_df}", "table_rows": size,
                      "val_test": scores, "s": round(time.time() - start)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("linear", "neural"))
    p.add_argument("--dataset", default="korean-hate-speech", choices=sorted(DATASETS))
    p.add_argument("--task", default=None)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--buckets", default="65536,1048576", help="linear: hashed sizes")
    p.add_argument("--hashed", type=int, default=0, help="neural: buckets (0: vocabulary)")
    p.add_argument("--min-df", type=int, default=1, help="neural: the vocabulary's least "
                   "document frequency")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=8.0)
    args = p.parse_args()
    splits, _ = load(args.dataset, args.task, args.data, args.split_seed)
    {"linear": linear, "neural": neural}[args.what](args, splits, id_batches(splits))


if __name__ == "__main__":
    main()
