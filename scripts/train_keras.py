#!/usr/bin/env python3
"""A plain `model.fit` training script built from resic_tf's public pieces.

`resic train` does the same with resumption, atomic checkpoints and best-epoch selection; start
from this file when you want to change the loop itself (optimizer, schedule, callbacks). It ends
with `Run.save`, so `resic calibrate / evaluate / analyze / export` work on what it made.

Example (bundled data, tiny model, one epoch):
    python scripts/train_keras.py --data resic_tf/demo_data/korean_hate_speech/train.tsv \
        --text-col comments --label-cols bias,hate --filters 16,32,64,128 --epochs 1 --out runs/fit
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from resic_tf import CharVocabulary, ResICConfig, Run, TrainConfig, build_model
from resic_tf.callbacks import ExitMetricsLogger
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels, split_train_val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="training file (.csv, .tsv, .jsonl, .parquet)")
    p.add_argument("--text-col", required=True, help="name of the text column")
    p.add_argument("--label-cols", required=True, help="comma-separated label columns")
    p.add_argument("--arch", default="resic18", help="resic18 or resic34")
    p.add_argument("--filters", default="64,128,256,512", help="filters per stage")
    p.add_argument("--epochs", type=int, default=5, help="epochs")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--seed", type=int, default=42, help="seed of split, shuffle and weights")
    p.add_argument("--out", required=True, help="run directory to write")
    args = p.parse_args()
    out = Path(args.out)
    keras.utils.set_random_seed(args.seed)

    # text and labels; the character vocabulary of the training texts
    tc = TrainConfig(data=args.data, text_col=args.text_col, label_cols=args.label_cols.split(","),
                     epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    rows = load_labelled_texts(tc.data, tc.text_col, tc.label_cols)
    train, val = split_train_val(rows, tc.val_split, tc.seed)
    tasks = {c: sorted_labels(rows.labels[c]) for c in tc.label_cols}
    vocab = CharVocabulary.build(train.texts)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, arch=args.arch,
                         filters=tuple(int(f) for f in args.filters.split(",")))

    # raw strings -> model (its preprocessor runs inside tf.data) -> every exit
    model = build_model(config, vocab)
    model.compile()  # Adam; cross-entropy weighted i/N (ICs) and 1 (LC); per-exit metrics
    history = model.fit(train.texts, encode_labels(train, tasks), batch_size=tc.batch_size,
                        epochs=tc.epochs,
                        validation_data=(val.texts, encode_labels(val, tasks)),
                        callbacks=[ExitMetricsLogger(out / "tensorboard" / "exits",
                                                     out / "metrics.csv"),
                                   keras.callbacks.TensorBoard(str(out / "tensorboard"))])
    Run(config, tc, vocab, model, validation=val).save(out)
    for task in tasks:
        print(task, "validation macro-F1 per exit:",
              [round(history.history[f"val_{n}_macro_f1"][-1], 4) for n in model.exit_names(task)])


if __name__ == "__main__":
    main()
