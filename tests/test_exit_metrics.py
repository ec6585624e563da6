"""SparseMacroF1 and ExitMetrics: the stateful Keras metrics equal resic_tf.metrics exactly."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from resic_tf.exit_metrics import ExitMetrics, SparseMacroF1
from resic_tf.metrics import accuracy, confusion_matrix, macro_f1
from resic_tf.validation import InvalidTypeError, InvalidValueError


def probs_of(pred_ids, num_classes: int) -> np.ndarray:
    """Probabilities whose argmax is `pred_ids` (not one-hot, to exercise the argmax)."""
    p = np.full((len(pred_ids), num_classes), 0.1 / num_classes, np.float32)
    p[np.arange(len(pred_ids)), pred_ids] += 0.9
    return p


def test_hand_computed_example():
    # labels [0, 0, 1], predictions [0, 1, 1], 3 classes:
    # class 0: TP 1, FP 0, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 0 -> 2/3; class 2 absent -> left
    # out, so macro-F1 = 2/3 (counting class 2 as 0 would give 4/9).
    m = SparseMacroF1(3)
    m.update_state(np.array([0, 0, 1]), probs_of([0, 1, 1], 3))
    assert float(m.result()) == pytest.approx(2 / 3, abs=1e-7)
    np.testing.assert_array_equal(m.confusion.numpy(), [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_accumulates_over_batches_and_resets():
    m = SparseMacroF1(3, name="f1")
    m.update_state(np.array([0, 0]), probs_of([0, 1], 3))
    m.update_state(np.array([1]), probs_of([1], 3))  # the two batches make the example above
    assert float(m.result()) == pytest.approx(2 / 3, abs=1e-7)
    m.reset_state()
    np.testing.assert_array_equal(m.confusion.numpy(), np.zeros((3, 3)))
    assert math.isnan(float(m.result()))  # no class present: undefined, as metrics.macro_f1
    m.update_state(np.array([2, 2]), probs_of([2, 2], 3))
    assert float(m.result()) == 1.0  # nothing of the earlier batches is left


@pytest.mark.parametrize("seed, num_classes, absent", [
    (0, 3, []), (1, 5, [1]), (2, 7, [0, 4, 6]), (3, 2, []), (4, 4, [3]),
])
def test_equals_numpy_macro_f1_on_random_data(seed, num_classes, absent):
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c not in absent]
    m = SparseMacroF1(num_classes)
    all_true, all_pred = [], []
    for n in (17, 1, 40, 8):  # uneven batches, one of a single row
        y = rng.choice(present, size=n)
        pred = rng.choice(present, size=n)
        # column labels (n, 1), as Keras passes sparse targets
        m.update_state(y.reshape(-1, 1), probs_of(pred, num_classes))
        all_true.append(y)
        all_pred.append(pred)
    y, pred = np.concatenate(all_true), np.concatenate(all_pred)
    expected = macro_f1(y, pred, num_classes)
    assert 0 < expected < 1
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)
    np.testing.assert_array_equal(m.confusion.numpy(), confusion_matrix(y, pred, num_classes))


def test_class_only_predicted_counts_as_zero():
    # class 2 predicted once, never true: it is present, F1 0 -> (2/3 + 1 + 0) / 3
    m = SparseMacroF1(3)
    m.update_state(np.array([0, 0, 1, 1]), probs_of([0, 2, 1, 1], 3))
    assert float(m.result()) == pytest.approx(5 / 9, abs=1e-7)


def test_sample_weight_is_ignored():
    y, pred = np.array([0, 0, 1, 2]), probs_of([0, 1, 1, 0], 3)
    weighted, plain = SparseMacroF1(3), SparseMacroF1(3)
    weighted.update_state(y, pred, sample_weight=np.array([0.0, 5.0, 1.0, 2.0]))
    plain.update_state(y, pred)
    assert float(weighted.result()) == float(plain.result())
    assert float(plain.result()) == pytest.approx(macro_f1(y, [0, 1, 1, 0], 3), abs=1e-7)


def test_works_inside_a_tf_function():
    m = SparseMacroF1(3)

    @tf.function
    def step(y, p):
        m.update_state(y, p)
        return m.result()

    step(tf.constant([0, 0]), tf.constant(probs_of([0, 1], 3)))
    value = step(tf.constant([1]), tf.constant(probs_of([1], 3)))
    assert float(value) == pytest.approx(2 / 3, abs=1e-7)


def test_direction_config_and_arguments():
    m = SparseMacroF1(4, name="hate_lc_macro_f1")
    assert m._direction == "up"  # EarlyStopping / ModelCheckpoint mode="auto" maximise it
    assert m.get_config() == {"num_classes": 4, "name": "hate_lc_macro_f1", "dtype": "float32"}
    clone = keras.metrics.deserialize(keras.metrics.serialize(m))
    assert type(clone) is SparseMacroF1 and clone.num_classes == 4
    with pytest.raises(InvalidValueError, match=r"^`num_classes` must be >= 1. "
                                                r"Received: num_classes=0$"):
        SparseMacroF1(0)
    with pytest.raises(InvalidTypeError, match=r"^`num_classes` must be an integer. "
                                               r"Received: num_classes=2.0$"):
        SparseMacroF1(2.0)


def test_exit_metrics_names_and_values():
    metrics = ExitMetrics({"t_ic1": 3, "t_lc": 3, "u_lc": 2})
    assert [m.name for m in metrics.metrics] == [
        "t_ic1_accuracy", "t_ic1_macro_f1", "t_lc_accuracy", "t_lc_macro_f1",
        "u_lc_accuracy", "u_lc_macro_f1"]
    y = {"t_ic1": np.array([0, 0, 1]), "t_lc": np.array([0, 0, 1]), "u_lc": np.array([1, 0, 1])}
    p = {"t_ic1": probs_of([0, 1, 1], 3), "t_lc": probs_of([2, 2, 2], 3),
         "u_lc": probs_of([1, 1, 1], 2)}
    metrics.update_state(y, p)
    result = {k: float(v) for k, v in metrics.result().items()}
    assert set(result) == {m.name for m in metrics.metrics}
    assert result["t_ic1_accuracy"] == pytest.approx(2 / 3)
    assert result["t_ic1_macro_f1"] == pytest.approx(2 / 3)
    assert result["t_lc_accuracy"] == 0.0
    assert result["t_lc_macro_f1"] == 0.0  # classes 0, 1 true, 2 predicted: all F1 0
    assert result["u_lc_accuracy"] == pytest.approx(accuracy(y["u_lc"], [1, 1, 1]))
    assert result["u_lc_macro_f1"] == pytest.approx(macro_f1(y["u_lc"], [1, 1, 1], 2))  # 0.4
    metrics.reset_state()
    after = {k: float(v) for k, v in metrics.result().items()}
    assert after["t_ic1_accuracy"] == 0.0 and math.isnan(after["t_ic1_macro_f1"])
