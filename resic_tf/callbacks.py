"""Keras callbacks: per-exit validation accuracy/macro-F1 and atomic checkpoints."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from resic_tf.config import ResICConfig
from resic_tf.io import atomic_path, atomic_write_text
from resic_tf.metrics import accuracy, macro_f1

METRICS_CSV_FIELDS = ["epoch", "output", "accuracy", "macro_f1"]


class MacroF1Callback(keras.callbacks.Callback):
    """Scores every exit on validation data at the end of every epoch.

    For each output `o` it adds `val_{o}_accuracy` and `val_{o}_macro_f1` to `logs` (so later
    callbacks such as EarlyStopping, checkpoints and Keras's TensorBoard see them), plus
    `val_macro_f1`: the mean over tasks of the LC's macro-F1. It writes TensorBoard scalars
    `accuracy/{o}` and `macro_f1/{o}` (step = epoch index, as Keras's own curves) to
    `log_dir`, and rows (epoch from 1, output, accuracy, macro_f1) to `csv_path`. Put it before
    TensorBoard, EarlyStopping and checkpoint callbacks: they share one `logs` dict.

    Args:
        config: ResICConfig, gives tasks, classes and output names.
        val_inputs: `tf.data.Dataset` of character-id batches (no labels), in label order.
        val_labels: dict task -> int array of class ids.
        log_dir: str or None, TensorBoard directory for the per-exit scalars.
        csv_path: str or None, the `metrics.csv` to write (rewritten atomically every epoch;
            rows of epochs at or after the current one, left by a crashed run, are replaced).
    """

    def __init__(self, config: ResICConfig, val_inputs: tf.data.Dataset,
                 val_labels: Mapping[str, np.ndarray], log_dir: str | None = None,
                 csv_path: str | None = None):
        super().__init__()
        missing = [t for t in config.tasks if t not in val_labels]
        if missing:
            raise ValueError(f"val_labels lacks tasks {missing}; it has {sorted(val_labels)}")
        self.config = config
        self.val_inputs = val_inputs
        self.val_labels = {t: np.asarray(v).reshape(-1) for t, v in val_labels.items()}
        self.log_dir = log_dir
        self.csv_path = csv_path
        self._writer = None

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Predict all exits once; return output -> {"accuracy", "macro_f1"}."""
        probs = self.model.predict(self.val_inputs, verbose=0)
        scores = {}
        for task, classes in self.config.tasks.items():
            y = self.val_labels[task]
            for name in self.config.exit_names(task):
                pred = np.argmax(probs[name], axis=-1)
                if pred.shape != y.shape:
                    raise ValueError(f"{name}: {pred.shape[0]} predictions for {y.shape[0]} labels")
                scores[name] = {"accuracy": accuracy(y, pred),
                                "macro_f1": macro_f1(y, pred, len(classes))}
        return scores

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        scores = self.evaluate()
        for name, s in scores.items():
            logs[f"val_{name}_accuracy"] = s["accuracy"]
            logs[f"val_{name}_macro_f1"] = s["macro_f1"]
        logs["val_macro_f1"] = float(np.mean([scores[f"{t}_lc"]["macro_f1"]
                                              for t in self.config.tasks]))
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default(step=epoch):
                for name, s in scores.items():
                    tf.summary.scalar(f"accuracy/{name}", s["accuracy"])
                    tf.summary.scalar(f"macro_f1/{name}", s["macro_f1"])
            self._writer.flush()
        if self.csv_path is not None:
            self._write_csv(epoch + 1, scores)

    def _write_csv(self, epoch: int, scores):
        rows = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
        rows += [{"epoch": epoch, "output": name, "accuracy": f"{s['accuracy']:.6f}",
                  "macro_f1": f"{s['macro_f1']:.6f}"} for name, s in scores.items()]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class AtomicModelCheckpoint(keras.callbacks.Callback):
    """Saves the `.keras` model through a temporary file and a rename, never half-written.

    With `save_best_only`, keeps the epoch with the best `monitor` (mode "max"); the best value
    is stored in `{filepath}.best.json` so a resumed run does not overwrite a better model.
    """

    def __init__(self, filepath: str, monitor: str = "val_macro_f1", save_best_only: bool = True):
        super().__init__()
        self.filepath = str(filepath)
        self.monitor = monitor
        self.save_best_only = save_best_only
        self.state_path = self.filepath + ".best.json"
        self.best = -math.inf

    def on_train_begin(self, logs=None):
        if self.save_best_only and os.path.exists(self.state_path) and os.path.exists(self.filepath):
            with open(self.state_path, encoding="utf-8") as f:
                self.best = json.load(f)["value"]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if self.save_best_only:
            if value is None:
                raise KeyError(f"AtomicModelCheckpoint monitors {self.monitor!r}, which is not in "
                               f"logs (keys: {sorted(logs)}); put MacroF1Callback before it")
            if not value > self.best:
                return
        with atomic_path(self.filepath) as tmp:
            self.model.save(tmp)
        if value is not None:
            self.best = max(self.best, float(value)) if self.save_best_only else float(value)
            atomic_write_text(self.state_path, json.dumps(
                {"monitor": self.monitor, "value": float(value), "epoch": epoch + 1}) + "\n")


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"epoch": int(r["epoch"]), "output": r["output"], "accuracy": float(r["accuracy"]),
                 "macro_f1": float(r["macro_f1"])} for r in csv.DictReader(f)]


def final_exit_table(config: ResICConfig, scores: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, one row per exit, one accuracy/macro-F1 column pair per task."""
    head = "| exit | " + " | ".join(f"{t} acc | {t} macro-F1" for t in config.tasks) + " |"
    sep = "|---" * (1 + 2 * len(config.tasks)) + "|"
    lines = [head, sep]
    for i in range(config.num_exits):
        cells = []
        for t in config.tasks:
            s = scores[config.exit_names(t)[i]]
            cells += [f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}"]
        label = f"ic{i + 1}" if i < config.num_ics else "lc"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class EpochSummary(keras.callbacks.Callback):
    """One readable line per epoch: losses, every task's LC macro-F1 and its best exit.

    Keras's progress bar lists all 2 x (N+1) x tasks per-output losses; logs and CI need less.
    Reads the keys that `MacroF1Callback` adds, so put it after that callback.
    """

    def __init__(self, config: ResICConfig, epochs: int, print_fn=print):
        super().__init__()
        self.config = config
        self.epochs = epochs
        self.print_fn = print_fn
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        import time
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import time
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "val_loss"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        for task in self.config.tasks:
            names = self.config.exit_names(task)
            f1 = [logs.get(f"val_{n}_macro_f1", float("nan")) for n in names]
            if all(math.isnan(v) for v in f1):
                continue
            best = int(np.nanargmax(f1))
            parts.append(f"{task}: LC macro-F1 {f1[-1]:.4f}, best {names[best]} {f1[best]:.4f}")
        if self._start is not None:
            parts.append(f"{time.perf_counter() - self._start:.0f} s")
        self.print_fn(" | ".join(parts), flush=True)
