#!/usr/bin/env python3
"""Where the served model runs, by batch size: the full-depth `serving_default` of one run with
the model at the signature's top level, inside a functional `If`, and as exported
(`resic_tf.export._on_rows`: inside for 32 rows or fewer, at top level above), timed in one
process on real texts; and how long a single text's read of the weights takes (the floor of
batch-1 latency at any length).

    python benchmarks/serving_overhead.py --run runs/accuracy_s9/korean-hate-speech_late34_f32-64-128-256_e6_seed42 \\
        --data resic_tf/demo_data/korean_hate_speech/dev.tsv

Prints ms per batch at 256, 32 and 1 for each placement, then the weight-read time.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import resic_tf.export as export
from bench_data import scratch_run  # noqa: E402 (benchmarks/ is on sys.path)
from length_speed import median_seconds  # noqa: E402
from resic_tf.data import load_labelled_texts

PLACEMENTS = {
    "top level": lambda text, run, empty, **_: tf.cond(tf.size(text) > 0, run, empty),
    "inside a functional If": lambda text, run, empty, **_: export._skip_unless(
        tf.size(text) > 0, run, empty),
    "as exported (_on_rows)": export._on_rows,
}


def weight_read_ms(model, repeats: int = 50) -> tuple[float, float]:
    """(MB, median ms) to read every weight tensor of 4,096 values or more, embedding tables
    excluded (a text reads only its own rows of those)."""
    big = [v for v in model.weights
           if np.prod(v.shape) >= 4096 and "embedding" not in v.path]
    read = tf.function(lambda: tf.add_n([tf.reduce_sum(v) for v in big]))
    read()
    return (sum(int(np.prod(v.shape)) for v in big) * 4 / 1e6,
            1e3 * median_seconds(read, repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run (copied; the original is not "
                   "changed)")
    p.add_argument("--data", required=True, help="a file with the run's text column")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with scratch_run(args.run) as (run, tmp):
        texts = load_labelled_texts(args.data, run.train_config.text_col,
                                    list(run.config.tasks)).texts
        texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
        texts = (texts * (1024 // len(texts) + 1))[:1024]
        served, exported = {}, export._on_rows
        try:
            for v, (name, place) in enumerate(PLACEMENTS.items(), start=1):
                export._on_rows = place
                path = export.export_run(run, os.path.join(tmp, "sm"), version=v)
                served[name] = tf.saved_model.load(str(path)).signatures["serving_default"]
        finally:
            export._on_rows = exported
        print(f"run={args.run}; blocks={run.config.num_blocks}; filters="
              f"{list(run.config.filters)}; cores={os.cpu_count()}; full-depth serving_default, "
              f"ms per batch (median of {args.repeats} passes over the texts)\n")
        print("| where the model runs | batch 256 | batch 32 | batch 1 |\n|---|---|---|---|")
        for name, serve in served.items():
            cells = []
            for batch, rows in ((256, 1024), (32, 512), (1, 200)):
                batches = [tf.constant(texts[i:i + batch]) for i in range(0, rows, batch)]
                for b in batches[:2]:
                    serve(text=b)
                seconds = median_seconds(lambda: [serve(text=b) for b in batches], args.repeats)
                cells.append(f"{1e3 * seconds / len(batches):.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        mb, ms = weight_read_ms(run.model)
        print(f"\nreading {mb:.1f} MB of weights (tensors of >= 4096 values, no embedding "
              f"tables): {ms:.2f} ms")


if __name__ == "__main__":
    main()
