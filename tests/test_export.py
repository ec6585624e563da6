"""The SavedModel serves on the paths TF Serving uses: a fresh process without resic_tf, the
graph/session loader, saved_model_cli; and it agrees row by row with the Keras model + gate."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EDGE_TEXTS = ["정말 재밌어요 ㅋㅋㅋ", "What a great show", "😀😀 👍🏽 최고", "",
              "가" * 5000, "Mixed 한국어 and English 🎉!"]


def _dev_texts(n: int = 120) -> list[str]:
    from conftest import DEMO_DIR
    lines = (DEMO_DIR / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [line.split("\t")[0] for line in lines]


# Edge cases plus real comments of every length bucket (lengths 0..5000).
TEXTS = EDGE_TEXTS + _dev_texts()

FRESH_PROCESS = r'''
import json, sys
import numpy as np
import tensorflow as tf
path = sys.argv[1]
with open(sys.argv[2], encoding="utf-8") as f:
    texts = json.load(f)
loaded = tf.saved_model.load(path)


def plain(res):
    return {k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
            for k, v in res.items()}


out = {sig: plain(loaded.signatures[sig](text=tf.constant(texts, tf.string)))
       for sig in ("serving_default", "all_exits")}
# Other batch sizes: empty (oneDNN mis-shapes convolutions on it), one row, an odd batch.
out["sizes"] = {}
for n in (0, 1, 3):
    batch = tf.constant(texts[:n], tf.string, shape=[n])
    for sig in ("serving_default", "all_exits"):
        res = loaded.signatures[sig](text=batch)
        out["sizes"][f"{sig}/{n}"] = {k: list(v.shape) for k, v in res.items()}
# The graph/session loader: what TF Serving's C++ side mirrors.
with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
    meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)
    sig = meta.signature_def["serving_default"]
    fetch = {k: v.name for k, v in sig.outputs.items()}
    res = sess.run(fetch, feed_dict={sig.inputs["text"].name: np.array(texts, dtype=object)})
    out["session"] = {k: (v.astype(str).tolist() if v.dtype.kind in "OSU" else v.tolist())
                      for k, v in res.items()}
    for n in (0, 1):
        res = sess.run(fetch, feed_dict={sig.inputs["text"].name:
                                         np.array(texts[:n], dtype=object).reshape(n)})
        out["sizes"][f"session/{n}"] = {k: list(v.shape) for k, v in res.items()}
    out["session_input_dtype"] = int(sig.inputs["text"].dtype)
assert not [m for m in sys.modules if m.startswith("resic_tf")], "resic_tf was imported"
print("RESULT" + json.dumps(out))
'''


def assert_same_outputs(got, want, rtol=1e-4, atol=1e-5, where=""):
    """Every output of `want` in `got` (tensors, arrays or lists): probabilities within the
    tolerances, every other output exactly."""
    for key in want:
        g, w = np.asarray(got[key]), np.asarray(want[key])
        if "probabilities" in key:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{where} {key}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{where} {key}")


def _clean_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    return env


def vary_gate(run: Path) -> None:
    """Replace the calibrated gate by one whose exit changes from bucket to bucket, every exit
    used, so that comparisons exercise the bucket arithmetic and the per-row gather."""
    import dataclasses

    from resic_tf.gate import LengthGate
    gate = LengthGate.load(run / "gate.json")
    n_exits = len(gate.exits["bias"])
    choice = {"bias": [b % n_exits for b in range(gate.num_buckets)],
              "hate": [(3 * b + 5) % n_exits for b in range(gate.num_buckets)]}
    dataclasses.replace(gate, choice=choice).save(run / "gate.json")


@pytest.fixture(scope="module")
def gated_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run, calibrated, its gate varied (vary_gate)."""
    from resic_tf.cli import main
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", str(run), "--min-support", "2"]) == 0
    vary_gate(run)
    return run


@pytest.fixture(scope="module")
def exported(gated_run):
    from resic_tf.cli import main
    root = gated_run.parent
    assert main(["export", str(gated_run), "--out", str(root / "savedmodels" / "tiny")]) == 0
    return gated_run, root / "savedmodels" / "tiny" / "1"


