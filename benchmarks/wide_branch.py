"""The wide branch alone (`NGramEmbedding` -> dense softmax, no convolutions): how far do hashed
character n-grams go, by table size, width and learning-rate multiplier?

Minutes per setting instead of the whole model's quarter hour, so the table's settings can be
screened on NSMC-style reviews (95,000 training rows) and korean-hate-speech (7,106). Beside it,
the same n-grams in a linear model (`--svc`: TF-IDF over sklearn's hashed char_wb 1-4-grams +
LinearSVC, `[bench]` extra) show what hash collisions alone cost.

    python benchmarks/wide_branch.py --dataset nsmc --buckets 65536 --dim 64 --rate 10
    python benchmarks/wide_branch.py --dataset korean-hate-speech --task bias --rate 3 \\
        --buckets 262144 --dim 32 --epochs 6 --batch-size 64
    python benchmarks/wide_branch.py --dataset nsmc --svc 65536,262144,1048576
    python benchmarks/wide_branch.py --dataset korean-hate-speech --task hate --baselines
    python benchmarks/wide_branch.py --dataset korean-hate-speech --task hate --epochs 25 \
        --batch-size 64 --rate 1 --optimizer sgd --learning-rate 8 --split-seed 1

Prints one JSON line per epoch: validation and test macro-F1 (%), seconds so far. Same splits as
`benchmarks/accuracy.py` for NSMC (`scripts/prepare_datasets.py`); korean-hate-speech holds out
10% of train.tsv by `--split-seed` (default 0; not `resic train`'s stratified split) and tests
on dev.tsv.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench_data import DATASETS, DEFAULT_DATA  # noqa: E402 (benchmarks/ is on sys.path)

from resic_tf.data import load_labelled_texts


def load(dataset: str, task: str | None, data: str, split_seed: int = 0):
    """((texts, class ids) of train, validation, test), number of classes: read by the
    project's own reader, as `resic train` reads them."""
    train, val, test, text_col, label_cols = DATASETS[dataset]
    task = task or label_cols.split(",")[0]
    tr, te = (load_labelled_texts(str(f).format(data=data), text_col, [task]) for f in (train, test))
    if val is None:  # 10% held out by `split_seed`
        va_rows = np.random.RandomState(split_seed).choice(len(tr), round(0.1 * len(tr)),
                                                           replace=False)
        va, tr = tr.subset(va_rows), tr.subset(np.setdiff1d(np.arange(len(tr)), va_rows))
    else:
        va = load_labelled_texts(str(val).format(data=data), text_col, [task])
    classes = sorted(set(tr.labels[task]))
    return [(d.texts, np.array([classes.index(c) for c in d.labels[task]], np.int32))
            for d in (tr, va, te)], len(classes)


def svc(splits, n_features: int) -> float:
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.metrics import f1_score
    from sklearn.svm import LinearSVC
    (xtr, ytr), _, (xte, yte) = splits
    hv = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=n_features,
                           alternate_sign=False, norm=None)
    tfidf = TfidfTransformer(sublinear_tf=True)
    clf = LinearSVC(C=0.5).fit(tfidf.fit_transform(hv.transform(xtr)), ytr)
    return f1_score(yte, clf.predict(tfidf.transform(hv.transform(xte))), average="macro")


