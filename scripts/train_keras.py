#!/usr/bin/env python3
"""A plain `model.fit` training script built from resic_tf's public pieces.

`resic train` does the same with resumption, atomic checkpoints and best-epoch selection; start
from this file when you want to change the loop itself (optimizer, schedule, callbacks).

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

from resic_tf import CharEncoder, CharVocabulary, ResICConfig, build_model
from resic_tf.callbacks import MacroF1Callback, final_exit_table
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels, split_train_val
from resic_tf.model import compile_model
from resic_tf.vocabulary import text_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--text-col", required=True)
    p.add_argument("--label-cols", required=True)
    p.add_argument("--arch", default="resic18")
    p.add_argument("--filters", default="64,128,256,512")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    # text -> labels and character ids
    label_cols = args.label_cols.split(",")
    rows = load_labelled_texts(args.data, args.text_col, label_cols)
    train, val = split_train_val(rows, 0.1, args.seed)
    tasks = {c: sorted_labels(rows.labels[c]) for c in label_cols}
    vocab = CharVocabulary.build(train.texts)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, arch=args.arch,
                         filters=tuple(int(f) for f in args.filters.split(",")))
    encoder = CharEncoder(vocab.chars, config.max_len)
    y_train, y_val = encode_labels(train, tasks), encode_labels(val, tasks)

    def targets(y):  # every exit of a task learns the task's label
        return {name: y[t] for t in tasks for name in config.exit_names(t)}

    train_ds = text_dataset(train.texts, encoder, args.batch_size, targets(y_train), shuffle=True,
                            seed=args.seed)
    val_ds = text_dataset(val.texts, encoder, args.batch_size, targets(y_val))

    # ids -> model -> per-exit macro-F1 every epoch
    model = build_model(config)
    compile_model(model, config)  # Adam + cross-entropy, loss weights i/N and 1 for the LC
    f1 = MacroF1Callback(config, text_dataset(val.texts, encoder, args.batch_size), y_val,
                         log_dir=str(out / "tensorboard" / "exits"),
                         csv_path=str(out / "metrics.csv"))
    model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, shuffle=False,
              callbacks=[f1, keras.callbacks.TensorBoard(str(out / "tensorboard"))])
    model.save(out / "model.keras")
    config.save(out / "config.json")
    vocab.save(out / "vocab.json")
    print(final_exit_table(config, f1.evaluate()))


if __name__ == "__main__":
    main()
