#!/usr/bin/env python3
"""What a single text's request costs in an export, by how deep it goes: the SavedModel loaded
by the graph/session loader (TF Serving's path), one text per `Session.run`, and TensorFlow's
own trace of it (`RunOptions.FULL_TRACE`: nodes run, op time by op type).

    python benchmarks/batch1_profile.py --run RUN --data FILE [--policy hybrid] [--ops 12]

Times texts that the calibrated policy stops at the wide exit (0 blocks), after one block and
after all, each through the full-depth and the early-exit export, with the weights as
variables (`freeze=False`) and frozen (the default), and counts the nodes each text runs.
`--ops N` adds the op types that take most time (ops overlap, so their times add up to more
than the wall clock).
"""
from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bench_data import scratch_run  # noqa: E402 (benchmarks/ is on sys.path)
from resic_tf.evaluation import predict_file
from resic_tf.export import export_run
from resic_tf.policies import apply_policy

class SessionModel:
    """`serving_default` of an export, run by the graph/session loader."""

    def __init__(self, path: str):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.load(self.session, ["serve"], path)
        sig = meta.signature_def["serving_default"]
        self.feed = sig.inputs["text"].name
        self.fetches = {k: v.name for k, v in sig.outputs.items()}

    def __call__(self, text: str, options=None, meta=None):
        return self.session.run(self.fetches, {self.feed: [text]}, options=options,
                                run_metadata=meta)

    def median_ms(self, texts, repeats: int) -> float:
        for t in texts[:3]:
            self(t)
        times = []
        for t in texts:
            best = []
            for _ in range(repeats):
                start = time.perf_counter()
                self(t)
                best.append(time.perf_counter() - start)
            times.append(np.median(best))
        return 1e3 * float(np.median(times))

    def trace(self, texts):
        """(op type -> ms, nodes run) per text, averaged over `texts`."""
        by_type, nodes = collections.Counter(), []
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for t in texts:
            meta = tf.compat.v1.RunMetadata()
            self(t, options, meta)
            count = 0
            for device in meta.step_stats.dev_stats:
                for node in device.node_stats:
                    count += 1
                    label = node.timeline_label or node.node_name
                    op = label.split("= ")[-1].split("(")[0].strip() or node.node_name
                    ms = (node.all_end_rel_micros or node.op_end_rel_micros) / 1e3 / len(texts)
                    by_type[op] += ms
            nodes.append(count)
        return by_type, float(np.mean(nodes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run (copied; not changed)")
    p.add_argument("--data", required=True, help="labelled test file with the run's columns")
    p.add_argument("--policy", default="hybrid")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--texts", type=int, default=100, help="texts timed per depth")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", type=int, default=0, help="also print the N op types that take "
                   "most time for texts stopping at the wide exit")
    args = p.parse_args()
    with scratch_run(args.run) as (run, tmp):
        if args.policy != "length":
            run.calibrate_policy(args.policy, budget=args.budget)
        test = predict_file(run, args.data, keep_texts=True)
        _, _, blocks = apply_policy(run.policy(args.policy), test.probs, test.lengths)
        n = run.config.num_blocks
        depths = [d for d in sorted({0, 1, n}) if (blocks == d).any()]
        chosen = {d: [t for t, b in zip(test.rows.texts, blocks) if b == d][:args.texts]
                  for d in depths}
        print(f"run={args.run}; policy={args.policy} (budget {args.budget}); blocks={n}; "
              f"cores={os.cpu_count()}; share of test texts by blocks run: " +
              ", ".join(f"{d}: {100 * np.mean(blocks == d):.0f}%" for d in depths) +
              f"; up to {args.texts} texts per depth, median ms per text (median of "
              f"{args.repeats} runs each), session loader; nodes: traced nodes per text\n")
        print("| export | weights | " + " | ".join(f"texts stopping after {d} blocks: ms (nodes)"
                                                   for d in depths) + " |")
        print("|---|---|" + "---|" * len(depths))
        version = 0
        for freeze in (False, True):
            for name, early in (("full depth", False), ("early exit", True)):
                version += 1
                model = SessionModel(str(export_run(
                    run, os.path.join(tmp, "sm"), version=version, early_exit=early,
                    policy=args.policy if early else "length", freeze=freeze)))
                cells = []
                for d in depths:
                    ms = model.median_ms(chosen[d], args.repeats)
                    nodes = model.trace(chosen[d][:5])[1]
                    cells.append(f"{ms:.2f} ({nodes:.0f})")
                print(f"| {name} | {'frozen' if freeze else 'variables'} | " + " | ".join(cells)
                      + " |", flush=True)
                if args.ops and early and 0 in chosen:
                    by_type, _ = model.trace(chosen[0][:20])
                    print("\n  " + ", ".join(f"{op} {ms:.3f}" for op, ms in
                                             by_type.most_common(args.ops)) + "\n")


if __name__ == "__main__":
    main()
