"""Length gate: exact choices on hand-made predictions, gate.json round trip, calibrate/evaluate CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate, bucket_of, calibrate, gated_predictions, num_buckets
from conftest import TINY_EXITS

# 2 blocks per stage over 2 stages -> 4 blocks: exits ic1, ic2, ic3, lc.
CFG = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, filters=(4, 4), blocks=(2, 2),
                  max_len=30)


def _probs(pred_ids: np.ndarray, classes: int = 2) -> np.ndarray:
    """One-hot-ish probabilities from class ids `(n, exits)`."""
    return np.eye(classes, dtype=np.float32)[pred_ids] * 0.8 + 0.1


def test_buckets_are_width_wide_and_the_last_is_open_ended():
    assert num_buckets(30, 10) == 4  # [0,9] [10,19] [20,29] [30,inf)
    np.testing.assert_array_equal(bucket_of([0, 9, 10, 29, 30, 31, 5000], 10, 4),
                                  [0, 0, 1, 2, 3, 3, 3])


def test_calibrate_picks_best_exit_per_bucket_with_ties_to_the_shallower():
    y = np.array([0, 1, 0, 1, 0, 1])
    lengths = np.array([3, 4, 5, 15, 16, 17])  # bucket 0: rows 0-2, bucket 1: rows 3-5
    # columns: ic1, ic2, ic3, lc
    pred = np.array([[1, 1, 0, 0],   # bucket 0: ic3 and lc right on all three rows -> ic3 (tie)
                     [0, 0, 1, 1],
                     [1, 1, 0, 0],
                     [1, 1, 1, 0],   # bucket 1 (y = 1, 0, 1): ic1 2/3, ic2 3/3,
                     [1, 0, 1, 1],   # ic3 1/3, lc 0/3 -> ic2
                     [1, 1, 0, 0]])
    gate = calibrate(CFG, {"t": _probs(pred)}, {"t": y}, lengths, bucket_width=10,
                     metric="accuracy", min_support=1)
    # bucket 0: ic3 = lc = 1.0 -> ic3 (index 2). bucket 1: ic2 = 1.0 -> index 1.
    # buckets 2, 3: empty -> fallback to the best exit over all rows:
    # overall accuracy ic1 2/6, ic2 4/6, ic3 3/6... row by row: ic1 right on rows 3,5 -> 2/6;
    # ic2 on rows 3,4,5 -> 3/6; ic3 on rows 0,1,2,3 -> 4/6; lc on rows 0,1,2 -> 3/6 -> ic3.
    assert gate.choice["t"] == [2, 1, 2, 2]
    assert gate.fallback["t"] == 2
    d = gate.to_dict()["tasks"]["t"]
    assert [b["fallback"] for b in d["buckets"]] == [False, False, True, True]
    assert [b["support"] for b in d["buckets"]] == [3, 3, 0, 0]
    assert d["buckets"][1]["scores"] == {"t_ic1": pytest.approx(2 / 3), "t_ic2": 1.0,
                                         "t_ic3": pytest.approx(1 / 3), "t_lc": 0.0}
    assert d["buckets"][3]["max_length"] is None and d["buckets"][3]["min_length"] == 30


def test_min_support_falls_back_to_the_overall_best_exit():
    y = np.array([0, 1, 0, 1])
    lengths = np.array([1, 2, 3, 12])
    pred = np.array([[0, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]])
    gate = calibrate(CFG, {"t": _probs(pred)}, {"t": y}, lengths, 10, "accuracy", min_support=2)
    # overall: ic1 3/4, others 0/4 except lc 1/4 -> fallback ic1 (0); bucket 1 has 1 row < 2.
    assert gate.fallback["t"] == 0
    assert gate.choice["t"] == [0, 0, 0, 0]
    assert gate.to_dict()["tasks"]["t"]["buckets"][1]["fallback"] is True
    # with min_support 1 the single row of bucket 1 picks the LC, the only exit right on it
    assert calibrate(CFG, {"t": _probs(pred)}, {"t": y}, lengths, 10, "accuracy",
                     min_support=1).choice["t"][1] == 3
    # The default asks for 20 rows per bucket: all four buckets here fall back.
    default = calibrate(CFG, {"t": _probs(pred)}, {"t": y}, lengths, 10, "accuracy")
    assert default.min_support == 20 and default.choice["t"] == [0, 0, 0, 0]


def test_macro_f1_metric_uses_present_classes_per_bucket():
    y = np.array([0, 0, 1, 1])
    lengths = np.array([1, 1, 1, 1])
    # ic1 predicts all 0: F1(0)=2*2/(4+2)=2/3, F1(1)=0 -> 1/3 (accuracy 0.5)
    # ic2 right on 3 of 4 (pred 0,1,1,1): F1(0)=2/3, F1(1)=2*2/(4+1)=0.8 -> 0.7333 (acc 0.75)
    # ic3 and lc predict all 0 like ic1 (1/3 each).
    pred = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    gate = calibrate(CFG, {"t": _probs(pred)}, {"t": y}, lengths, 10, "macro_f1")
    scores = gate.to_dict()["tasks"]["t"]["buckets"][0]["scores"]
    assert scores["t_ic1"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["t_ic2"] == pytest.approx((2 / 3 + 0.8) / 2, abs=1e-6)
    assert scores["t_lc"] == pytest.approx(1 / 3, abs=1e-6)
    assert gate.choice["t"][0] == 1


def test_gate_json_round_trip_and_application(tmp_path):
    y = np.array([0, 1, 0, 1, 0, 1])
    lengths = np.array([3, 4, 5, 15, 16, 40])
    pred = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0],
                     [1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]])
    probs = _probs(pred)
    gate = calibrate(CFG, {"t": probs}, {"t": y}, lengths, 10, "accuracy")
    gate.save(tmp_path / "gate.json")
    loaded = LengthGate.load(tmp_path / "gate.json")
    assert loaded == gate
    assert loaded.to_dict() == gate.to_dict()
    gp, idx = gated_predictions(loaded, "t", probs, lengths)
    np.testing.assert_array_equal(idx, np.asarray(gate.choice["t"])[[0, 0, 0, 1, 1, 3]])
    np.testing.assert_allclose(gp, probs[np.arange(6), idx])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metric": "f2"}, ValueError, "metric"), ({"bucket_width": 0}, ValueError, "bucket_width"),
    ({"min_support": 0}, ValueError, "min_support"),
    ({"bucket_width": 2.5}, TypeError, "bucket_width"),
    ({"min_support": True}, TypeError, "min_support")])
def test_calibrate_rejects_bad_arguments(kwargs, error, message):
    y = np.array([0, 1])
    with pytest.raises(error, match=message):
        calibrate(CFG, {"t": _probs(np.zeros((2, 4), int))}, {"t": y}, [1, 2], **kwargs)


@pytest.fixture(scope="module")
def calibrated_run(tiny_run, tmp_path_factory):
    from resic_tf.cli import main
    run = tmp_path_factory.mktemp("gate") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", str(run), "--bucket-width", "10", "--min-support", "3"]) == 0
    return run


def test_calibrate_cli_uses_the_runs_validation_rows(calibrated_run):
    from resic_tf.data import encode_labels, load_labelled_texts
    from resic_tf.run import Run, predict_exits
    from resic_tf.vocabulary import text_lengths

    d = json.loads((calibrated_run / "gate.json").read_text(encoding="utf-8"))
    assert d["calibration_data"].endswith("validation.parquet")
    assert d["min_support"] == 3 and d["bucket_width"] == 10 and d["num_buckets"] == 14
    run = Run.load(calibrated_run)
    assert run.gate == LengthGate.load(calibrated_run / "gate.json")
    rows = load_labelled_texts(calibrated_run / "validation.parquet", "comments", ["bias", "hate"])
    assert run.validation.texts == rows.texts and run.validation.labels == rows.labels
    expected = calibrate(run.config, predict_exits(run.model, rows.texts),
                         encode_labels(rows, run.config.tasks), text_lengths(rows.texts), 10,
                         "macro_f1", 3)
    assert LengthGate.load(calibrated_run / "gate.json").choice == expected.choice
    supports = [b["support"] for b in d["tasks"]["hate"]["buckets"]]
    assert sum(supports) == len(rows)


def test_evaluate_cli_writes_the_papers_table(calibrated_run, demo_dir, tmp_path, capsys):
    from conftest import write_rows
    from resic_tf.cli import main

    data = write_rows(tmp_path / "dev60.tsv", 60, source="dev.tsv")
    out = tmp_path / "eval"
    assert main(["evaluate", str(calibrated_run), "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "evaluation.csv")
    expected_rows = TINY_EXITS + ["max", "gate"]
    for task in ("bias", "hate"):
        t = table[table.task == task]
        assert t.exit.tolist() == expected_rows
        best = t[t.exit.str.startswith("ic") | (t.exit == "lc")].macro_f1.max()
        assert t[t.exit == "max"].macro_f1.item() == pytest.approx(best)
        assert f"### {task}" in printed
    md = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "| gate |" in md and "(60 rows)" in md


def test_a_gate_for_another_model_is_refused():
    y = np.array([0, 1])
    gate = calibrate(CFG, {"t": _probs(np.zeros((2, 4), int))}, {"t": y}, [1, 2], min_support=1)
    gate.check(CFG)
    deeper = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, filters=(4, 4), blocks=(2, 3),
                         max_len=30)
    with pytest.raises(ValueError, match=r"exits for 't' \(4\) do not match the model's \(5\)"):
        gate.check(deeper)
    longer = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, filters=(4, 4), blocks=(2, 2),
                         max_len=60)
    with pytest.raises(ValueError, match="has 4 buckets"):
        gate.check(longer)
    other = ResICConfig(tasks={"u": ["a", "b"]}, vocab_size=10, filters=(4, 4), blocks=(2, 2),
                        max_len=30)
    with pytest.raises(ValueError, match=r"gate.json is for tasks \['t'\]"):
        gate.check(other)