def test_export_layout_and_versions(exported, capsys):
    from resic_tf.cli import main
    run, path = exported
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    for name in ("config.json", "gate.json", "vocab.json"):
        assert (path / name).read_bytes() == (run / name).read_bytes()
    meta = json.loads((path / "export.json").read_text(encoding="utf-8"))
    assert meta["version"] == 1 and meta["model_name"] == "tiny"
    assert meta["signatures"] == ["serving_default", "all_exits"]
    assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left over"
    # The same version again is refused; the default is the next integer.
    assert main(["export", str(run), "--out", str(path.parent), "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(path.parent)]) == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["1", "2"]
    shutil.rmtree(path.parent / "2")


def test_export_needs_a_gate(tiny_run, tmp_path, capsys):
    from resic_tf.cli import main
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "gate.json").unlink(missing_ok=True)
    assert main(["export", str(run), "--out", str(tmp_path / "sm")]) == 2
    assert "resic calibrate" in capsys.readouterr().err


def test_failed_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    import resic_tf.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_warmup_records", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(exported[0], tmp_path / "sm", version=7)
    assert not (tmp_path / "sm" / "7").exists()
    assert list((tmp_path / "sm").iterdir()) == []


@pytest.fixture(scope="module")
def served(exported):
    """Both signatures and the session loader, run in a fresh process that never imports resic_tf."""
    _, path = exported
    texts_file = path.parent.parent / "texts.json"
    texts_file.write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(texts_file)],
                          capture_output=True, text=True, env=_clean_env(), cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_fresh_process_serves_both_signatures(served, exported):
    from resic_tf.config import ResICConfig
    config = ResICConfig.load(exported[1] / "config.json")
    gated, all_exits = served["serving_default"], served["all_exits"]
    n = len(TEXTS)
    assert gated["length"] == [len(t) for t in TEXTS]
    for task, classes in config.tasks.items():
        probs = np.array(gated[f"{task}_probabilities"])
        assert probs.shape == (n, len(classes))
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert gated[f"{task}_class_id"] == probs.argmax(-1).tolist()
        assert gated[f"{task}_label"] == [classes[i] for i in gated[f"{task}_class_id"]]
        assert all(1 <= e <= config.num_exits for e in gated[f"{task}_exit"])
        stacked = np.array(all_exits[f"{task}_probabilities"])
        assert stacked.shape == (n, config.num_exits, len(classes))
        rows = np.arange(n)
        np.testing.assert_allclose(stacked[rows, np.array(gated[f"{task}_exit"]) - 1], probs,
                                   rtol=1e-5, atol=1e-6)
    sizes = served["sizes"]
    for n_rows in (0, 1, 3):
        gated_shapes = sizes[f"serving_default/{n_rows}"]
        assert gated_shapes["length"] == [n_rows]
        assert gated_shapes["hate_probabilities"] == [n_rows, len(config.tasks["hate"])]
        assert gated_shapes["bias_label"] == [n_rows]
        assert sizes[f"all_exits/{n_rows}"]["bias_probabilities"] == \
            [n_rows, config.num_exits, len(config.tasks["bias"])]
    assert sizes["session/0"]["hate_exit"] == [0] and sizes["session/1"]["hate_exit"] == [1]


def test_session_loader_matches_the_eager_signature(served):
    assert served["session_input_dtype"] == 7  # DT_STRING
    eager, session = served["serving_default"], served["session"]
    assert set(session) == set(eager)
    assert_same_outputs(session, eager, rtol=1e-5, atol=1e-6)


