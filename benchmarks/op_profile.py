#!/usr/bin/env python3
"""Where an inference pass spends its time, per op type and per block, from TensorFlow's own
trace (the graph/session runner with `RunOptions.FULL_TRACE`, i.e. the profiler's step stats).

Builds Res-IC18 (paper filters, two tasks: 2 + 10 classes), freezes `model(ids)` into a graph,
runs a batch of random ids of the given length, and prints the session time and the op time
summed by op type and, for convolutions, by block. Ops overlap (inter-op parallelism), so the
op times add up to more than the wall clock.

    python benchmarks/op_profile.py --steps 27                 # length-adaptive, 27 characters
    python benchmarks/op_profile.py --steps 132 --fixed        # the first release at 132
"""
from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from resic_tf.config import ResICConfig
from resic_tf.model import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=27)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fixed", action="store_true", help="the fixed-length model (max_len=steps)")
    p.add_argument("--arch", default="resic18")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tasks = {"polarity": ["neg", "pos"], "rating": [str(i) for i in range(1, 11)]}
    config = ResICConfig(tasks=tasks, vocab_size=1878, arch=args.arch,
                         length_adaptive=not args.fixed,
                         max_len=args.steps if args.fixed else 132)
    model = build_model(config)
    fn = tf.function(lambda x: model(x, training=False))
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function(
        tf.TensorSpec([None, args.steps if args.fixed else None], tf.int32)))
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    feed_name = frozen.inputs[0].name
    fetches = [o.name for o in frozen.outputs]
    ids = np.random.default_rng(0).integers(2, 1878, (args.batch_size, args.steps)).astype("int32")
    by_type, by_block = collections.Counter(), collections.Counter()
    with tf.compat.v1.Session(graph=graph) as session:
        for _ in range(3):
            session.run(fetches, {feed_name: ids})
        start = time.perf_counter()
        for _ in range(args.repeats):
            session.run(fetches, {feed_name: ids})
        wall = (time.perf_counter() - start) / args.repeats
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(args.repeats):
            meta = tf.compat.v1.RunMetadata()
            session.run(fetches, {feed_name: ids}, options=options, run_metadata=meta)
            for device in meta.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label or node.node_name
                    op = label.split("= ")[-1].split("(")[0]
                    ms = node.op_end_rel_micros / 1e3 / args.repeats
                    by_type[op] += ms
                    if "Conv2D" in op or ("MatMul" in op and "block" in node.node_name):
                        parts = node.node_name.split("/")
                        block = next((q for q in parts if q.startswith("block")), "stem")
                        by_block[block.rsplit("_", 1)[0] if block != "stem" else block] += ms
    print(f"{args.arch} {'fixed' if args.fixed else 'length-adaptive'}, batch {args.batch_size} x "
          f"{args.steps} steps: {1e3 * wall:.1f} ms per pass, {len(graph.get_operations())} "
          f"graph nodes")
    print("\n| op type | ms (summed over overlapping ops) |\n|---|---|")
    for op, ms in by_type.most_common(10):
        print(f"| {op} | {ms:.1f} |")
    print("\n| block (convolutions and their matrix products) | ms |\n|---|---|")
    for block in sorted(by_block):
        print(f"| {block} | {by_block[block]:.1f} |")


if __name__ == "__main__":
    main()
