"""Tests for resic_tf.analysis: hand-computed overthinking / error-by-length / per-bucket F1, and
`analyze_run` end to end on the tiny session run, re-deriving report numbers from its parquet."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_rows
from resic_tf.analysis import (FIGURES, analysis_from_frame, analyze_run, best_exit_per_bucket,
                               bucket_exit_f1, bucket_labels, error_share_by_bucket,
                               overthinking, predictions_frame)
from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate, bucket_of
from resic_tf.metrics import accuracy, macro_f1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


# === Pure functions, hand-computed ===

def test_overthinking_hand_computed():
    # exits ic1, ic2, lc; C = pred == y
    y = [0, 1, 2, 0, 1]
    pred = [[0, 0, 1],   # C = T T F : some IC right, LC wrong  -> overthinking
            [1, 0, 1],   # C = T F T : IC right, LC right too  -> wasteful
            [0, 2, 0],   # C = F T F : overthinking
            [1, 1, 1],   # C = F F F : nobody right
            [0, 0, 1]]   # C = F F T : only the LC right
    o = overthinking(pred, y)
    assert o["n"] == 5
    assert o["overthinking_count"] == 2 and o["overthinking"] == pytest.approx(2 / 5)
    assert o["wasteful_count"] == 1 and o["wasteful"] == pytest.approx(1 / 5)
    assert o["oracle_accuracy"] == pytest.approx(4 / 5)   # rows 0, 1, 2, 4
    assert o["lc_accuracy"] == pytest.approx(2 / 5)       # rows 1, 4
    assert o["correct"] == [2, 2, 2]                       # ic1: 0,1  ic2: 0,2  lc: 1,4
    assert o["lost_at_lc"] == [1, 2, 0]                    # ic1: row 0  ic2: rows 0, 2
    assert o["lost_share"] == pytest.approx([1 / 2, 2 / 2, 0.0])


def test_overthinking_never_right_exit_and_empty():
    # ic1 is never right -> its lost share is undefined (NaN), not 0
    o = overthinking([[1, 0], [0, 1]], [0, 1])
    assert math.isnan(o["lost_share"][0]) and o["lost_share"][1] == 0.0
    assert o["overthinking"] == 0.0 and o["lc_accuracy"] == 1.0
    empty = overthinking(np.zeros((0, 3), int), np.zeros(0, int))
    assert empty["n"] == 0 and math.isnan(empty["overthinking"])


@pytest.mark.parametrize("pred, y, message", [
    ([0, 1], [0, 1], r"2-D \(samples, exits\)"),
    ([[0], [1]], [0, 1], r"at least 2 exit"),
    ([[0, 1], [1, 1]], [0, 1, 1], r"one label per row"),
    ([[0, 1], [1, 1]], [[0, 1], [1, 1]], r"y.shape=\(2, 2\)"),
])
def test_overthinking_rejects_bad_shapes(pred, y, message):
    with pytest.raises(ValueError, match=message):
        overthinking(pred, y)


def test_error_share_by_bucket_hand_computed():
    y = [0, 0, 1, 1, 0, 1]
    buckets = [0, 0, 1, 1, 2, 2]
    pred = np.array([[1, 0, 0, 1, 1, 1],      # wrong on rows 0, 2, 4 -> buckets 0, 1, 2
                     [0, 0, 1, 1, 0, 1],      # never wrong -> NaN row
                     [1, 1, 1, 0, 0, 1]]).T   # wrong on rows 0, 1, 3 -> buckets 0, 0, 1
    share = error_share_by_bucket(pred, y, buckets, n_buckets=4)
    assert share.shape == (3, 4)
    np.testing.assert_allclose(share[0], [1 / 3, 1 / 3, 1 / 3, 0])
    assert np.isnan(share[1]).all()
    np.testing.assert_allclose(share[2], [2 / 3, 1 / 3, 0, 0])
    with pytest.raises(ValueError, match=r"`buckets` must lie in \[0, 2\)"):
        error_share_by_bucket(pred, y, buckets, n_buckets=2)


def test_bucket_exit_f1_hand_computed():
    y = [0, 0, 1, 1, 0, 1]
    buckets = [0, 0, 0, 1, 1, 1]            # bucket 2 stays empty
    pred = np.array([[0, 1, 1, 1, 0, 1],
                     [0, 0, 1, 0, 0, 1]]).T
    f1 = bucket_exit_f1(pred, y, buckets, n_buckets=3, num_classes=3)
    # bucket 0, y = [0, 0, 1]: exit 0 says [0, 1, 1]: F1(0) = 2/(2+0+1), F1(1) = 2/(2+1+0),
    #   class 2 absent from both -> excluded: 2/3. exit 1 says [0, 0, 1]: all right -> 1.
    # bucket 1, y = [1, 0, 1]: exit 0 all right -> 1. exit 1 says [0, 0, 1]: F1(0) = 2/(2+1+0),
    #   F1(1) = 2/(2+0+1) -> 2/3.
    np.testing.assert_allclose(f1[:2], [[2 / 3, 1.0], [1.0, 2 / 3]])
    assert np.isnan(f1[2]).all()
    assert best_exit_per_bucket(f1).tolist() == [1, 0, -1]


def test_best_exit_per_bucket_ties_and_nan():
    assert best_exit_per_bucket([[0.5, 0.5, 0.2], [NAN, 0.2, 0.1]]).tolist() == [0, 1]


def test_bucket_labels():
    assert bucket_labels(10, 3) == ["0-9", "10-19", "20+"]
    assert bucket_labels(20, 2) == ["0-19", "20+"]


def _toy():
    """One task with 2 ICs + LC, 4 inputs, a gate: bucket 0 -> ic1, bucket 1 -> lc."""
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=5, filters=(8,), blocks=(3,))
    gate = LengthGate(10, "macro_f1", 1, {"t": config.exit_names("t")}, {"t": [0, 2]}, {"t": 2})
    p = np.array([[[.9, .1], [.2, .8], [.4, .6]],     # exits predict a, b, b
                  [[.3, .7], [.3, .7], [.6, .4]],     # b, b, a
                  [[.2, .8], [.7, .3], [.1, .9]],     # b, a, b
                  [[.6, .4], [.6, .4], [.8, .2]]], np.float32)   # a, a, a
    return config, gate, p, {"t": np.array([0, 1, 0, 1])}, [3, 15, 9, 40]


def test_predictions_frame_and_analysis_from_frame():
    config, gate, p, labels, lengths = _toy()
    frame = predictions_frame(config, ["w", "x", "y", "z"], lengths, labels, {"t": p}, gate)
    assert list(frame.columns) == [
        "text", "length", "bucket", "t_true", "t_ic1_pred", "t_ic1_conf", "t_ic2_pred",
        "t_ic2_conf", "t_lc_pred", "t_lc_conf", "t_gate_exit", "t_gate_pred"]
    assert frame["bucket"].tolist() == [0, 1, 0, 1]               # lengths 3, 15, 9, 40
    assert frame["t_lc_pred"].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(frame["t_lc_conf"], [.6, .6, .9, .8], rtol=1e-6)
    assert frame["t_gate_exit"].tolist() == ["ic1", "lc", "ic1", "lc"]
    assert frame["t_gate_pred"].tolist() == [0, 0, 1, 0]         # ic1, lc, ic1, lc
    r = analysis_from_frame(config, frame, gate)["tasks"]["t"]
    # y = [0, 1, 0, 1]; ic1 = [0, 1, 1, 0] (2 right), ic2 = [1, 1, 0, 0], lc = [1, 0, 1, 0]
    # lc is never right; rows 0, 1, 2 are right at some IC -> overthinking 3/4
    assert r["overthinking"]["overthinking"] == pytest.approx(3 / 4)
    assert r["lc"]["accuracy"] == 0.0
    assert r["max"]["exit"] == "ic1"                             # ic1 and ic2 tie at 0.5 F1
    assert r["gate"]["accuracy"] == pytest.approx(1 / 4)          # only row 0 right
    assert r["gate_usage"] == {"ic1": 2, "ic2": 0, "lc": 2}
    # lc errs on every row: buckets [0, 1, 0, 1] -> half of its errors in each bucket
    assert r["error_share"][2] == pytest.approx([0.5, 0.5])


# === analyze_run end to end ===

def _copy_run(tiny_run: Path, dest: Path) -> Path:
    """A writable copy of the session run, without any gate or earlier analysis."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("gate.json", "analysis"))
    return dest


