"""Exact accuracy and macro-F1 from integer labels (numpy, no one-hot, no streaming error).

Macro-F1 follows the paper's Eq. 4: the unweighted mean of per-class F1 over the classes that
occur in the labels or the predictions. A class absent from both has no defined F1 and is
excluded (not counted as 0 or 1). A class present in only one of them scores F1 = 0.
"""
from __future__ import annotations

import warnings

import numpy as np

from resic_tf.validation import check_choice


def _as_ids(name: str, y) -> np.ndarray:
    """Class ids of shape (n,); (n, 1) is raveled with a warning, one-hot or other shapes refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn(f"{name} of shape {y.shape} was raveled to ({y.shape[0]},)", stacklevel=3)
        return y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{name} must hold class ids of shape (n,), not one-hot or "
                         f"probabilities. Received: shape {y.shape}")
    return y


def _check(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_ids("y_true", y_true)
    y_pred = _as_ids("y_pred", y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred need the same number of samples. Received: "
                         f"{y_true.shape[0]} and {y_pred.shape[0]}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must hold class ids in [0, {num_classes}). Received: "
                             f"min={y.min()}, max={y.max()}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """`cm[t, p]` = number of samples of true class t predicted as p."""
    y_true, y_pred = _check(y_true, y_pred, num_classes)
    return np.bincount(y_true * num_classes + y_pred,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN) per class; NaN for a class absent from labels and predictions."""
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def macro_f1_from_cm(cm: np.ndarray) -> float:
    f1 = per_class_f1(cm)
    return float(np.nanmean(f1)) if np.any(~np.isnan(f1)) else float("nan")


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Macro-F1 over present classes.

    Example: y_true=[0, 0, 1], y_pred=[0, 1, 1], 3 classes: F1(0)=2/3, F1(1)=2/3, class 2 absent,
    so macro-F1 = 2/3.
    """
    return macro_f1_from_cm(confusion_matrix(y_true, y_pred, num_classes))


def accuracy(y_true, y_pred) -> float:
    y_true = _as_ids("y_true", y_true)
    y_pred = _as_ids("y_pred", y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred need the same number of samples. Received: "
                         f"{y_true.shape[0]} and {y_pred.shape[0]}")
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


METRICS = ("macro_f1", "accuracy")


def score(y_true, y_pred, num_classes: int, metric: str) -> float:
    check_choice(metric, "metric", METRICS)
    if metric == "accuracy":
        return accuracy(y_true, y_pred)
    return macro_f1(y_true, y_pred, num_classes)


def best_index(scores) -> int:
    """Index of the best score: the first (shallowest exit) among equals; NaN never wins.

    The one "best exit" rule, shared by the gate and every report. All-NaN gives 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))
