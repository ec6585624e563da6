#!/usr/bin/env python3
"""Length-adaptive Res-IC against the fixed-132 model, same weights, on real NSMC reviews.

For each arch (Res-IC18, Res-IC34; paper filters 64..512 unless --filters), builds the fixed
model (every batch padded to max_len 132, padding takes part: the first release) and the
length-adaptive one (batches of similar lengths, each padded to its own longest text, masked),
copies the fixed model's weights into the adaptive one, and measures in one run:

- training samples/s: `train_on_batch` on batches from each model's own training pipeline
  (shuffled; the adaptive one sorts windows of 64 batches by length), the same random draw of
  batches timed for both (whole epoch's mean padded length printed beside the sample's);
- bulk inference rows/s at batch 256: Keras `model.predict(texts)` (the adaptive model sorts by
  length and restores input order) and the exported SavedModel through `predict_saved_model`
  (the bulk client sends sorted batches), plus the SavedModel fed random (unsorted) batches;
- batch-1 latency on a median-length review, Keras `predict_on_batch` and the SavedModel;
- GFLOP/s of training (3 forward passes per row) and inference, from `resic_tf.flops`.

With --profile it also splits one training step of the adaptive Res-IC18 (see the output).

    python benchmarks/length_speed.py                       # ~10 min on 2 CPU cores
    python benchmarks/length_speed.py --archs resic18 --train-batches 4 --infer-rows 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from resic_tf.config import ResICConfig, TrainConfig
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels
from resic_tf.export import export_run, predict_saved_model
from resic_tf.flops import forward_flops
from resic_tf.gate import LengthGate, num_buckets
from resic_tf.model import build_model
from resic_tf.preprocessor import string_dataset
from resic_tf.run import Run
from resic_tf.vocabulary import CharVocabulary, length_order, text_lengths

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "nsmc",
                            "train.tsv")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def last_exit_gate(config: ResICConfig) -> LengthGate:
    """A gate that always answers with the LC (the export needs one; speed does not depend on
    which exit is read)."""
    n = num_buckets(config.max_len, 10)
    return LengthGate(10, "macro_f1", 1, {t: config.exit_names(t) for t in config.tasks},
                      {t: [config.num_exits - 1] * n for t in config.tasks},
                      {t: config.num_exits - 1 for t in config.tasks})


def training_batches(model, texts, targets, batch_size, by_length, seed):
    ds = string_dataset(texts, targets, batch_size, shuffle=True, seed=seed, by_length=by_length)
    ds = ds.map(lambda x, y: (model.preprocessor(x), y))
    return [(x.numpy(), {k: v.numpy() for k, v in y.items()}) for x, y in ds
            if x.shape[0] == batch_size]


def measure_arch(arch, args, texts, labels, tasks, vocab, tmp) -> dict:
    base = ResICConfig(tasks=tasks, vocab_size=vocab.size, arch=arch, filters=args.filters,
                       max_len=132, length_adaptive=False)
    models = {"fixed": base, "adaptive": dataclasses.replace(base, length_adaptive=True)}
    keras.utils.set_random_seed(0)
    built = {k: build_model(c, vocab) for k, c in models.items()}
    built["adaptive"].set_weights(built["fixed"].get_weights())
    out = {"arch": arch, "params": built["fixed"].count_params()}
    targets = {name: labels[t] for t in tasks for name in base.exit_names(t)}
    for kind, model in built.items():
        config = models[kind]
        model.compile()
        batches = training_batches(model, texts, targets, args.batch_size,
                                   config.length_adaptive, seed=0)
        epoch_len = float(np.mean([x.shape[1] for x, _ in batches]))
        # A systematic sample: evenly spaced in the epoch's batches ordered by padded length,
        # so the timed batches' mean length is the epoch's.
        by_len = sorted(range(len(batches)), key=lambda i: batches[i][0].shape[1])
        n = min(args.train_batches, len(batches))
        timed = [batches[by_len[int((j + 0.5) * len(batches) / n)]] for j in range(n)]
        for x, y in batches[:3]:  # graph builds (and the relaxed shape of a second length)
            model.train_on_batch(x, y)
        start = time.perf_counter()
        for x, y in timed:
            model.train_on_batch(x, y)
        seconds = time.perf_counter() - start
        rows = len(timed) * args.batch_size
        flops = sum(forward_flops(config, x.shape[1]) for x, _ in timed) * args.batch_size
        out[f"{kind}_train"] = rows / seconds
        out[f"{kind}_train_gflops"] = 3 * flops / seconds / 1e9
        out[f"{kind}_epoch_len"] = epoch_len
        out[f"{kind}_timed_len"] = float(np.mean([x.shape[1] for x, _ in timed]))

        infer = texts[: args.infer_rows]
        model.predict(infer[:512], batch_size=args.batch_size, verbose=0)
        seconds = median_seconds(lambda: model.predict(infer, batch_size=args.batch_size,
                                                       verbose=0), 2)
        out[f"{kind}_keras"] = len(infer) / seconds
        # Each sorted batch is padded to its longest text (1..132); fixed batches to 132.
        sorted_lengths = np.clip(np.sort(text_lengths(infer)), 1, 132)
        lens = [int(sorted_lengths[j:j + args.batch_size].max()) if config.length_adaptive
                else 132 for j in range(0, len(infer), args.batch_size)]
        out[f"{kind}_keras_gflops"] = sum(forward_flops(config, L) * args.batch_size
                                          for L in lens) / seconds / 1e9

        median_text = args.median_text
        ids1 = model.preprocessor(tf.constant([median_text]))
        model.predict_on_batch(ids1)
        out[f"{kind}_latency_keras_ms"] = 1e3 * median_seconds(
            lambda: model.predict_on_batch(ids1), args.latency_repeats)

        train_config = TrainConfig(data="bench", text_col="review", label_cols=tuple(tasks))
        run = Run(config, train_config, vocab, model, gate=last_exit_gate(config))
        path = export_run(run, os.path.join(tmp, f"{arch}_{kind}"), version=1,
                          warmup_texts=infer[:4])
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        check = predict_saved_model(path, infer[:300], batch_size=64)  # sorted, input order
        labels_ = serve(text=tf.constant(infer[:300]))["polarity_label"].numpy()
        assert [r["polarity"]["label"] for r in check] == [v.decode() for v in labels_]

        def bulk():  # what a bulk client does: sort by length, batches of 256, input order
            order = length_order(infer)
            parts = [serve(text=tf.constant([infer[i] for i in order[j:j + args.batch_size]]))
                     ["polarity_class_id"].numpy() for j in range(0, len(infer),
                                                                   args.batch_size)]
            result = np.empty(len(infer), np.int64)
            result[order] = np.concatenate(parts)
            return result

        bulk()
        seconds = median_seconds(bulk, 2)
        out[f"{kind}_saved"] = len(infer) / seconds
        chunks = [tf.constant(infer[j:j + args.batch_size])
                  for j in range(0, len(infer), args.batch_size)]
        serve(text=chunks[0])
        seconds = median_seconds(lambda: [serve(text=c) for c in chunks], 2)
        out[f"{kind}_saved_random"] = len(infer) / seconds
        one = tf.constant([median_text])
        serve(text=one)
        out[f"{kind}_latency_saved_ms"] = 1e3 * median_seconds(lambda: serve(text=one),
                                                               args.latency_repeats)
        print(f"  {arch} {kind}: done", flush=True)
    return out


def profile_step(args, texts, labels, tasks, vocab) -> None:
    """Split one training step of the adaptive Res-IC18 into its parts, by timing each part."""
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, filters=args.filters)
    keras.utils.set_random_seed(0)
    model = build_model(config, vocab)
    targets = {name: labels[t] for t in tasks for name in config.exit_names(t)}
    model.compile()
    batches = training_batches(model, texts, targets, args.batch_size, True, seed=0)
    # A typical batch: the median padded length of an epoch's batches.
    x, y = sorted(batches, key=lambda b: b[0].shape[1])[len(batches) // 2]
    x = tf.constant(x)
    y = {k: tf.constant(v) for k, v in y.items()}
    losses = {n: keras.losses.SparseCategoricalCrossentropy() for n in model.output_names}
    weights = model.get_compile_config()["loss_weights"]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def forward_inference(x):
        return model(x, training=False)

    @tf.function(reduce_retracing=True)
    def forward_training(x):
        return model(x, training=True)

    @tf.function(reduce_retracing=True)
    def forward_losses(x, y):
        p = model(x, training=True)
        return tf.add_n([weights[n] * losses[n](y[n], p[n]) for n in model.output_names])

    @tf.function(reduce_retracing=True)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.add_n([weights[n] * losses[n](y[n], p[n]) for n in model.output_names])
        return tape.gradient(loss, model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def gradients_lc_only(x, y):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.add_n([losses[n](y[n], p[n]) for n in model.output_names
                             if n.endswith("_lc")])
        return tape.gradient(loss, model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def apply(grads):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    grads = gradients(x, y)
    plain = build_model(config, vocab)
    plain.set_weights(model.get_weights())
    plain.compile(metrics=None)
    parts = [
        ("forward, inference mode", lambda: forward_inference(x)),
        ("forward, training mode (batch statistics, dropout)", lambda: forward_training(x)),
        ("forward + 32 weighted losses", lambda: forward_losses(x, y)),
        ("forward + backward (32 losses)", lambda: gradients(x, y)),
        ("forward + backward (the 2 LC losses only)", lambda: gradients_lc_only(x, y)),
        ("optimizer update alone (Adam, 4.2 M weights)", lambda: apply(grads)),
        ("train_on_batch, no metrics", lambda: plain.train_on_batch(x, y)),
        ("train_on_batch, per-exit accuracy + macro-F1 (default)",
         lambda: model.train_on_batch(x, y)),
    ]
    rows = []
    for name, fn in parts:
        fn()
        fn()
        rows.append((name, median_seconds(fn, args.profile_repeats)))
    base = rows[0][1]
    flops = forward_flops(config, int(x.shape[1])) * int(x.shape[0])
    print(f"\nTraining step of adaptive Res-IC18, batch {x.shape[0]} padded to {x.shape[1]} "
          f"characters (median of {args.profile_repeats}):")
    print("| part | ms | x inference forward | GFLOP/s (forward FLOPs x passes) |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        passes = 3 if "backward" in name or "train_on_batch" in name else \
            (0 if "optimizer" in name else 1)
        gflops = f"{passes * flops / seconds / 1e9:.0f}" if passes else "-"
        print(f"| {name} | {1e3 * seconds:.0f} | {seconds / base:.2f} | {gflops} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="nsmc train.tsv (review, polarity, rating)")
    p.add_argument("--rows", type=int, default=16384, help="reviews drawn (seed 0)")
    p.add_argument("--archs", default="resic18,resic34")
    p.add_argument("--filters", default="64,128,256,512")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-batches", type=int, default=8, help="timed training steps per model")
    p.add_argument("--infer-rows", type=int, default=4096)
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="also split a training step")
    p.add_argument("--profile-repeats", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true", help="only --profile")
    args = p.parse_args()
    args.filters = tuple(int(f) for f in args.filters.split(","))
    rows = load_labelled_texts(args.data, "review", ["polarity", "rating"])
    index = np.random.default_rng(0).permutation(len(rows))[: args.rows]
    rows = rows.subset(index)
    tasks = {t: sorted_labels(rows.labels[t]) for t in ("polarity", "rating")}
    labels = encode_labels(rows, tasks)
    vocab = CharVocabulary.build(rows.texts)
    lengths = text_lengths(rows.texts)
    median_len = int(np.median(lengths))
    args.median_text = next(t for t, n in zip(rows.texts, lengths) if n == median_len)
    print(f"data={os.path.relpath(args.data)} rows={len(rows)} median length {median_len} "
          f"(mean {lengths.mean():.1f}, >132: {(lengths > 132).mean():.1%}) vocab={vocab.size} "
          f"filters={list(args.filters)} batch={args.batch_size} cores={os.cpu_count()} "
          f"tf={tf.__version__}", flush=True)
    if not args.skip_speed:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.archs.split(","):
                results.append(measure_arch(arch, args, rows.texts, labels, tasks, vocab, tmp))
        print("\n| arch | measure | fixed 132 | length-adaptive | ratio |\n|---|---|---|---|---|")
        lines = [
            ("train samples/s", "train", True),
            ("train GFLOP/s", "train_gflops", True),
            ("Keras predict rows/s (batch 256)", "keras", True),
            ("Keras inference GFLOP/s", "keras_gflops", True),
            ("SavedModel rows/s, bulk client (sorted batches of 256)", "saved", True),
            ("SavedModel rows/s, random batches of 256", "saved_random", True),
            ("Keras latency ms, batch 1, median review", "latency_keras_ms", False),
            ("SavedModel latency ms, batch 1, median review", "latency_saved_ms", False),
        ]
        for r in results:
            for label, key, higher in lines:
                f, a = r[f"fixed_{key}"], r[f"adaptive_{key}"]
                ratio = a / f if higher else f / a
                print(f"| {r['arch']} | {label} | {f:.1f} | {a:.1f} | "
                      f"{ratio:.2f}x{'' if higher else ' lower'} |")
            print(f"| {r['arch']} | mean padded length, epoch / timed batches | "
                  f"{r['fixed_epoch_len']:.0f} / {r['fixed_timed_len']:.0f} | "
                  f"{r['adaptive_epoch_len']:.1f} / {r['adaptive_timed_len']:.1f} | |")
    if args.profile:
        profile_step(args, rows.texts, labels, tasks, vocab)


if __name__ == "__main__":
    main()
