"""Every early-exit policy (confidence, entropy, patience, hybrid) exported and served on the
paths TF Serving uses: a fresh process without resic_tf, the graph/session loader and
`saved_model_cli`, each agreeing row by row with the policy applied to `all_exits`.

On the linear run (conftest `linear_run`: four blocks deep, and a linear branch whose
probabilities the wide exit mixes with the wide classifier's; bias by a log-linear mix, hate by
the mean): the four exports and their
loads scale with the graph's depth, and four blocks are enough for rows to stop at several
depths under every policy."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_export import TEXTS, _clean_env, assert_same_outputs


BIAS_POWERS = (0.5, 0.25, 1.5)  # deep, wide, linear: bias is served by a log-linear mix


@pytest.fixture(scope="module")
def small_run(linear_run, tmp_path_factory):
    """A copy of the linear run whose bias exits serve the log-linear mix of `BIAS_POWERS`
    (hate keeps its arithmetic thirds), saved, reloaded and calibrated: every export below
    serves both kinds of mix."""
    from resic_tf.cli import main
    from resic_tf.fusion import set_mix
    from resic_tf.run import Run
    out = tmp_path_factory.mktemp("small") / "run"
    shutil.copytree(linear_run, out)
    run = Run.load(out)
    for task in run.model.tasks:
        set_mix(run.model, task, task == "bias", BIAS_POWERS)
    run.save(out)
    assert main(["calibrate", str(out), "--min-support", "2"]) == 0
    return out


POLICY_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
paths = json.loads(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    texts = json.load(f)
out = {}
for name, path in paths.items():
    sigs = tf.saved_model.load(path).signatures
    res = {sig: {k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
                 for k, v in sigs[sig](text=tf.constant(texts)).items()}
           for sig in ("serving_default", "all_exits")}
    res["sizes"] = {n: {k: list(v.shape) for k, v in sigs["serving_default"](
        text=tf.constant(texts[:n], tf.string, shape=[n])).items()} for n in (0, 1, 5)}
    # the graph's copies for small batches and single texts (at most 32 rows, export._on_rows)
    res["small"] = [{k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
                     for k, v in sigs["serving_default"](text=tf.constant(part)).items()}
                    for part in [texts[i:i + 20] for i in range(0, 60, 20)] + [[t] for t in texts[:40]]]
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)
        sig = meta.signature_def["serving_default"]
        got = sess.run({k: v.name for k, v in sig.outputs.items()},
                       feed_dict={sig.inputs["text"].name: np.array(texts, dtype=object)})
        res["session"] = {k: (v.astype(str).tolist() if v.dtype.kind in "OSU" else v.tolist())
                          for k, v in got.items()}
    out[name] = res
assert not [m for m in sys.modules if m.startswith("resic_tf")], "resic_tf was imported"
print("RESULT" + json.dumps(out))
"""