@pytest.fixture(scope="module")
def analyzed(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    run = _copy_run(tiny_run, base / "run")
    data = write_rows(base / "dev60.tsv", 60, source="dev.tsv")
    report = analyze_run(run, data, base / "out")
    return run, base / "out", report


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start): text.index(end, text.index(start))]


def test_analyze_run_writes_files(analyzed):
    import tensorflow as tf
    run, out, report = analyzed
    assert report == out / "report.md"
    md = report.read_text(encoding="utf-8")
    for name in FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and f"]({name}.png)" in md
        h, w, c = tf.image.decode_png(png).shape
        assert h > 100 and w > 100 and c in (3, 4)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["analysis.json", "predictions.parquet", "report.md", *(f"{n}.png" for n in FIGURES)])
    for heading in ("## 1. Per-exit", "## 2. Overthinking", "## 3. Error by length",
                    "## 4. Length gate"):
        assert heading in md
    # no gate.json in the run: one was calibrated on the run's validation rows, not on --data
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    assert gate["calibration_data"] == str(run / "validation.parquet")
    assert "calibrated now on the run's own validation rows" in md


def test_predictions_parquet_columns(analyzed):
    run, out, _ = analyzed
    from resic_tf.vocabulary import text_lengths
    df = pd.read_parquet(out / "predictions.parquet")
    config = ResICConfig.load(run / "config.json")
    exits = [f"ic{i}" for i in range(1, 8)] + ["lc"]
    expected = ["text", "length", "bucket"]
    for task in ("bias", "hate"):
        expected += [f"{task}_true"] + [f"{task}_{e}_{k}" for e in exits for k in ("pred", "conf")]
        expected += [f"{task}_gate_exit", f"{task}_gate_pred"]
    assert list(df.columns) == expected and len(df) == 60
    assert df["length"].tolist() == text_lengths(df["text"].tolist()).tolist()
    gate = LengthGate.load(run / "gate.json")
    assert df["bucket"].tolist() == bucket_of(df["length"], 10, gate.num_buckets).tolist()
    for task, classes in config.tasks.items():
        # gate_pred is the prediction of the exit named in gate_exit
        chosen = [df.at[i, f"{task}_{e}_pred"] for i, e in enumerate(df[f"{task}_gate_exit"])]
        assert df[f"{task}_gate_pred"].tolist() == chosen
        conf = df[[f"{task}_{e}_conf" for e in exits]].to_numpy()
        assert (conf >= 1 / len(classes) - 1e-6).all() and (conf <= 1 + 1e-6).all()


