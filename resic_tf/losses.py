"""The exits' loss: sparse cross-entropy with label smoothing and per-class weights, on the
softmax probabilities every exit outputs; and the class weights that balance a skewed task."""
from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from resic_tf.config import CLASS_WEIGHTINGS
from resic_tf.validation import check_choice, check_scalar


def class_weights(labels, num_classes: int, weighting: str = "sqrt") -> list[float]:
    """Per-class loss weights from training label ids (`count_weights` of their counts)."""
    num_classes = check_scalar(num_classes, "num_classes", int, min_val=1)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)[:num_classes]
    return count_weights(counts, weighting)


def count_weights(counts, weighting: str = "sqrt") -> list[float]:
    """Per-class loss weights from each class's training count: "balanced" weighs class c by
    `n / (K * n_c)`, "sqrt" by its square root, "none" all 1. Rescaled so that the mean weight
    over the training rows is 1 (the loss keeps its scale); a class with no row gets the
    largest weight. Counts suffice, so a streamed file needs no label array."""
    check_choice(weighting, "class_weighting", CLASS_WEIGHTINGS)
    counts = np.asarray(counts, np.int64)
    num_classes = len(counts)
    if weighting == "none" or counts.sum() == 0:
        return [1.0] * num_classes
    power = 1.0 if weighting == "balanced" else 0.5
    seen = counts > 0
    w = np.ones(num_classes)
    w[seen] = (counts.sum() / (num_classes * counts[seen])) ** power
    w /= (w * counts).sum() / counts.sum()
    w[~seen] = w[seen].max()
    return [float(x) for x in w]


@keras.saving.register_keras_serializable(package="resic_tf")
class ExitLoss(keras.losses.Loss):
    """Cross-entropy of integer labels against an exit's probabilities, with label smoothing
    (the target is `1 - label_smoothing` on the label plus `label_smoothing / K` on every class)
    and an optional weight per class (the row's weight is its label's).

    Args:
        label_smoothing: float in [0, 1). Defaults to 0.
        class_weights: optional sequence of K floats.
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                 name: str = "exit_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = check_scalar(label_smoothing, "label_smoothing", float,
                                            min_val=0.0, max_val=1.0, include_boundaries="left")
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        k = ops.shape(y_pred)[-1]
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        log_p = ops.log(ops.clip(y_pred, keras.config.epsilon(), 1.0))
        nll = -ops.sum(ops.one_hot(labels, k, dtype=log_p.dtype) * log_p, axis=-1)
        loss = nll
        if self.label_smoothing:
            uniform = -ops.mean(log_p, axis=-1)
            loss = (1.0 - self.label_smoothing) * nll + self.label_smoothing * uniform
        if self.class_weights is not None:
            loss = loss * ops.take(ops.convert_to_tensor(self.class_weights, loss.dtype), labels)
        return loss

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "class_weights": self.class_weights}


def self_distillation(lc_probs, ic_probs, weights: Sequence[float]):
    """`sum_i weights[i] * KL(LC || IC_i)`, averaged over rows: each internal classifier learns
    the last classifier's distribution ("Be Your Own Teacher", Zhang et al. 2019; FastBERT).
    The LC is the teacher: no gradient flows into it through this term."""
    eps = keras.config.epsilon()
    teacher = ops.stop_gradient(ops.clip(lc_probs, eps, 1.0))
    total = 0.0
    for probs, weight in zip(ic_probs, weights):
        kl = ops.sum(teacher * (ops.log(teacher) - ops.log(ops.clip(probs, eps, 1.0))), axis=-1)
        total = total + weight * ops.mean(kl)
    return total