def test_served_gate_equals_gate_applied_to_keras_predictions(exported, served):
    from resic_tf.gate import LengthGate, gated_predictions
    from resic_tf.run import Run, predict_exits
    from resic_tf.vocabulary import text_lengths

    run_dir, _ = exported
    run = Run.load(run_dir)
    gate = LengthGate.load(run_dir / "gate.json")
    assert run.gate == gate
    probs = predict_exits(run.model, TEXTS)
    lengths = text_lengths(TEXTS)
    assert lengths.tolist() == served["serving_default"]["length"]
    assert len(set((lengths // 10).clip(max=13).tolist())) == 14  # every bucket is exercised
    for task in run.config.tasks:
        # the varied gate sends these rows to every exit
        assert len(set(served["serving_default"][f"{task}_exit"])) == run.config.num_exits
        gp, idx = gated_predictions(gate, task, probs[task], lengths)
        assert served["serving_default"][f"{task}_exit"] == (idx + 1).tolist()
        assert served["serving_default"][f"{task}_class_id"] == gp.argmax(-1).tolist()
        np.testing.assert_allclose(served["serving_default"][f"{task}_probabilities"], gp,
                                   rtol=1e-4, atol=1e-5)


def test_saved_model_cli_show_and_run(exported):
    _, path = exported
    cli = str(Path(sys.executable).parent / "saved_model_cli")
    show = subprocess.run([cli, "show", "--dir", str(path), "--all"], capture_output=True,
                          text=True, env=_clean_env(), timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    for sig in ("serving_default", "all_exits"):
        block = show.stdout.split(f"signature_def['{sig}']:")[1].split("signature_def[")[0]
        assert "inputs['text'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in block
        assert "Method name is: tensorflow/serving/predict" in block
    assert "outputs['hate_exit']" in show.stdout and "outputs['bias_label']" in show.stdout
    run = subprocess.run([cli, "run", "--dir", str(path), "--tag_set", "serve",
                          "--signature_def", "serving_default",
                          "--input_exprs", 'text=["정말 재밌어요", "", "hello 😀"]'],
                         capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Result for output key length:\n[7 0 7]" in run.stdout
    for key in ("bias_label", "bias_exit", "hate_class_id", "hate_probabilities"):
        assert f"Result for output key {key}:" in run.stdout


def test_warmup_requests_parse_and_are_accepted(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    _, path = exported
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    n = 0
    for record in tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests")):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert request.model_spec.name == "tiny"
        assert set(request.inputs) == {"text"}
        texts = tf.make_ndarray(request.inputs["text"])
        assert texts.dtype == object and texts.ndim == 1
        out = serve(text=tf.constant(texts))
        assert out["length"].shape[0] == len(texts)
        n += 1
    assert n >= 2  # 8 validation texts + "" in requests of 4


def test_predict_cli_prints_json_lines(exported, tmp_path, capsys):
    from resic_tf.cli import main
    _, path = exported
    f = tmp_path / "texts.txt"
    f.write_text("정말 재밌어요\r\n😀\na\u2028b\n", encoding="utf-8")
    assert main(["predict", str(path), "hello", "--file", str(f)]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.rstrip("\n").split("\n")]
    # one text per "\n" line: U+2028 inside a text does not split it, "\r\n" is a line end
    assert [l["text"] for l in lines] == ["hello", "정말 재밌어요", "😀", "a\u2028b"]
    assert [l["length"] for l in lines] == [5, 7, 1, 3]
    for l in lines:
        for task in ("bias", "hate"):
            p = l[task]["probabilities"]
            assert l[task]["label"] == max(p, key=p.get)
            assert l[task]["exit_name"].startswith(f"{task}_")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["predict", str(path), "--file", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_saved_model_predictions_stream_in_chunks(exported):
    """Texts are pulled a chunk at a time (a file's lines are never all read first) and the
    records come back in input order, equal to one pass."""
    from resic_tf.export import iter_saved_model_predictions, predict_saved_model
    _, path = exported
    texts = _dev_texts(11)
    pulled = []

    def lines():
        for i, t in enumerate(texts):
            pulled.append(i)
            yield t

    records = iter_saved_model_predictions(path, lines(), batch_size=2, chunk_rows=4)
    first = next(records)
    assert pulled == [0, 1, 2, 3]  # one chunk read, not the whole input
    rest = list(records)
    assert [r["text"] for r in [first, *rest]] == texts
    whole = predict_saved_model(path, texts)
    for a, b in zip([first, *rest], whole):
        for task in ("bias", "hate"):
            assert a[task]["label"] == b[task]["label"] and a[task]["exit"] == b[task]["exit"]


def test_early_exit_export_gives_the_same_gated_outputs(exported, tmp_path, demo_dir):
    """Rows stop at their gated exits (here forced to vary from ic1 to the LC by bucket); the
    outputs must equal the full-depth export's, eagerly and through the session loader."""
    import pandas as pd
    import tensorflow as tf

    from resic_tf.export import export_run
    from resic_tf.gate import LengthGate

    run = tmp_path / "run"
    shutil.copytree(exported[0], run)  # its gate is already varied (vary_gate)
    n_exits = len(LengthGate.load(run / "gate.json").exits["bias"])
    full = exported[1]  # the same run and gate, exported at full depth
    early = export_run(run, tmp_path / "sm", version=1, early_exit=True)
    assert json.loads((early / "export.json").read_text())["early_exit"] is True

    dev = pd.read_csv(demo_dir / "dev.tsv", sep="\t", quoting=3)["comments"].tolist()[:120]
    texts = tf.constant(EDGE_TEXTS + dev + ["", "x"], tf.string)
    a = tf.saved_model.load(str(full)).signatures["serving_default"](text=texts)
    b = tf.saved_model.load(str(early)).signatures["serving_default"](text=texts)
    exits = np.concatenate([a["bias_exit"].numpy(), a["hate_exit"].numpy()])
    assert len(set(exits.tolist())) == n_exits  # every depth is exercised
    assert set(a) == set(b)
    # the full-depth export runs every block; the early one as deep as the deeper task's exit
    assert (a["blocks_run"].numpy() == n_exits).all()
    np.testing.assert_array_equal(
        b["blocks_run"].numpy(), np.maximum(a["bias_exit"].numpy(), a["hate_exit"].numpy()))
    assert_same_outputs(b, {k: v for k, v in a.items() if k != "blocks_run"})
    # a batch of at most SMALL_BATCH rows runs the graph's other copy (`export._on_rows`)
    from resic_tf.export import SMALL_BATCH
    serve = tf.saved_model.load(str(early)).signatures["serving_default"]
    for start in (0, 40, 80):
        assert_same_outputs(serve(text=texts[start:start + SMALL_BATCH]),
                            {k: v[start:start + SMALL_BATCH] for k, v in b.items()}, where=start)
    for i in range(0, len(texts), 7):  # a single text runs a third copy, without gathers
        assert_same_outputs(serve(text=texts[i:i + 1]), {k: v[i:i + 1] for k, v in b.items()},
                            where=i)
    empty = tf.saved_model.load(str(early)).signatures["serving_default"](
        text=tf.constant([], tf.string))
    assert empty["bias_probabilities"].shape == (0, 3)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], str(early))
        sig = meta.signature_def["serving_default"]
        out = sess.run({k: v.name for k, v in sig.outputs.items()},
                       feed_dict={sig.inputs["text"].name: np.array(EDGE_TEXTS, dtype=object)})
    n = len(EDGE_TEXTS)
    np.testing.assert_array_equal(out["hate_exit"], a["hate_exit"].numpy()[:n])
    np.testing.assert_array_equal(out["bias_class_id"], a["bias_class_id"].numpy()[:n])


def test_unfrozen_export_serves_the_same_outputs(exported, tmp_path, demo_dir):
    """`--no-freeze` keeps the weights as variables (Keras's export); both signatures answer
    exactly as the frozen default does, whose graph holds no variable at all."""
    import pandas as pd
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    from resic_tf.cli import main

    run, frozen = exported
    assert main(["export", str(run), "--out", str(tmp_path / "sm"), "--no-freeze"]) == 0
    unfrozen = tmp_path / "sm" / "1"
    assert json.loads((unfrozen / "export.json").read_text())["frozen"] is False
    assert list((unfrozen / "variables").iterdir())
    proto = saved_model_pb2.SavedModel.FromString((frozen / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert not ops & {"VarHandleOp", "ReadVariableOp", "HashTableV2", "LookupTableFindV2"}
    dev = pd.read_csv(demo_dir / "dev.tsv", sep="\t", quoting=3)["comments"].tolist()[:60]
    texts = tf.constant(EDGE_TEXTS + dev, tf.string)
    for sig in ("serving_default", "all_exits"):
        a = tf.saved_model.load(str(frozen)).signatures[sig](text=texts)
        b = tf.saved_model.load(str(unfrozen)).signatures[sig](text=texts)
        assert_same_outputs(a, b)
        one = tf.saved_model.load(str(frozen)).signatures[sig](text=texts[3:4])
        assert_same_outputs(one, {k: v[3:4] for k, v in b.items()})


def test_weights_too_large_to_freeze_fail_with_one_line(exported, tmp_path, monkeypatch,
                                                       capsys):
    """A model whose weights would not fit in a frozen graph's 2 GB is refused before tracing,
    with the way out; `--no-freeze` exports it."""
    import resic_tf.export as export
    from resic_tf.cli import main

    monkeypatch.setattr(export, "FROZEN_LIMIT", 1000)
    assert main(["export", str(exported[0]), "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export with --no-freeze" in err[0] and "GB of weights" in err[0]
    assert not (tmp_path / "sm" / "1").exists()


def test_missing_warmup_protos_fail_fast_with_one_line(exported, tmp_path, monkeypatch, capsys):
    import resic_tf.export as export
    from resic_tf.cli import main
    from resic_tf.validation import UserError

    # the optional package is not importable (None in sys.modules blocks the import)
    for name in ("tensorflow_serving", "tensorflow_serving.apis"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError) as info:
        export._serving_protos()
    assert isinstance(info.value, UserError)  # the user's environment, not a bug
    message = ("Writing TF Serving warm-up requests needs the PredictRequest protos: pip install "
               "--no-deps 'tensorflow-serving-api==2.21.*' (--no-deps: it would pull the full "
               "`tensorflow` beside tensorflow-cpu)")
    assert str(info.value) == message
    assert main(["export", str(exported[0]), "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err
    assert err == f"resic export: error: {message}\n"
    assert not (tmp_path / "sm").exists()
