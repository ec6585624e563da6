#!/usr/bin/env python3
"""Early exit that saves compute at any batch size: every policy at its calibrated thresholds,
served, against the full-depth `serving_default`, measured in one process.

For one calibrated run: calibrates each policy on the run's validation rows (`--budget`), scores
it on the test file (macro-F1 change against the LC, mean blocks, the share of rows that stop
at exit 0 before any block, FLOPs saved; numpy on the
Keras model's exits, which the served graph equals row by row), exports it with per-row early
exit and times the SavedModels on real test texts in random order:

- batch 256 and 32: rows/s, early-exit export / full-depth export;
- batch 1: each text alone, median and mean latency over the texts, full-depth / early-exit;
- the adversarial batch FastBERT's users hit: 256 rows of which one needs full depth and the
  rest stop at the first exit, and a batch where every row needs full depth (the worst case:
  the gathers cost, nothing is saved): time early / full (target: at most 1.10).

    python benchmarks/early_exit.py --run runs/accuracy/korean-hate-speech_default_f32-64-128-256_e6_seed42 \\
        --data resic_tf/demo_data/korean_hate_speech/dev.tsv
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bench_data import scratch_run  # noqa: E402 (benchmarks/ is on sys.path)
from length_speed import median_seconds  # noqa: E402
from resic_tf.export import export_run
from resic_tf.policies import POLICIES, apply_policy, policy_summary
from resic_tf.run import predict_file


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    return median_seconds(fn, repeats)


def throughput(serve, texts: list[str], batch: int, repeats: int) -> float:
    """Rows/s over consecutive batches of `texts` (the texts' own, random, order)."""
    batches = [tf.constant(texts[i:i + batch]) for i in range(0, len(texts) - batch + 1, batch)]
    seconds = timed(lambda: [serve(text=b) for b in batches], repeats)
    return len(batches) * batch / seconds


def row_latencies(serve, texts: list[str], repeats: int):
    """Per text, alone (batch 1): median seconds over `repeats` calls, after one warm-up pass
    over all texts."""
    one = [tf.constant([t]) for t in texts]
    for b in one:
        serve(text=b)
    return np.array([median_seconds(lambda b=b: serve(text=b), repeats) for b in one])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run (copied; the original is not "
                   "changed)")
    p.add_argument("--data", required=True, help="labelled test file with the run's columns")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--rows", type=int, default=2048, help="test texts timed at batch 32/256")
    p.add_argument("--latency-rows", type=int, default=200, help="texts timed one by one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    policies = args.policies.split(",")

    with scratch_run(args.run) as (run, tmp):
        for name in policies:
            if name != "length":
                run.calibrate_policy(name, budget=args.budget)
        test = predict_file(run, args.data, keep_texts=True)
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(test.rows.texts))
        texts = [test.rows.texts[i] for i in order]
        speed_texts = (texts * (args.rows // len(texts) + 1))[:args.rows]
        full = tf.saved_model.load(str(export_run(run, os.path.join(tmp, "sm"), version=1)))
        full = full.signatures["serving_default"]
        full_256 = throughput(full, speed_texts, 256, args.repeats)
        full_32 = throughput(full, speed_texts, 32, args.repeats)
        latency_texts = texts[:args.latency_rows]
        full_1 = row_latencies(full, latency_texts, args.repeats)

        print(f"run={args.run}\ntest={args.data} ({len(texts)} rows); blocks="
              f"{run.config.num_blocks}; filters={list(run.config.filters)}; cores="
              f"{os.cpu_count()}; budget {args.budget} macro-F1 points on "
              f"{len(run.validation.texts)} validation rows\n")
        print(f"full depth: {full_256:.0f} rows/s at batch 256, {full_32:.0f} at 32, "
              f"batch 1: median {1000 * np.median(full_1):.2f} ms, mean "
              f"{1000 * full_1.mean():.2f} ms per text\n")
        tasks = list(run.config.tasks)
        print("| policy | " + " | ".join(f"{t} macro-F1 (LC)" for t in tasks) +
              " | mean blocks | rows stopped before block 1 | FLOPs saved | rows/s x, batch 256 | x, batch 32 | "
              "median latency x, batch 1 | mean latency x | one deep row in 256: time / full | all rows deep: "
              "time / full |")
        print("|---" * (len(tasks) + 9) + "|")
        for v, name in enumerate(policies, start=2):
            policy = run.policy(name)
            s = policy_summary(run.config, policy, test.probs, test.labels, test.lengths)
            served = tf.saved_model.load(str(export_run(
                run, os.path.join(tmp, "sm"), version=v, early_exit=True, policy=name)))
            serve = served.signatures["serving_default"]
            r256 = throughput(serve, speed_texts, 256, args.repeats) / full_256
            r32 = throughput(serve, speed_texts, 32, args.repeats) / full_32
            early_1 = row_latencies(serve, latency_texts, args.repeats)
            lat = np.median(full_1) / np.median(early_1)
            lat_mean = full_1.mean() / early_1.mean()
            _, _, blocks = apply_policy(policy, test.probs, test.lengths)
            shallow = [texts[i] for i in np.argsort(blocks[order], kind="stable")]
            deep = shallow[-1]
            adversarial = tf.constant(shallow[:255] + [deep])
            all_deep = tf.constant([t for t, b in zip(texts, blocks[order])
                                    if b == blocks.max()][:256] or [deep])
            adv = timed(lambda: serve(text=adversarial), args.repeats * 3) / \
                timed(lambda: full(text=adversarial), args.repeats * 3)
            worst = timed(lambda: serve(text=all_deep), args.repeats * 3) / \
                timed(lambda: full(text=all_deep), args.repeats * 3)
            cells = [f"{100 * s['tasks'][t]['macro_f1']:.1f} ({100 * s['tasks'][t]['lc_macro_f1']:.1f})"
                     for t in tasks]
            print(f"| {name} | " + " | ".join(cells) + f" | {s['mean_blocks_run']:.2f} | "
                  f"{100 * np.mean(blocks == 0):.0f}% | "
                  f"{100 * s['saved']:.0f}% | {r256:.2f} | {r32:.2f} | {lat:.2f} | {lat_mean:.2f} | "
                  f"{adv:.2f} "
                  f"| {worst:.2f} ({len(all_deep.numpy())} rows at {blocks.max()} blocks) |",
                  flush=True)


if __name__ == "__main__":
    main()