def test_report_numbers_recompute_from_parquet(analyzed):
    run, out, report = analyzed
    df = pd.read_parquet(out / "predictions.parquet")
    md = report.read_text(encoding="utf-8")
    result = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    n_classes = {t: len(c) for t, c in
                 json.loads((run / "config.json").read_text(encoding="utf-8"))["tasks"].items()}
    ics = [f"ic{i}" for i in range(1, 8)]

    # (1) LC accuracy and macro-F1 of hate, in section 1's hate table
    y = df["hate_true"].to_numpy()
    lc = df["hate_lc_pred"].to_numpy()
    acc, f1 = accuracy(y, lc), macro_f1(y, lc, n_classes["hate"])
    assert result["tasks"]["hate"]["lc"]["macro_f1"] == pytest.approx(f1)
    assert f"| lc | {acc:.4f} | {f1:.4f} |" in _section(md, "### hate", "## 2.")

    # (2) overthinking of bias: some IC right and the LC wrong
    yb = df["bias_true"].to_numpy()[:, None]
    right_ic = (df[[f"bias_{e}_pred" for e in ics]].to_numpy() == yb).any(axis=1)
    lc_wrong = df["bias_lc_pred"].to_numpy() != yb[:, 0]
    count = int((right_ic & lc_wrong).sum())
    assert result["tasks"]["bias"]["overthinking"]["overthinking"] == pytest.approx(count / 60)
    bias_row = next(line for line in _section(md, "## 2.", "Lost later").splitlines()
                    if line.startswith("| bias |"))
    assert bias_row.split(" | ")[2] == f"{100 * count / 60:.1f}% ({count}/60)"
    # lost-later share of ic1 for bias
    ic1_right = df["bias_ic1_pred"].to_numpy() == yb[:, 0]
    lost = int((ic1_right & lc_wrong).sum())
    assert result["tasks"]["bias"]["overthinking"]["lost_at_lc"][0] == lost
    assert result["tasks"]["bias"]["overthinking"]["correct"][0] == int(ic1_right.sum())

    # (3) error share of bias's LC in the most populated bucket
    b = int(df["bucket"].value_counts().idxmax())
    share = (lc_wrong & (df["bucket"] == b)).sum() / lc_wrong.sum()
    assert result["tasks"]["bias"]["error_share"][-1][b] == pytest.approx(share)
    row = next(line for line in _section(md, "## 3.", "### hate").splitlines()
               if line.startswith("| lc |"))
    assert row.split(" | ")[2 + b] == f"{100 * share:.1f}%"
    # macro-F1 of hate's ic3 in that bucket
    rows = (df["bucket"] == b).to_numpy()
    assert result["tasks"]["hate"]["bucket_f1"][b][2] == pytest.approx(
        macro_f1(y[rows], df["hate_ic3_pred"].to_numpy()[rows], n_classes["hate"]))

    # (4) gated accuracy of hate in the Table 5 style rows
    g = accuracy(y, df["hate_gate_pred"].to_numpy())
    assert result["tasks"]["hate"]["gate"]["accuracy"] == pytest.approx(g)
    gate_row = next(line for line in _section(md, "## 4.", "Inputs routed").splitlines()
                    if line.startswith("| gate |"))
    assert gate_row.split(" | ")[3] == f"{g:.4f}"


