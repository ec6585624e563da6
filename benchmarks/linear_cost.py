#!/usr/bin/env python3
"""What a linear branch (`--linear-ngrams`) costs at serving time, measured in one run on one
machine: exit 0 (the shallow classifiers, what an early-exit policy pays for a row that stops
before the stem) with and without the linear classifier, against the full model.

    python benchmarks/linear_cost.py RUN [--data TEXTS.tsv] [--batch 256] [--repeats 5]

Traced `tf.function`s on the same batches (warm-up first), median of `--repeats` passes over
all the texts; prints milliseconds per batch and the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data", default="resic_tf/demo_data/korean_hate_speech/dev.tsv")
    p.add_argument("--text-col", default="comments")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import pandas as pd
    import tensorflow as tf

    from resic_tf.run import Run
    model = Run.load(args.run).model
    if not model.linear_heads:
        raise SystemExit(f"{args.run} has no linear branch (--linear-ngrams)")
    backbone = model.backbone
    texts = pd.read_csv(args.data, sep="\t", quoting=3)[args.text_col].astype(str).tolist()
    batches = [tf.constant(texts[s:s + args.batch]) for s in range(0, len(texts), args.batch)]
    spec = [tf.TensorSpec([None], tf.string)]

    @tf.function(input_signature=spec)
    def wide_only(text):
        ids = model.preprocessor(text)
        embedding = backbone.get_layer("ngram_embedding")(ids, padding_mask=backbone.padding_mask(ids))
        return [head(embedding) for head in model.wide_heads]

    @tf.function(input_signature=spec)
    def shallow(text):
        ids = model.preprocessor(text)
        return model.wide_probabilities(backbone.wide(ids, backbone.padding_mask(ids)))

    @tf.function(input_signature=spec)
    def full(text):
        return model(model.preprocessor(text), training=False)

    rows = {}
    for name, fn in (("wide classifier only", wide_only), ("exit 0: wide + linear", shallow),
                     ("full model (every exit)", full)):
        for b in batches:
            fn(b)  # trace and warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for b in batches:
                tf.nest.map_structure(np.asarray, fn(b))
            times.append(time.perf_counter() - start)
        rows[name] = 1000 * statistics.median(times) / len(batches)
    base = rows["wide classifier only"]
    print(f"{len(texts)} texts, batches of {args.batch}, median of {args.repeats} passes\n")
    print("| path | ms per batch | x wide only | share of full |\n|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} | {ms / rows['full model (every exit)']:.2f} |")


if __name__ == "__main__":
    main()
