#!/usr/bin/env python3
"""Serving throughput: the exported SavedModel (raw text in, gated prediction out) against the
Keras model on pre-encoded ids, on the same real texts.

Prints rows/s of: Keras `predict_on_batch` on ids (model only), the SavedModel's `all_exits`
and `serving_default` signatures on raw strings (text -> ids, model, gate in one graph), the
same with `resic export --early-exit` (rows stop at their gated exits), and the ratios. A
serving/Keras ratio near 1 means the in-graph preprocessing and gate cost little; the
early-exit ratio depends on how shallow the gate's choices are (mean depth is printed).

    make demo && python benchmarks/serve_speed.py --run runs/demo/run
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import tensorflow as tf

from resic_tf.export import export_run
from resic_tf.run import Run


def rows_per_s(fn, n_rows: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_rows / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", default="runs/demo/run", help="a calibrated run directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    run = Run.load(args.run)
    texts = pd.read_parquet(os.path.join(args.run, "validation.parquet"))[
        run.train_config.text_col].astype(str).tolist()
    texts = (texts * (args.batch_size // max(len(texts), 1) + 1))[: args.batch_size]
    batch = tf.constant(texts, tf.string)
    ids = run.preprocessor(batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_run(args.run, os.path.join(tmp, "m"), version=1)
        early_path = export_run(args.run, os.path.join(tmp, "m"), version=2, early_exit=True)
        loaded = tf.saved_model.load(str(path))
        gated, all_exits = loaded.signatures["serving_default"], loaded.signatures["all_exits"]
        early = tf.saved_model.load(str(early_path)).signatures["serving_default"]
        n = len(texts)
        keras_rps = rows_per_s(lambda: run.model.predict_on_batch(ids), n, args.repeats)
        all_rps = rows_per_s(lambda: all_exits(text=batch), n, args.repeats)
        gated_rps = rows_per_s(lambda: gated(text=batch), n, args.repeats)
        early_rps = rows_per_s(lambda: early(text=batch), n, args.repeats)
        exits = {t: gated(text=batch)[f"{t}_exit"].numpy() for t in run.config.tasks}
    print(f"run={args.run} batch={n} cores={os.cpu_count()} params={run.model.count_params():,}")
    print("| path | rows/s |\n|---|---|")
    print(f"| Keras predict_on_batch (ids in, all exits) | {keras_rps:.0f} |")
    print(f"| SavedModel all_exits (text in) | {all_rps:.0f} |")
    print(f"| SavedModel serving_default (text in, gated) | {gated_rps:.0f} |")
    print(f"| SavedModel serving_default, --early-exit | {early_rps:.0f} |")
    depth = np.max(np.stack(list(exits.values())), axis=0)
    print(f"mean depth needed: {depth.mean():.2f} of {run.config.num_blocks} blocks "
          f"(chosen exits: " + ", ".join(f"{t} mean {e.mean():.2f}" for t, e in exits.items())
          + ")")
    print(f"ratio serving_default/keras {gated_rps / keras_rps:.2f}, "
          f"serving_default/all_exits {gated_rps / all_rps:.2f}, "
          f"early-exit/serving_default {early_rps / gated_rps:.2f}")


if __name__ == "__main__":
    main()
