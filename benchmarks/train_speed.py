#!/usr/bin/env python3
"""Training and inference throughput of Res-IC18 vs Res-IC34 on this machine.

Prints parameter counts, median train samples/s and inference rows/s (after warm-up) for each
arch, and the Res-IC34 / Res-IC18 ratios. The machine may be shared: compare ratios taken in one
run, and read absolute numbers as a lower bound.

    python benchmarks/train_speed.py                      # paper filters, batch 256
    python benchmarks/train_speed.py --filters 32,64,128,256 --steps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from resic_tf import ResICConfig, build_model


def measure(arch: str, filters, batch: int, steps: int, vocab: int, max_len: int) -> dict:
    config = ResICConfig(tasks={"type": [str(i) for i in range(20)], "risk": list("abcde")},
                         vocab_size=vocab, arch=arch, filters=filters, max_len=max_len)
    model = build_model(config)
    model.compile()
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(batch, max_len), dtype=np.int32)
    y = {name: rng.integers(0, len(classes), size=batch)
         for task, classes in config.tasks.items() for name in model.exit_names(task)}
    model.train_on_batch(x, y)  # graph build
    model.train_on_batch(x, y)
    train_times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        train_times.append(time.perf_counter() - t)
    model.predict_on_batch(x)
    infer_times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.predict_on_batch(x)
        infer_times.append(time.perf_counter() - t)
    return {"arch": arch, "params": model.count_params(),
            "train_samples_per_s": batch / statistics.median(train_times),
            "infer_rows_per_s": batch / statistics.median(infer_times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--filters", default="64,128,256,512")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--max-len", type=int, default=132)
    args = p.parse_args()
    filters = tuple(int(f) for f in args.filters.split(","))
    print(f"cores={os.cpu_count()} batch={args.batch_size} max_len={args.max_len} "
          f"filters={list(filters)} vocab={args.vocab} tasks=type(20)+risk(5)")
    results = [measure(a, filters, args.batch_size, args.steps, args.vocab, args.max_len)
               for a in ("resic18", "resic34")]
    print("| arch | params | train samples/s | inference rows/s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} | {r['params']:,} | {r['train_samples_per_s']:.0f} | "
              f"{r['infer_rows_per_s']:.0f} |")
    a, b = results
    print(f"ratio resic34/resic18: params {b['params'] / a['params']:.2f}, "
          f"train speed {b['train_samples_per_s'] / a['train_samples_per_s']:.2f}, "
          f"inference speed {b['infer_rows_per_s'] / a['infer_rows_per_s']:.2f}")


if __name__ == "__main__":
    main()
