"""Per-exit accuracy and macro-F1 as stateful Keras metrics, computed in `fit`'s own passes.

`SparseMacroF1` accumulates a confusion matrix over the epoch (or the validation pass) and
computes the paper's Eq. 4 from it, so its value equals `resic_tf.metrics.macro_f1` on the same
rows exactly. `ExitMetrics` holds both metrics of every output under the names that reach
`logs`: `{output}_macro_f1` and `{output}_accuracy` (`val_...` on validation data), so
`History`, `CSVLogger`, `EarlyStopping(monitor="val_hate_lc_macro_f1")` and Keras's TensorBoard
see them.
"""
from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import ops

from resic_tf.validation import check_scalar

try:  # Keras's own container of one output's metrics: MonitorCallback (EarlyStopping,
    # ModelCheckpoint with mode="auto") looks metric names and directions up inside it.
    from keras.src.trainers.compile_utils import MetricsList as _MetricsBase
except ImportError:  # pragma: no cover - a later Keras; then pass mode="max" to EarlyStopping
    _MetricsBase = keras.metrics.Metric


@keras.saving.register_keras_serializable(package="resic_tf")
class SparseMacroF1(keras.metrics.Metric):
    """Macro-F1 of integer labels against probabilities, from an accumulated confusion matrix.

    Per class F1 = 2TP / (2TP + FP + FN); the mean runs over the classes present in the labels or
    the predictions (the paper's Eq. 4), so a class absent from both is not counted. Rows are
    counted unweighted (`sample_weight` is ignored: macro-F1 already weighs classes equally).

    Args:
        num_classes: int, classes of the task.
        name: str. Defaults to "macro_f1".

    Example: labels [0, 0, 1], predicted classes [0, 1, 1], 3 classes: F1(0) = F1(1) = 2/3,
    class 2 absent, result 2/3.
    """

    def __init__(self, num_classes: int, name: str = "macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = check_scalar(num_classes, "num_classes", int, min_val=1)
        self._direction = "up"
        self.confusion = self.add_variable(shape=(self.num_classes, self.num_classes),
                                           initializer="zeros", dtype="int64",
                                           aggregation="sum", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight
        c = self.num_classes
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        counts = ops.bincount(y_true * c + ops.reshape(pred, (-1,)), minlength=c * c)
        self.confusion.assign_add(ops.reshape(ops.cast(counts[: c * c], "int64"), (c, c)))

    def result(self):
        cm = ops.cast(self.confusion, "float32")
        tp = ops.diagonal(cm)
        denom = 2 * tp + (ops.sum(cm, axis=0) - tp) + (ops.sum(cm, axis=1) - tp)
        present = ops.cast(denom > 0, "float32")
        f1 = ops.where(denom > 0, 2 * tp / ops.maximum(denom, 1.0), 0.0)
        n = ops.sum(present)
        return ops.where(n > 0, ops.sum(f1) / ops.maximum(n, 1.0), float("nan"))

    def reset_state(self):
        self.confusion.assign(ops.zeros_like(self.confusion))

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


class ExitMetrics(_MetricsBase):
    """Accuracy and macro-F1 of every output: `{output}_accuracy`, `{output}_macro_f1`.

    Args:
        num_classes: mapping of output name -> classes of its task, in output order.
    """

    def __init__(self, num_classes: Mapping[str, int]):
        self.outputs = dict(num_classes)
        metrics = []
        for output, classes in self.outputs.items():
            metrics += [keras.metrics.SparseCategoricalAccuracy(name=f"{output}_accuracy"),
                        SparseMacroF1(classes, name=f"{output}_macro_f1")]
        if _MetricsBase is keras.metrics.Metric:  # pragma: no cover
            super().__init__(name="exit_metrics")
            self.metrics = metrics
        else:
            super().__init__(metrics, name="exit_metrics")

    def update_state(self, y_true, y_pred, sample_weight=None):
        for i, output in enumerate(self.outputs):
            accuracy, f1 = self.metrics[2 * i], self.metrics[2 * i + 1]
            accuracy.update_state(y_true[output], y_pred[output])
            f1.update_state(y_true[output], y_pred[output])

    def result(self):
        return {m.name: m.result() for m in self.metrics}

    def reset_state(self):
        for m in self.metrics:
            m.reset_state()
