"""metrics.py against confusion matrices and F1 values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from resic_tf.metrics import (METRICS, accuracy, best_index, confusion_matrix, macro_f1,
                              macro_f1_from_cm, per_class_f1, score)
from resic_tf.validation import InvalidValueError


def test_three_classes_all_present():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    # cm[t, p]:         p=0 p=1 p=2
    #   t=0 (3 rows)     2   1   0
    #   t=1 (2 rows)     0   1   1
    #   t=2 (1 row)      0   0   1
    expected_cm = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    cm = confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, expected_cm)
    # F1 = 2TP / (2TP + FP + FN)
    # class 0: TP 2, FP 0, FN 1 -> 4/5
    # class 1: TP 1, FP 1, FN 1 -> 2/4
    # class 2: TP 1, FP 1, FN 0 -> 2/3
    np.testing.assert_allclose(per_class_f1(cm), [4 / 5, 1 / 2, 2 / 3])
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)  # 0.6556
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)  # diagonal 2+1+1 of 6


def test_class_absent_from_labels_and_predictions_is_excluded():
    # 4 classes; class 3 occurs nowhere (paper Eq. 4: mean over present classes only).
    y_true = [0, 1, 1, 2]
    y_pred = [0, 1, 2, 2]
    expected_cm = np.zeros((4, 4), int)
    expected_cm[0, 0] = 1
    expected_cm[1, 1] = 1
    expected_cm[1, 2] = 1
    expected_cm[2, 2] = 1
    cm = confusion_matrix(y_true, y_pred, 4)
    np.testing.assert_array_equal(cm, expected_cm)
    # class 0: TP 1, FP 0, FN 0 -> 1
    # class 1: TP 1, FP 0, FN 1 -> 2/3
    # class 2: TP 1, FP 1, FN 0 -> 2/3
    # class 3: 0/0 -> undefined (NaN), left out of the mean
    f1 = per_class_f1(cm)
    np.testing.assert_allclose(f1[:3], [1, 2 / 3, 2 / 3])
    assert np.isnan(f1[3])
    # (1 + 2/3 + 2/3) / 3 = 7/9; counting class 3 as 0 would give 7/12, as 1 would give 10/12.
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(7 / 9)
    assert macro_f1_from_cm(cm) == pytest.approx(7 / 9)
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 4)


def test_class_only_predicted_scores_zero():
    # Class 2 is predicted once but never true.
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 3),
                                  [[1, 0, 1], [0, 2, 0], [0, 0, 0]])
    # class 0: TP 1, FP 0, FN 1 -> 2/3
    # class 1: TP 2, FP 0, FN 0 -> 1
    # class 2: TP 0, FP 1, FN 0 -> 0 (present in predictions, so it counts)
    np.testing.assert_allclose(per_class_f1(confusion_matrix(y_true, y_pred, 3)), [2 / 3, 1, 0])
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((2 / 3 + 1 + 0) / 3)  # 5/9
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 4)


def test_class_only_in_labels_scores_zero_and_absent_class_is_excluded():
    # Class 2 is true once but never predicted; class 1 occurs nowhere.
    y_true = [0, 2]
    y_pred = [0, 0]
    # class 0: TP 1, FP 1, FN 0 -> 2/3; class 2: TP 0, FP 0, FN 1 -> 0; class 1: excluded.
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert accuracy(y_true, y_pred) == pytest.approx(1 / 2)


def test_docstring_example_and_perfect_and_all_wrong():
    assert macro_f1([0, 0, 1], [0, 1, 1], 3) == pytest.approx(2 / 3)
    assert macro_f1([2, 0, 1, 1], [2, 0, 1, 1], 3) == 1.0
    # Every prediction wrong: each present class has TP 0, so every F1 is 0.
    assert macro_f1([0, 1], [1, 0], 2) == 0.0
    assert accuracy([0, 1], [1, 0]) == 0.0


def test_column_vectors_equal_flat_labels_with_a_warning():
    y_true = np.array([[0], [1], [2], [2]])
    y_pred = np.array([[0], [2], [2], [2]])
    with pytest.warns(UserWarning, match=r"raveled to \(4,\)"):
        assert macro_f1(y_true, y_pred, 3) == macro_f1(y_true.ravel(), y_pred.ravel(), 3)
    # class 0: 1; class 1: TP 0, FN 1 -> 0; class 2: TP 2, FP 1 -> 4/5
    with pytest.warns(UserWarning):
        assert macro_f1(y_true, y_pred, 3) == pytest.approx((1 + 0 + 4 / 5) / 3)
    with pytest.warns(UserWarning):
        assert accuracy(y_true, y_pred) == pytest.approx(3 / 4)


def test_one_hot_labels_are_refused():
    # keras.metrics.F1Score wants one-hot; ours wants ids: flattening one-hot would score nonsense.
    one_hot = np.eye(3)[[0, 1, 2]]
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        macro_f1(one_hot, [0, 1, 2], 3)
    with pytest.raises(ValueError, match="not one-hot"):
        accuracy([0, 1, 2], one_hot)


def test_empty_input_is_nan():
    assert np.isnan(macro_f1([], [], 3))
    assert np.isnan(accuracy([], []))
    np.testing.assert_array_equal(confusion_matrix([], [], 2), [[0, 0], [0, 0]])


def test_score_dispatch():
    y_true, y_pred = [0, 0, 1, 1], [0, 2, 1, 1]
    assert score(y_true, y_pred, 3, "accuracy") == pytest.approx(3 / 4)
    assert score(y_true, y_pred, 3, "macro_f1") == pytest.approx(5 / 9)
    with pytest.raises(InvalidValueError) as info:
        score(y_true, y_pred, 3, "f1")
    # the choices are listed in METRICS order (the CLI's --metric order, default first)
    assert str(info.value) == \
        "`metric` must be one of ['macro_f1', 'accuracy']. Received: metric='f1'"
    assert METRICS == ("macro_f1", "accuracy")


@pytest.mark.parametrize("fn", [
    lambda t, p: macro_f1(t, p, 3),
    lambda t, p: confusion_matrix(t, p, 3),
    accuracy,
])
def test_sample_count_mismatch(fn):
    with pytest.raises(ValueError, match="y_true and y_pred need the same number of samples. "
                                         "Received: 3 and 2"):
        fn([0, 1, 2], [0, 1])


@pytest.mark.parametrize("y_true, y_pred, match", [
    ([0, 1], [0, 3], r"y_pred must hold class ids in \[0, 3\). Received: min=0, max=3"),
    ([-1, 1], [0, 1], r"y_true must hold class ids in \[0, 3\). Received: min=-1, max=1"),
])
def test_class_id_out_of_range(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        macro_f1(y_true, y_pred, 3)


NAN = float("nan")


@pytest.mark.parametrize("scores, best", [
    ([0.2, 0.5, 0.4], 1),
    ([0.5, 0.5, 0.2], 0),            # ties go to the first (shallowest) exit
    ([0.1, 0.7, 0.7, 0.7], 1),
    ([NAN, 0.2, 0.1], 1),            # NaN never wins, even in first place
    ([0.3, NAN, 0.9, NAN], 2),
    ([0.0, NAN], 0),                 # 0.0 beats NaN
    ([NAN, NAN, NAN], 0),            # all NaN: 0
    ([-1.0, -2.0], 0),
    (np.array([0.1, 0.3], np.float32), 1),
])
def test_best_index_is_the_one_nan_safe_best_rule(scores, best):
    assert best_index(scores) == best
    assert type(best_index(scores)) is int
