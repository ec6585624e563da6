"""TF Serving SavedModel export: raw UTF-8 text in, the prediction of an early-exit policy out.

Layout written (`savedmodels/<name>/<version>/`, the layout TF Serving watches):
    saved_model.pb, variables/       the graph with the weights frozen into it as constants
                                     (`variables/` is empty); with `freeze=False` the weights
                                     are variables, as Keras exports them
    assets.extra/tf_serving_warmup_requests   real PredictRequest records
    config.json, gate.json, policy.json, vocab.json, export.json   what the model is and how it
                                     was made

Signatures (both take `text`: tf.string `[None]`):
    serving_default   `length` (int32), `blocks_run` (int32) and, for every task T: `T_label`
                      (string), `T_class_id` (int64), `T_probabilities` (float32 `[None,
                      classes]`) and `T_exit` (int32: 1..N for the ICs, N+1 for the LC, 0 for
                      a late-fusion model's wide classifier), chosen by the policy
                      (`resic_tf.policies`; default the length gate). With early exit, each
                      row runs only the blocks its policy needs (none when it stops at the
                      wide classifier).
    all_exits         `T_probabilities` of shape `[None, N+1, classes]` for every task and, for
                      a late-fusion model, `T_wide_probabilities` `[None, classes]` (exit 0).

Everything runs in TensorFlow ops (Unicode decode, code point -> id search, pad/truncate,
model, length, bucket, policy, per-row gather and scatter); no `py_function` and no lookup
table, so TF Serving's C++ loader can run it and the weights can be frozen. Frozen weights
matter for single texts: with variables, every request runs a handle op per weight tensor and
passes each handle into every `If` on its way (three quarters of the ops of a text that stops
at the wide exit, docs/MEASURED.md). A
length-adaptive model pads each request batch to its own longest text (at most
`max_len`); a fixed-length one (runs before 0.3) always to `max_len`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
from tensorflow.python.util import deprecation

from resic_tf.config import ResICConfig, wide_exit_name
from resic_tf.gate import LengthGate, num_buckets
from resic_tf.io import atomic_directory
from resic_tf.model import ResICClassifier
from resic_tf.policies import ExitPolicy
from resic_tf.run import CONFIG_FILE, GATE_FILE, VOCAB_FILE, Run, RunDirectoryError
from resic_tf.validation import InvalidValueError, UserError, check_scalar
from resic_tf.vocabulary import char_lengths, length_order

WARMUP_FILE = "tf_serving_warmup_requests"
POLICY_FILE = "policy.json"
SIGNATURES = ("serving_default", "all_exits")
FROZEN_LIMIT = 1_800_000_000  # bytes of weights a frozen graph may hold (2 GB with the graph)


def next_version(base: str | os.PathLike) -> int:
    """One more than the largest integer version directory under `base` (1 if none)."""
    base = Path(base)
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] \
        if base.is_dir() else []
    return max(versions, default=0) + 1


def _skip_unless(pred, true_fn, false_fn):
    """`tf.cond` kept as a functional `If` op, so that the branch not taken costs nothing.

    By default TensorFlow lowers `cond` to Switch/Merge when it runs a graph, and the executor
    then walks every node of the branch not taken to propagate deadness: in the early-exit
    graph that branch holds all later blocks, so a row stopping at exit 0 paid about 0.6 ms of
    it on Res-IC34 (batch 1, 2.26 ms against 1.63 ms unlowered). An unlowered `If` calls only
    the branch taken; TF Serving's and the session loader's executors run it as they run any
    op. (Sets `_lower_using_switch_merge`, TensorFlow's own attribute for this, through its
    `control_flow_util_v2` helper; plain `tf.cond` if that helper ever goes away.)
    """
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    result = tf.cond(pred, true_fn, false_fn)
    try:
        from tensorflow.python.ops import control_flow_util_v2
    except ImportError:  # pragma: no cover - a TensorFlow without the helper
        return result
    for op in graph.get_operations()[before:]:
        if op.type in ("If", "StatelessIf"):
            control_flow_util_v2.maybe_set_lowering_attr(op, lower_using_switch_merge=False)
    return result


SMALL_BATCH = 32


def _on_rows(text, run, empty, one=None, large=None):
    """`run()` for a batch of texts, `empty()` for an empty one (oneDNN convolutions return
    wrongly shaped tensors on an empty batch), each placed where it runs fastest.

    A batch of at most `SMALL_BATCH` rows runs the model inside a functional `If`
    (`_skip_unless`), a larger one at the signature's top level: TensorFlow runs a function
    body's many small ops with less overhead, Res-IC34 at batch 1 in 3.5 ms against 6.2, but
    its large convolutions slower, 169 ms against 158 at batch 256 (korean-hate-speech, half
    width, 2 cores, docs/MEASURED.md). `one`, when given, runs a single text instead (the
    early-exit graph's leaner copy without gathers and scatters), and `large`, when given, a
    batch of more than `SMALL_BATCH` rows (default `run`). The model is traced once per copy;
    each request runs one.
    """
    size = tf.size(text)

    def small():
        if one is None:
            return _skip_unless(size > 0, run, empty)
        return _skip_unless(tf.equal(size, 1), one, lambda: _skip_unless(size > 0, run, empty))

    return tf.cond(size > SMALL_BATCH, large or run, small)


def _entropy(p):
    """Entropy of the last axis / log(classes), as `resic_tf.policies.normalised_entropy`."""
    plogp = tf.where(p > 0, p * tf.math.log(tf.where(p > 0, p, tf.ones_like(p))),
                     tf.zeros_like(p))
    return -tf.reduce_sum(plogp, axis=-1) / tf.math.log(tf.cast(tf.shape(p)[-1], tf.float32))


class _Decider:
    """A policy's stopping rule for one task in TensorFlow ops, shared by the early-exit loop and
    the full-depth path so that both decide alike (and as `resic_tf.policies.fires` does).

    It works on the rows still running, aligned with `buckets` (their length buckets) and
    `state` (a dict of per-row tensors, `_Rows`; patience keeps its previous prediction and
    count there): `decide` returns which rows stop at exit `k` and the updated state;
    `decide_wide(p)` is the wide exit's rule (`resic_tf.policies.wide_fires`).
    """

    def __init__(self, policy: ExitPolicy, task: str, num_exits: int):
        self.name, self.task, self.last = policy.name, task, num_exits - 1
        self.wide = policy.wide_thresholds.get(task)
        self.table = tf.constant(policy.thresholds[task], tf.float64)
        if self.name == "length":
            self.table = tf.cast(self.table, tf.int32)

    def initial_state(self, batch) -> dict:
        if self.name != "patience":
            return {}
        return {f"prev_{self.task}": tf.fill([batch], tf.constant(-1, tf.int64)),
                f"count_{self.task}": tf.zeros([batch], tf.float64)}

    @staticmethod
    def _fires(p, threshold, entropy: bool):
        """Top probability at or above `threshold` (`entropy`: normalised entropy at or below)."""
        if entropy:
            return tf.cast(_entropy(p), tf.float64) <= threshold
        return tf.cast(tf.reduce_max(p, axis=-1), tf.float64) >= threshold

    def decide_wide(self, p):
        return self._fires(p, self.wide, self.name == "entropy")

    def decide(self, p, k: int, buckets, state: dict):
        """(which rows stop at exit `k`, the updated `state`). The length gate stops each row at
        its bucket's exit; every rule stops every row at the last exit."""
        if k == self.last:
            return tf.ones(tf.shape(buckets), tf.bool), state
        if self.name == "length":
            return tf.equal(tf.gather(self.table, buckets), k), state
        if self.name in ("confidence", "hybrid"):
            t = self.table[0] if self.name == "confidence" else tf.gather(self.table, buckets)
            return self._fires(p, t, entropy=False), state
        if self.name == "entropy":
            return self._fires(p, self.table[0], entropy=True), state
        pred = tf.argmax(p, axis=-1)  # patience
        prev, count = f"prev_{self.task}", f"count_{self.task}"
        count_k = tf.where(tf.equal(pred, state[prev]), state[count] + 1,
                           tf.zeros_like(state[count]))
        return count_k >= self.table[0], {**state, prev: pred, count: count_k}


class _Rows:
    """The per-row tensors of the rows still running (aligned, one row each): for every task
    `done_T`, `probs_T` and `exit_T` (0-based; -1 the wide classifier) once it has stopped, the
    deciders' state, and whatever else the caller keeps per row (ids, features, ...).
    Recording a stop is two `where`s and an `or`, so a block's bookkeeping stays a few ops per
    task; rows are scattered into input order only when they leave (`_early_exit_outputs`)."""

    @staticmethod
    def initial(classes: Mapping[str, int], deciders: Mapping[str, _Decider], batch,
                num_exits: int) -> dict:
        state = {}
        for task, n in classes.items():
            state[f"done_{task}"] = tf.zeros([batch], tf.bool)
            state[f"probs_{task}"] = tf.zeros([batch, n], tf.float32)
            state[f"exit_{task}"] = tf.fill([batch], tf.constant(num_exits - 1, tf.int32))
            state.update(deciders[task].initial_state(batch))
        return state

    @staticmethod
    def stop(state: dict, task: str, p, fire, k: int) -> dict:
        """Rows where `fire` (and not already stopped) stop for `task` at exit `k` with `p`."""
        fire = fire & ~state[f"done_{task}"]
        return {**state,
                f"probs_{task}": tf.where(fire[:, None], p, state[f"probs_{task}"]),
                f"exit_{task}": tf.where(fire, tf.constant(k, tf.int32), state[f"exit_{task}"]),
                f"done_{task}": state[f"done_{task}"] | fire}

    @staticmethod
    def outputs(state: dict, tasks, blocks_run) -> dict:
        """What is served of `state`: `probs_T` and `exit_T` for every task, and `blocks_run`."""
        return {"blocks_run": blocks_run, **{key: state[key] for t in tasks
                                             for key in (f"probs_{t}", f"exit_{t}")}}

    @staticmethod
    def served(outputs: dict, tasks):
        """`outputs` as the serving functions take them: (probabilities, exits, blocks run),
        task -> tensor for the first two."""
        return ({t: outputs[f"probs_{t}"] for t in tasks},
                {t: outputs[f"exit_{t}"] for t in tasks}, outputs["blocks_run"])


def _early_exit_outputs(model: ResICClassifier, ids, buckets, policy: ExitPolicy,
                        one_row: bool = False, large: bool = False):
    """Run each row only as deep as `policy` needs: (probabilities, exits, blocks run per row).

    With the wide exit (`policy.wide_exit`), every task first decides on the wide classifier,
    and the rows that have stopped for every task skip the stem and all blocks. Block k runs on
    the rows with a task still running (their ids or features, padding masks, wide features
    and decision state, `_Rows`), with every task's exit head; a row's stop is recorded in
    place, and the rows that have stopped for every task leave: their outputs are scattered
    into input order and the others gathered (no copy when no row leaves). The blocks after k
    sit in a functional `cond` (`_skip_unless`) that is taken only while some row runs, so a
    batch whose rows have all stopped (a single text, say) skips them at no cost. BN runs in
    inference mode and every op is per row, so each exit's output equals the full-depth
    model's up to rounding. Call it on a non-empty batch (oneDNN convolutions mis-shape an
    empty one). `one_row`: the batch is a single text, which needs no gather or scatter (its
    outputs are its own state), so each block adds only its decisions and the `cond`.
    `large`: a large batch (`_on_rows`), whose later blocks sit in plain (lowered) `cond`s
    instead: a functional `If`'s body runs large convolutions slower (a batch of 256 rows that
    all run every block: 1.10 of full depth lowered, 1.19-1.23 functional, docs/MEASURED.md),
    and a large batch rarely stops whole.
    """
    backbone = model.backbone
    batch = tf.shape(ids)[0]
    n_blocks = backbone.num_blocks
    tasks = list(model.tasks)
    mask = backbone.padding_mask(ids)
    wide = backbone.wide(ids, mask)
    wide_probs = model.wide_probabilities(wide) if wide is not None else {}
    deciders = {t: _Decider(policy, t, n_blocks) for t in tasks}

    def leave(k, state, outs):
        """Rows stopped for every task leave after `k` blocks: (state, outputs, running)."""
        running = ~state[f"done_{tasks[0]}"]
        for task in tasks[1:]:
            running = running | ~state[f"done_{task}"]
        if one_row:
            return state, _Rows.outputs(state, tasks, tf.fill([1], k)), running

        def shrink():
            gone = tf.where(~running)
            rows = tf.gather_nd(state["rows"], gone)[:, None]
            served = _Rows.outputs(state, tasks, tf.fill(tf.shape(state["rows"]), k))
            new = {key: tf.tensor_scatter_nd_update(v, rows, tf.gather_nd(served[key], gone))
                   for key, v in outs.items()}
            keep = tf.reshape(tf.where(running), [-1])
            return {key: tf.gather(v, keep) for key, v in state.items()}, new

        state, outs = tf.cond(tf.reduce_all(running), lambda: (dict(state), dict(outs)),
                              shrink)
        return state, outs, running

    def finish(outs):
        return _Rows.served(outs, tasks)

    def from_block(k, state, outs):
        x, mask = backbone.block(k, state["x"], state.get("mask"), training=False)
        state = {**state, "x": x, **({"mask": mask} if mask is not None else {})}
        probs = model.exits_at(k, x, mask, state.get("wide"),
                               {t: state.get(f"p_{t}") for t in tasks})
        for task in tasks:
            p = probs[task]
            fire, state = deciders[task].decide(p, k, state["buckets"], state)
            state = _Rows.stop(state, task, p, fire, k)
        if k == n_blocks - 1:
            return finish(leave(n_blocks, state, outs)[1])
        return go_on(k + 1, state, outs)

    def go_on(k, state, outs):
        """Block `k` on the rows of `state` that still run, or the outputs if none does."""
        state, outs, running = leave(k, state, outs)
        skip = tf.cond if large else _skip_unless
        return skip(tf.reduce_any(running), lambda: start(k, state, outs), lambda: finish(outs))

    def start(k, state, outs):
        if k == 0:  # the stem runs on the rows that go on past the wide exit
            state = dict(state)
            x, mask = backbone.stem(state.pop("ids"), training=False)
            state = {**state, "x": x, **({"mask": mask} if mask is not None else {})}
        return from_block(k, state, outs)

    state = {"rows": tf.range(batch), "buckets": buckets, "ids": ids,
             # the exits read the wide branch's embedding, or under late fusion its
             # classifiers' probabilities (computed once, here)
             **({"wide": wide} if wide is not None and not wide_probs else {}),
             **{f"p_{t}": p for t, p in wide_probs.items()},
             **_Rows.initial({t: len(c) for t, c in model.tasks.items()}, deciders, batch,
                             n_blocks)}
    outs = _Rows.outputs(state, tasks, tf.fill([batch], tf.constant(n_blocks, tf.int32)))
    if not policy.wide_exit:
        return start(0, state, outs)
    for task in tasks:
        p = wide_probs[task]
        state = _Rows.stop(state, task, p, deciders[task].decide_wide(p), -1)
    return go_on(0, state, outs)


def _full_depth_outputs(stacked, buckets, policy: ExitPolicy, num_exits: int):
    """The same decisions from every exit's probabilities (`task -> [batch, exits, classes]`,
    and `wide_exit_name(task) -> [batch, classes]` for a policy with the wide exit):
    (probabilities, exits, blocks run), task -> tensor for the first two."""
    batch = tf.shape(buckets)[0]
    tasks = list(policy.thresholds)
    deciders = {t: _Decider(policy, t, num_exits) for t in tasks}
    state = _Rows.initial({t: stacked[t].shape[-1] for t in tasks}, deciders, batch, num_exits)
    for task in tasks:
        if policy.wide_exit:
            p = stacked[wide_exit_name(task)]
            state = _Rows.stop(state, task, p, deciders[task].decide_wide(p), -1)
        for k in range(num_exits):
            p = stacked[task][:, k]
            fire, state = deciders[task].decide(p, k, buckets, state)
            state = _Rows.stop(state, task, p, fire, k)
    return _Rows.served(_Rows.outputs(state, tasks, tf.fill([batch], tf.constant(
        num_exits, tf.int32))), tasks)


def build_serving_functions(model: ResICClassifier, config: ResICConfig,
                            policy: ExitPolicy | LengthGate, early_exit: bool = False):
    """Return (policy_fn, all_exits_fn): plain TF functions of a `[None]` string tensor, running
    the model's own preprocessor.

    `policy`: an `ExitPolicy` (or a `LengthGate`, the length policy). With `early_exit`,
    `policy_fn` runs each row only as deep as its policy needs (same outputs, less compute);
    otherwise it computes every exit and applies the policy to them. `all_exits_fn` always runs
    all.
    """
    if isinstance(policy, LengthGate):
        policy.check(config)
        policy = ExitPolicy.from_gate(policy)
    policy.check(config)
    encoder = model.preprocessor
    n_buckets = num_buckets(config.max_len, policy.bucket_width)
    classes = {t: tf.constant(list(c), tf.string) for t, c in config.tasks.items()}

    late = model.late_fusion

    def stacked_exits(text):
        """Task -> `[batch, exits, classes]` and, under late fusion, `wide_exit_name(task)` ->
        `[batch, classes]` (exit 0, the wide classifier)."""
        def run():
            ids = encoder(text)
            outputs = model(ids, training=False)
            stacked = {t: tf.stack([outputs[n] for n in config.exit_names(t)], axis=1)
                       for t in config.tasks}
            if late:
                wide = model.backbone.wide(ids, model.backbone.padding_mask(ids))
                stacked.update({wide_exit_name(t): p
                                for t, p in model.wide_probabilities(wide).items()})
            return stacked

        def empty():
            stacked = {t: tf.zeros([0, config.num_exits, len(c)], tf.float32)
                       for t, c in config.tasks.items()}
            if late:
                stacked.update({wide_exit_name(t): tf.zeros([0, len(c)], tf.float32)
                                for t, c in config.tasks.items()})
            return stacked

        return _on_rows(text, run, empty)

    def all_exits_fn(text):
        return {f"{t}_probabilities": p for t, p in stacked_exits(text).items()}

    def policy_outputs(text, buckets):
        if not early_exit:
            return _full_depth_outputs(stacked_exits(text), buckets, policy, config.num_exits)

        def run():
            return _early_exit_outputs(model, encoder(text), buckets, policy)

        def run_large():
            return _early_exit_outputs(model, encoder(text), buckets, policy, large=True)

        def run_one():
            return _early_exit_outputs(model, encoder(text), buckets, policy, one_row=True)

        def empty():
            return ({t: tf.zeros([0, len(c)], tf.float32) for t, c in config.tasks.items()},
                    {t: tf.zeros([0], tf.int32) for t in config.tasks}, tf.zeros([0], tf.int32))

        return _on_rows(text, run, empty, one=run_one, large=run_large)

    def policy_fn(text):
        lengths = char_lengths(text)
        buckets = tf.minimum(lengths // policy.bucket_width, n_buckets - 1)
        probs, exits, blocks = policy_outputs(text, buckets)
        result = {"length": lengths, "blocks_run": blocks}
        for task in config.tasks:
            class_id = tf.argmax(probs[task], axis=-1, output_type=tf.int64)
            result[f"{task}_label"] = tf.gather(classes[task], class_id)
            result[f"{task}_class_id"] = class_id
            result[f"{task}_probabilities"] = probs[task]
            result[f"{task}_exit"] = exits[task] + 1
        return result

    return policy_fn, all_exits_fn


class MissingDependencyError(UserError, ImportError):
    """An optional package that the export needs is not installed: the user's to fix (one line
    from the CLI), not a bug."""


def _serving_protos():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise MissingDependencyError(
            "Writing TF Serving warm-up requests needs the PredictRequest protos: pip install "
            "--no-deps 'tensorflow-serving-api==2.21.*' (--no-deps: it would pull the full "
            "`tensorflow` beside tensorflow-cpu)") from None
    return model_pb2, predict_pb2, prediction_log_pb2


def warmup_texts_from(texts: Sequence[str], max_len: int, n: int = 12) -> list[str]:
    """Warm-up texts spanning the lengths a model will be asked about: `n` real texts at evenly
    spaced length quantiles (shortest to longest), one of `max_len` characters or more (the
    longest text repeated, when none is that long) and the empty text."""
    texts = [str(t) for t in texts]
    if not texts:
        return [""]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    picks = sorted({order[round(q * (len(order) - 1) / max(n - 1, 1))] for q in range(n)})
    chosen = [texts[i] for i in sorted(picks, key=lambda i: len(texts[i]))]
    longest = chosen[-1]
    if len(longest) < max_len:
        chosen.append((longest + " ") * (max_len // max(len(longest) + 1, 1) + 1))
    return [""] + chosen


def _warmup_records(path: Path, model_name: str, texts: Sequence[str], batch: int = 4) -> int:
    """Write PredictionLog records (TF Serving replays them at load to warm the graph): each
    text alone (batch 1), then batches of `batch` neighbours in length."""
    model_pb2, predict_pb2, prediction_log_pb2 = _serving_protos()

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        groups = [texts[i:i + 1] for i in range(len(texts))] + \
            [texts[i:i + batch] for i in range(0, len(texts), batch)]
        for group in groups:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs["text"].CopyFrom(tf.make_tensor_proto(
                [t.encode("utf-8") for t in group], dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            n += 1
    return n


def _freeze(fn, spec):
    """(frozen concrete function of `fn`, its outputs' structure of frozen tensors)."""
    # The serving functions use tf.cond for every branch on a tensor, so AutoGraph has nothing
    # to convert; without it a policy graph traces about a quarter faster.
    concrete = tf.function(fn, autograph=False).get_concrete_function(*spec)
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False)
    if frozen.captured_inputs:  # a resource other than a variable (a lookup table)
        raise ValueError(f"The serving graph captures {len(frozen.captured_inputs)} resources "
                         f"that cannot be frozen; export with --no-freeze (freeze=False)")
    return frozen, tf.nest.pack_sequence_as(concrete.structured_outputs, frozen.outputs)


def _constant_key(node) -> str:
    return hashlib.sha256(node.attr["value"].tensor.SerializeToString(
        deterministic=True)).hexdigest()


def _write_frozen(path: Path, endpoints: Mapping[str, object], spec) -> None:
    """Write a SavedModel whose signatures are `endpoints` (name -> TF function of `spec`) with
    every variable they read frozen into the graph as a constant (TF 1 layout, which TF
    Serving, `saved_model_cli` and `tf.saved_model.load` all read).

    Each endpoint is its own subgraph (one traced function's outputs depend on every stateful
    op in it, so a combined trace would run both), and a weight they share is stored once: a
    later endpoint's copy of an earlier one's constant becomes a placeholder mapped onto it."""
    frozen = {name: _freeze(fn, spec) for name, fn in endpoints.items()}  # eagerly
    graph, signatures, stored = tf.Graph(), {}, {}
    # The TF 1 writer is what TF Serving reads; its deprecation notices are not the user's.
    with graph.as_default(), deprecation.silence():
        for name, (fn, outputs) in frozen.items():
            graph_def, input_map, new = fn.graph.as_graph_def(), {}, {}
            for node in graph_def.node:
                if node.op != "Const" or node.attr["value"].tensor.ByteSize() < 4096:
                    continue
                key = _constant_key(node)
                if key in stored:
                    shape = node.attr["value"].tensor.tensor_shape
                    node.op = "Placeholder"
                    del node.attr["value"]
                    node.attr["shape"].shape.CopyFrom(shape)
                    input_map[f"{node.name}:0"] = stored[key]
                else:
                    new[f"{node.name}:0"] = key
            keys = list(new)
            found = tf.compat.v1.import_graph_def(
                graph_def, name=name, input_map=input_map,
                return_elements=[fn.inputs[0].name] + [t.name for t in fn.outputs] + keys)
            n_out = len(fn.outputs)
            stored.update({new[k]: t for k, t in zip(keys, found[1 + n_out:])})
            signatures[name] = tf.compat.v1.saved_model.predict_signature_def(
                inputs={"text": found[0]},
                outputs=tf.nest.pack_sequence_as(outputs, found[1:1 + n_out]))
        with tf.compat.v1.Session(graph=graph) as session:
            builder = tf.compat.v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(session, ["serve"],
                                                 signature_def_map=signatures,
                                                 strip_default_attrs=True)
            builder.save()


def export_run(run: Run | str | os.PathLike, out: str | os.PathLike | None = None,
               version: int | None = None, warmup_texts: Sequence[str] | None = None,
               early_exit: bool = False, policy: str = "length", freeze: bool = True) -> Path:
    """Export a calibrated run to `out/version` atomically; returns the version directory.

    `run` is a `Run` or its directory. `out` defaults to `savedmodels/<run directory name>`;
    `warmup_texts` to `warmup_texts_from` the run's validation rows (short to `max_len` long);
    `version` to the next integer. An existing version is never overwritten. `policy` names the
    run's calibrated early-exit policy that `serving_default` applies (`length`: the gate;
    others: `resic calibrate --policy`). `early_exit` makes it stop each row where the policy
    stops it instead of running every block (same outputs, less compute). `freeze` writes the
    weights into the graph as constants (faster single-text requests; the module docstring);
    False keeps them as variables.
    """
    _serving_protos()  # fail before the slow part when the warm-up protos are missing
    if not isinstance(run, Run):
        run = Run.load(run)
    exit_policy = run.policy(policy)
    if out is None and run.path is None:
        raise RunDirectoryError("An in-memory run needs `out`, the model base path")
    base = Path(out) if out else Path("savedmodels") / run.path.resolve().name
    if version is None:
        version = next_version(base)
    version = check_scalar(version, "version", int, min_val=1)
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; TF Serving versions are immutable: "
                              f"choose another --version (next free: {next_version(base)})")
    model_name = re.sub(r"[^A-Za-z0-9_.-]", "_", base.resolve().name)

    model, config = run.model, run.config
    model.preprocessor(tf.constant([""]))  # builds the preprocessor before tracing
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                       for v in model.weights)
    if freeze and weight_bytes > FROZEN_LIMIT:
        raise InvalidValueError(f"{weight_bytes / 1e9:.2f} GB of weights do not fit in a frozen "
                                f"graph (protocol buffers stop at 2 GB); export with --no-freeze")
    gated_fn, all_exits_fn = build_serving_functions(model, config, exit_policy, early_exit)
    spec = [tf.TensorSpec([None], tf.string, name="text")]
    if warmup_texts is None:
        warmup_texts = warmup_texts_from(
            run.validation.texts if run.validation is not None else [], config.max_len)

    with atomic_directory(target) as tmp:
        if freeze:
            _write_frozen(tmp, {"serving_default": gated_fn, "all_exits": all_exits_fn}, spec)
        else:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serving_default", gated_fn, spec)
            archive.add_endpoint("all_exits", all_exits_fn, spec)
            archive.write_out(str(tmp), verbose=False)
        _warmup_records(tmp / "assets.extra" / WARMUP_FILE, model_name, warmup_texts)
        config.save(tmp / CONFIG_FILE)
        if run.gate is not None:
            run.gate.save(tmp / GATE_FILE)
        exit_policy.save(tmp / POLICY_FILE)
        run.vocabulary.save(tmp / VOCAB_FILE)
        (tmp / "export.json").write_text(json.dumps({
            "model_name": model_name, "version": version,
            "run_dir": None if run.path is None else str(run.path.resolve()),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "signatures": list(SIGNATURES), "early_exit": bool(early_exit),
            "frozen": bool(freeze),
            "policy": exit_policy.to_dict(),
            "tasks": list(config.tasks),
            "exits": {t: config.exit_names(t) for t in config.tasks},
        }, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return target


def predict_saved_model(export_dir: str | os.PathLike, texts: Sequence[str],
                        batch_size: int = 512) -> list[dict]:
    """Gated predictions from the SavedModel's `serving_default` (not the Keras model).

    Texts are sent shortest first in batches of `batch_size`, so a length-adaptive model pads
    each batch only to its own longest text; the records come back in input order. Returns one
    dict per text: `length` and, per task, label, class_id, exit (1-based), exit_name and
    probabilities keyed by class label.
    """
    return list(iter_saved_model_predictions(export_dir, texts, batch_size))


def iter_saved_model_predictions(export_dir: str | os.PathLike, texts: Iterable[str],
                                 batch_size: int = 512, chunk_rows: int = 65536,
                                 ) -> Iterator[dict]:
    """`predict_saved_model`'s records, one at a time in input order, reading `texts` (any
    iterable, e.g. a file's lines) a chunk of `chunk_rows` at a time: memory stays bounded by
    the chunk whatever the number of texts."""
    export_dir = Path(export_dir)
    if not (export_dir / "saved_model.pb").exists():
        raise FileNotFoundError(f"{export_dir} has no saved_model.pb; give a version directory "
                                f"such as savedmodels/<name>/1")
    config = ResICConfig.load(export_dir / CONFIG_FILE)
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    it = iter(texts)
    while True:
        chunk_texts = list(itertools.islice(it, chunk_rows))
        if not chunk_texts:
            return
        yield from _records(serve, config, chunk_texts, batch_size)


def _records(serve, config: ResICConfig, texts: list[str], batch_size: int) -> list[dict]:
    order = length_order(texts)
    records: list[dict | None] = [None] * len(texts)
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        chunk = [texts[r] for r in rows]
        out = {k: v.numpy() for k, v in serve(text=tf.constant(chunk, tf.string)).items()}
        for r, (row, text) in enumerate(zip(rows, chunk)):
            rec = {"text": text, "length": int(out["length"][r])}
            for task, classes in config.tasks.items():
                exit_no = int(out[f"{task}_exit"][r])
                rec[task] = {
                    "label": out[f"{task}_label"][r].decode("utf-8"),
                    "class_id": int(out[f"{task}_class_id"][r]),
                    "exit": exit_no,
                    "exit_name": config.exit_names(task)[exit_no - 1],
                    "probabilities": {c: round(float(p), 6) for c, p in
                                      zip(classes, out[f"{task}_probabilities"][r])},
                }
            records[row] = rec
    return records