def _midpoint(values, q: float = 0.5) -> float:
    """A threshold halfway across the widest gap between neighbouring distinct values near the
    `q` quantile (within a tenth of them): no row sits on or near it, so float rounding (float32
    in the graph, float64 in numpy) cannot flip a decision."""
    v = np.unique(np.asarray(values, np.float64))
    i = min(max(1, int(len(v) * q)), len(v) - 1)
    near = np.arange(max(1, i - len(v) // 10), min(len(v) - 1, i + len(v) // 10) + 1)
    i = near[np.argmax(v[near] - v[near - 1])]
    return float((v[i - 1] + v[i]) / 2)


@pytest.fixture(scope="module")
def policy_exports(small_run, tmp_path_factory):
    """Every policy exported with early exit, its thresholds set so that rows stop at many
    different exits (a tiny model's calibrated thresholds would mostly pick the LC). The tiny
    run is a late-fusion model: confidence, entropy and hybrid may also stop at its wide
    classifier (exit 0, before the stem); patience may not (both paths are served)."""
    from resic_tf.export import export_run
    from resic_tf.policies import ExitPolicy, normalised_entropy
    from resic_tf.run import Run, predict_exits
    from resic_tf.vocabulary import text_lengths

    root = tmp_path_factory.mktemp("policies")
    shutil.copytree(small_run, root / "run")
    run = Run.load(root / "run")
    assert run.config.late_fusion and run.config.linear_ngrams
    probs = predict_exits(run.model, TEXTS)
    tasks = run.config.tasks
    buckets = np.minimum(text_lengths(TEXTS) // 10, 13)
    exits = {t: run.config.exit_names(t) for t in tasks}
    thresholds = {
        "confidence": {t: [_midpoint(probs[t][:, :-1].max(-1))] for t in tasks},
        "entropy": {t: [_midpoint(normalised_entropy(probs[t][:, :-1]))] for t in tasks},
        "patience": {"bias": [1.0], "hate": [1.0]},  # may stop after block 2, 3 or 4
        "hybrid": {t: [_midpoint(probs[t][buckets == b, :-1].max(-1)) if (buckets == b).any()
                       else 0.5 for b in range(14)] for t in tasks},
    }
    wide = {t: probs[f"{t}_wide"] for t in tasks}
    wide_thresholds = {  # about a third of the rows stop at the wide classifier
        "confidence": {t: _midpoint(p.max(-1), 0.7) for t, p in wide.items()},
        "entropy": {t: _midpoint(normalised_entropy(p), 0.3) for t, p in wide.items()},
        "patience": {},
        "hybrid": {t: _midpoint(p.max(-1), 0.7) for t, p in wide.items()},
    }
    paths = {}
    for v, (name, values) in enumerate(thresholds.items(), start=1):
        run.policies[name] = ExitPolicy(name, exits, values,
                                        wide_thresholds=wide_thresholds[name])
        paths[name] = export_run(run, root / "sm", version=v, early_exit=True, policy=name)
    return run, paths


@pytest.fixture(scope="module")
def policies_served(policy_exports, tmp_path_factory):
    _, paths = policy_exports
    texts_file = tmp_path_factory.mktemp("texts") / "texts.json"
    texts_file.write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", POLICY_PROCESS,
                           json.dumps({k: str(v) for k, v in paths.items()}), str(texts_file)],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_every_policy_serves_what_it_decides_on_all_exits_row_by_row(policy_exports,
                                                                     policies_served):
    """A fresh process (no resic_tf) and the session loader: `serving_default` of each early-exit
    export equals the policy applied in numpy to the same export's `all_exits` (its wide
    classifier's probabilities included), row by row; rows stop at the wide exit too."""
    from resic_tf.policies import apply_policy
    from resic_tf.run import predict_exits
    from resic_tf.vocabulary import text_lengths

    run, _ = policy_exports
    bias = run.model.fusion_layers("bias")[-1]
    assert float(bias.geometric.numpy()) == 1.0 and float(bias.deep_power.numpy()) == 0.5
    lengths = text_lengths(TEXTS)
    for name, served in policies_served.items():
        gated, stacked = served["serving_default"], served["all_exits"]
        probs = {key[:-len("_probabilities")]: np.array(v) for key, v in stacked.items()}
        assert set(probs) == {*run.config.tasks, "bias_wide", "hate_wide"}
        chosen, exits, blocks = apply_policy(run.policy(name), probs, lengths)
        assert gated["blocks_run"] == blocks.tolist(), name
        # patience cannot stop at the wide exit, nor (patience 1) before block 2: two depths
        # at least; the others three
        depths = 2 if name == "patience" else 3
        assert len(set(blocks.tolist())) >= depths, (name, sorted(set(blocks.tolist())))
        stopped_wide = sum(int((exits[t] == -1).sum()) for t in run.config.tasks)
        assert (stopped_wide > 0) == run.policy(name).wide_exit, (name, stopped_wide)
        for task in run.config.tasks:
            assert gated[f"{task}_exit"] == (exits[task] + 1).tolist(), (name, task)
            assert gated[f"{task}_class_id"] == chosen[task].argmax(-1).tolist(), (name, task)
            np.testing.assert_allclose(gated[f"{task}_probabilities"], chosen[task],
                                       rtol=1e-4, atol=1e-5)
        keras_probs = predict_exits(run.model, TEXTS)  # the saved and reloaded mixes
        for key, value in probs.items():
            np.testing.assert_allclose(value, keras_probs[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} {key}")
        session = served["session"]
        assert_same_outputs(session, gated, rtol=1e-5, atol=1e-6, where=name)
        small = {key: [v for part in served["small"] for v in part[key]] for key in gated}
        assert_same_outputs(small, {k: v[0:60] + v[0:40] for k, v in gated.items()}, where=name)
        for n in (0, 1, 5):
            assert served["sizes"][str(n)]["blocks_run"] == [n]
            assert served["sizes"][str(n)]["hate_probabilities"] == [n, len(run.config.tasks["hate"])]


# `saved_model_cli run` on every policy's export in one process (one TensorFlow import, not
# one per export): the console script's own `main`, given each command line in turn.
SAVED_MODEL_CLI_PROCESS = r"""
import contextlib, io, json, sys
from tensorflow.python.tools.saved_model_cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    sys.argv = ["saved_model_cli", *argv]
    stdout, code = io.StringIO(), 0
    with contextlib.redirect_stdout(stdout):
        try:
            main()
        except SystemExit as e:  # absl's app.run exits when the command is done
            code = e.code
    out[name] = {"code": code, "stdout": stdout.getvalue()}
print("RESULT" + json.dumps(out))
"""


def test_saved_model_cli_runs_every_policy(policy_exports):
    commands = {name: ["run", "--dir", str(path), "--tag_set", "serve", "--signature_def",
                       "serving_default", "--input_exprs", 'text=["정말 재밌어요", "", "hello 😀"]']
                for name, path in policy_exports[1].items()}
    proc = subprocess.run([sys.executable, "-c", SAVED_MODEL_CLI_PROCESS, json.dumps(commands)],
                          capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    results = json.loads(line[len("RESULT"):])
    assert set(results) == set(policy_exports[1]) == {"confidence", "entropy", "patience",
                                                       "hybrid"}
    for name, path in policy_exports[1].items():
        res = results[name]
        assert res["code"] in (0, None), (name, res["code"], proc.stderr[-2000:])
        assert "Result for output key blocks_run:" in res["stdout"], name
        assert "Result for output key length:\n[7 0 7]" in res["stdout"], name
        export = json.loads((path / "export.json").read_text())
        assert export["policy"]["name"] == name and export["early_exit"] is True


def test_early_exit_graph_skips_later_blocks_with_unlowered_conds(policy_exports):
    """Each 'go on to block k' branch is an `If` op kept functional (not lowered to
    Switch/Merge), so a row that has stopped costs nothing for the blocks it skips: one per
    block after the wide exit's decision (block 0 included), one fewer without the wide exit,
    in each of the early-exit graph's copies for small batches and for a single text
    (`export._on_rows`), plus the ones that pick the copy. The export is frozen: every `If` is
    functional (constants would otherwise each pass a Switch), and no variable is left."""
    from tensorflow.core.protobuf import saved_model_pb2

    run, paths = policy_exports
    for name, path in paths.items():
        proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        graph = proto.meta_graphs[0].graph_def
        nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
        flags = [node.attr["_lower_using_switch_merge"].b for node in nodes
                 if node.op in ("If", "StatelessIf")]
        per_copy = run.config.num_blocks - (0 if run.policy(name).wide_exit else 1)
        assert len(flags) >= 3 * per_copy + 3 and not any(flags), (name, flags)
        assert not [n.op for n in nodes if n.op in ("VarHandleOp", "ReadVariableOp",
                                                    "VariableV2")], name
        assert json.loads((path / "export.json").read_text())["frozen"] is True