def baselines(splits, seed: int = 0) -> dict:
    """The two baselines of `resic_tf.baselines` fitted on exactly this split's training rows:
    name -> (validation, test) macro-F1, so the branch's figures sit beside them."""
    from sklearn.metrics import f1_score

    from resic_tf.baselines import fasttext_clf, tfidf_svc
    (xtr, ytr), *scored = splits
    fits = {"tfidf_svc": tfidf_svc, "fasttext": lambda a, b, c: fasttext_clf(a, b, c, seed)}
    return {name: tuple(f1_score(y, np.asarray(fit(list(xtr), list(ytr), list(x)), np.int32),
                                 average="macro") for x, y in scored)
            for name, fit in fits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="nsmc", choices=sorted(DATASETS))
    p.add_argument("--task", default=None, help="label column (default: the dataset's first)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--buckets", type=int, default=65536)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--sizes", default="1,2,3,4")
    p.add_argument("--hashes", type=int, default=1, help="rows looked up per n-gram (1 or 2)")
    p.add_argument("--pooling", default="mean", choices=("mean", "weighted"))
    p.add_argument("--words", type=int, default=0, choices=(0, 1, 2), help="also whole words "
                   "(1) and word bigrams (2), fastText's word features (`word_hashes`)")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="sgd: plain SGD with a linear decay to 0, as fastText trains (no "
                   "momentum or decay, so rows a batch does not touch stay as they are)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--split-seed", type=int, default=0, help="the seed that holds out the 10%% "
                   "validation rows where the dataset has no validation file")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--save", default="", help="write the last epoch's validation and test "
                   "probabilities to this .npz file (to ensemble with a run's exits)")
    p.add_argument("--svc", default="", help="comma-separated hashed feature counts: fit the "
                   "linear baseline on them instead")
    p.add_argument("--baselines", action="store_true", help="fit TF-IDF + LinearSVC and "
                   "fastText on the same split instead ([bench] extra)")
    args = p.parse_args()
    splits, n_classes = load(args.dataset, args.task, args.data, args.split_seed)
    if args.baselines:
        for name, (val, test) in baselines(splits).items():
            print(json.dumps({"dataset": args.dataset, "task": args.task, "baseline": name,
                              "split_seed": args.split_seed,
                              "val": round(val * 100, 2), "test": round(test * 100, 2)}),
                  flush=True)
        return
    if args.svc:
        for n in (int(v) for v in args.svc.split(",")):
            t = time.time()
            print(json.dumps({"dataset": args.dataset, "svc_features": n,
                              "test": round(svc(splits, n) * 100, 2),
                              "s": round(time.time() - t)}), flush=True)
        return

    import keras
    import tensorflow as tf
    from sklearn.metrics import f1_score

    from resic_tf.layers import NGramEmbedding
    from resic_tf.preprocessor import ResICPreprocessor
    from resic_tf.vocabulary import CharVocabulary, separator_ids

    vocab = CharVocabulary.build(splits[0][0])
    to_ids = ResICPreprocessor(vocab.chars, max_len=132, pad_to_max_len=True)

    def encode(texts):
        return to_ids(tf.constant(texts, tf.string)).numpy()

    (xtr, ytr), (xva, yva), (xte, yte) = [(encode(x), y) for x, y in splits]
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32")
    wide = NGramEmbedding(args.buckets, args.dim, tuple(int(s) for s in args.sizes.split(",")),
                          args.rate, num_hashes=args.hashes, pooling=args.pooling,
                          word_ngrams=args.words,
                          separator_ids=separator_ids(vocab.chars))(ids)
    model = keras.Model(ids, keras.layers.Dense(n_classes, activation="softmax")(wide))
    steps = args.epochs * (len(xtr) // args.batch_size)
    if args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(keras.optimizers.schedules.PolynomialDecay(
            args.learning_rate, steps, 0.0))
    else:
        optimizer = keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(
            0.0, steps - steps // 20, warmup_target=args.learning_rate, warmup_steps=steps // 20),
            weight_decay=args.weight_decay)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.fit(xtr, ytr, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)
        scores = {name: round(100 * f1_score(y, model.predict(x, verbose=0, batch_size=1024)
                                             .argmax(-1), average="macro"), 2)
                  for name, (x, y) in (("val", (xva, yva)), ("test", (xte, yte)))}
        print(json.dumps({"dataset": args.dataset, "task": args.task, "buckets": args.buckets,
                          "dim": args.dim, "rate": args.rate, "hashes": args.hashes, "pooling": args.pooling,
                          "words": args.words, "optimizer": args.optimizer,
                          "lr": args.learning_rate, "split_seed": args.split_seed,
                          "epoch": epoch, **scores,
                          "s": round(time.time() - start)}), flush=True)
    if args.save:
        np.savez(args.save, val=model.predict(xva, verbose=0, batch_size=1024),
                 test=model.predict(xte, verbose=0, batch_size=1024), val_y=yva, test_y=yte)


if __name__ == "__main__":
    main()