def test_tensorboard_images(analyzed):
    import tensorflow as tf
    run, out, _ = analyzed
    log_dir = run / "tensorboard" / "analysis"
    files = list(log_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    images = {}
    for event in tf.compat.v1.train.summary_iterator(str(files[0])):
        for v in event.summary.value:
            images[v.tag] = (tf.make_ndarray(v.tensor), v.metadata.plugin_data.plugin_name)
    assert set(images) == {f"analysis/{n}" for n in FIGURES}
    for name in FIGURES:
        (width, height, png), plugin = images[f"analysis/{name}"]
        assert plugin == "images" and png.startswith(PNG_MAGIC)
        h, w, _ = tf.image.decode_png((out / f"{name}.png").read_bytes()).shape
        assert (int(width), int(height)) == (w, h)


def test_analyze_run_uses_existing_gate(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    config = ResICConfig.load(run / "config.json")
    # a hand-made gate sending every bucket of every task to ic2
    n_b = config.max_len // 10 + 1
    LengthGate(10, "macro_f1", 1, {t: config.exit_names(t) for t in config.tasks},
               {t: [1] * n_b for t in config.tasks}, {t: 1 for t in config.tasks},
               {"_source": "hand-made"}).save(run / "gate.json")
    data = write_rows(tmp_path / "dev20.tsv", 20, start=100, source="dev.tsv")
    # through the CLI this time: `resic analyze` glues to analyze_run
    from resic_tf.cli import main
    assert main(["analyze", str(run), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    df = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    for task in config.tasks:
        assert (df[f"{task}_gate_exit"] == "ic2").all()
        assert df[f"{task}_gate_pred"].tolist() == df[f"{task}_ic2_pred"].tolist()
    assert "calibrated on hand-made" in md and "calibrated now" not in md
    assert "| 130+ | ic2 | ic2 |" in md
