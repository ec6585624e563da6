"""resic_tf.statistics: hand-computed overthinking, error-by-length and per-bucket F1, and the
one-row-per-input predictions frame every report number is computed from."""
from __future__ import annotations

import math

import numpy as np
import pytest

from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate
from resic_tf.statistics import (analysis_from_frame, best_exit_per_bucket, bucket_exit_f1,
                                 bucket_labels, error_share_by_bucket, frame_pred_matrix,
                                 overthinking, predictions_frame, short_exit_names)
from resic_tf.validation import InvalidValueError

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




def test_short_exit_names_and_frame_pred_matrix():
    config, gate, p, labels, lengths = _toy()
    assert short_exit_names(config) == ["ic1", "ic2", "lc"]
    frame = predictions_frame(config, ["w", "x", "y", "z"], lengths, labels, {"t": p}, gate)
    matrix = frame_pred_matrix(frame, "t", ["ic1", "ic2", "lc"])
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, [[0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(frame_pred_matrix(frame, "t", ["lc"]), [[1], [0], [1], [0]])


def test_shape_and_bucket_errors_are_user_errors():
    with pytest.raises(InvalidValueError) as info:
        overthinking([0, 1], [0, 1])
    assert str(info.value) == ("`pred_matrix` must be 2-D (samples, exits) with at least 2 "
                               "exit(s). Received: pred_matrix.shape=(2,)")
    with pytest.raises(InvalidValueError) as info:
        error_share_by_bucket([[0], [1]], [0, 1], [0, 0, 1], n_buckets=2)
    assert str(info.value) == "`buckets` needs one bucket per sample (2). Received: 3"
    with pytest.raises(InvalidValueError) as info:
        bucket_exit_f1([[0], [1]], [0, 1], [0, -1], n_buckets=2, num_classes=2)
    assert str(info.value) == "`buckets` must lie in [0, 2). Received: min=-1, max=0"
