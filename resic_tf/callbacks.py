"""Keras callbacks of a training run: per-exit metrics to TensorBoard and `metrics.csv`, atomic
checkpoints, and one readable line per epoch.

The per-exit metrics themselves are compiled into the model (`ResICClassifier.compile`,
`resic_tf.exit_metrics`); these callbacks only read them from `logs`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from resic_tf.config import ResICConfig, exit_label
from resic_tf.io import atomic_path, atomic_write_text, read_json
from resic_tf.markdown import markdown_table
from resic_tf.metrics import best_index
from resic_tf.tensorboard import log_exit_profiles, write_layout

METRICS_CSV_FIELDS = ["epoch", "output", "accuracy", "macro_f1"]
EXIT_METRICS = ("accuracy", "macro_f1")
EXIT_METRIC_SUFFIXES = tuple(f"_{m}" for m in EXIT_METRICS)
# The mean over tasks of the LC's validation macro-F1: what "best epoch" means.
SELECTION_KEY = "val_macro_f1"


def _outputs(model) -> list[str]:
    return [name for task in model.tasks for name in model.exit_names(task)]


class ExitMetricsLogger(keras.callbacks.Callback):
    """Writes every exit's validation accuracy and macro-F1, each once, where users look for them.

    Reads `val_{output}_accuracy` and `val_{output}_macro_f1` (the compiled exit metrics) from
    `logs`; adds `val_macro_f1`, the mean over tasks of the LC's macro-F1, for checkpoint
    selection; writes TensorBoard scalars `accuracy/{output}` and `macro_f1/{output}` (step =
    epoch index, as Keras's own curves) and each task's exit profile (image
    `exit_profile/{task}`, Markdown table `exit_table/{task}`) to `log_dir`; the custom-scalars
    layout once to `log_dir/../layout` (every exit of a task on one chart); and rows (epoch from
    1, output, accuracy, macro_f1) to `csv_path`, rewritten atomically every epoch (rows of
    epochs at or after the current one, left by a crashed run, are replaced). Put it before the
    checkpoint, TensorBoard and EpochSummary callbacks: they share one `logs` dict.

    Args:
        log_dir: TensorBoard directory of the per-exit summaries (a run's `tensorboard/exits`).
        csv_path: the `metrics.csv` to write.
        profile: log the per-task exit profile every epoch. Defaults to True.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None,
                 csv_path: str | os.PathLike | None = None, profile: bool = True):
        super().__init__()
        self.log_dir = None if log_dir is None else str(log_dir)
        self.csv_path = None if csv_path is None else str(csv_path)
        self.profile = profile
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir is not None:
            write_layout(os.path.dirname(os.path.abspath(self.log_dir)), list(self.model.tasks))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        outputs = _outputs(self.model)
        missing = [f"val_{o}_{m}" for o in outputs for m in EXIT_METRICS
                   if f"val_{o}_{m}" not in logs]
        if missing:
            raise KeyError(f"ExitMetricsLogger needs validation data and the model's exit metrics "
                           f"(`model.compile(metrics='auto')`); logs lack {missing[:3]}")
        scores = {o: {m: float(logs[f"val_{o}_{m}"]) for m in EXIT_METRICS} for o in outputs}
        logs[SELECTION_KEY] = float(np.mean([scores[self.model.exit_names(t)[-1]]["macro_f1"]
                                             for t in self.model.tasks]))
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default(step=epoch):
                for name, s in scores.items():
                    for m in EXIT_METRICS:
                        tf.summary.scalar(f"{m}/{name}", s[m])
                if self.profile:
                    log_exit_profiles({task: (
                        [exit_label(i, self.model.num_exits) for i in range(self.model.num_exits)],
                        [scores[o]["accuracy"] for o in self.model.exit_names(task)],
                        [scores[o]["macro_f1"] for o in self.model.exit_names(task)])
                        for task in self.model.tasks}, epoch)
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


class ResICTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback without the validation exit metrics, which
    `ExitMetricsLogger` already writes once under the public tags `accuracy/<output>` and
    `macro_f1/<output>`. Losses, training-time exit metrics and everything else are Keras's."""

    def on_test_end(self, logs=None):
        # Keras writes each validation pass's logs again as `evaluation_<key>_vs_iterations`.
        logs = {k: v for k, v in (logs or {}).items() if not k.endswith(EXIT_METRIC_SUFFIXES)}
        super().on_test_end(logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: v for k, v in (logs or {}).items()
                if not (k.startswith("val_") and k.endswith(EXIT_METRIC_SUFFIXES))}
        super().on_epoch_end(epoch, logs)
        # On disk before BackupAndRestore commits the epoch: a kill after the commit must not
        # lose the epoch's curves (the resumed run starts after it).
        for writer in self._writers.values():
            writer.flush()


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's `ModelCheckpoint`, written through a temporary file and a rename, never
    half-written; the best monitored value is kept in `{filepath}.best.json` so a resumed run
    does not overwrite a better model with a worse one."""

    def __init__(self, filepath, monitor: str = SELECTION_KEY, mode: str = "max", **kwargs):
        super().__init__(filepath, monitor=monitor, mode=mode, **kwargs)
        self.state_path = self.filepath + ".best.json"
        if self.save_best_only and os.path.exists(self.state_path) \
                and os.path.exists(self.filepath):
            self.best = float(read_json(self.state_path)["value"])

    def _save_model(self, epoch, batch, logs):
        template = self.filepath
        final = self._get_file_path(epoch, batch, logs)  # `{epoch}` placeholders filled in
        head, name = os.path.split(final)
        tmp = os.path.join(head, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
        before = self.best
        self.filepath = tmp
        try:
            super()._save_model(epoch, batch, logs)
        except BaseException:  # Ctrl-C, a full disk: no half-written file left behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        finally:
            self.filepath = template
        if not os.path.exists(tmp):  # not an improvement: nothing was written
            return
        os.replace(tmp, final)
        value = (logs or {}).get(self.monitor)
        if value is not None and (not self.save_best_only or self.best != before):
            atomic_write_text(self.state_path, json.dumps(
                {"monitor": self.monitor, "value": float(value), "epoch": epoch + 1}) + "\n")


BACKUP_METADATA = "training_metadata.json"


def read_backup_metadata(backup_dir: str | os.PathLike, previous: bool = False) -> dict | None:
    """The last commit of an `AtomicBackupAndRestore` in `backup_dir` (`previous`: the one
    before): `epoch` (epochs finished), `weights` (file name), `committed_at` (time.time());
    None when there is none or it cannot be read."""
    path = os.path.join(os.fspath(backup_dir), BACKUP_METADATA + (".bkp" if previous else ""))
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.loads(f.read())
        return meta if isinstance(meta.get("epoch"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def restore_point(backup_dir: str | os.PathLike,
                  strategy: tf.distribute.Strategy | None = None) -> dict | None:
    """The commit in `backup_dir` that training resumes from (`read_backup_metadata`'s dict), or
    None to start from epoch 0: the last commit whose weights file is there.

    Under MultiWorkerMirroredStrategy (a collective: call it on every worker) the workers agree
    on the smallest epoch any of them committed, and each takes its commit of that epoch: a
    worker lost between two workers' commits leaves them one epoch apart, and the previous
    commit (kept beside the last) bridges that.
    """
    commits = [m for m in (read_backup_metadata(backup_dir),
                           read_backup_metadata(backup_dir, previous=True))
               if m and m["epoch"] > 0 and os.path.isfile(_weights_file(backup_dir, m))]
    local = commits[0]["epoch"] if commits else 0
    epoch = _agreed_epoch(strategy, local) if strategy is not None else local
    if epoch == 0:
        return None
    for meta in commits:
        if meta["epoch"] == epoch:
            return meta
    raise RuntimeError(f"{backup_dir} holds no backup of epoch {epoch}, which the other workers "
                       "resume from; delete every worker's backup directory to start again")


def _weights_file(backup_dir, meta: dict) -> str:
    return os.path.join(os.fspath(backup_dir), meta.get("weights", "latest.weights.h5"))


def _agreed_epoch(strategy: tf.distribute.Strategy, epoch: int) -> int:
    """The smallest of every worker's `epoch` under MultiWorkerMirroredStrategy; else `epoch`."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return epoch

    @tf.function
    def gather():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_gather(
            tf.constant([epoch], tf.int64), axis=0))

    return int(strategy.experimental_local_results(gather())[0].numpy().min())


_FIND = object()


class _EMASwap(keras.callbacks.SwapEMAWeights):
    """Swaps the weights with their moving average at an epoch's end (and, `around_validation`,
    for each validation pass); a swap is its own inverse."""

    def __init__(self, around_validation: bool):
        super().__init__()
        self.around_validation = around_validation

    def on_epoch_end(self, epoch, logs=None):
        self._swap_variables()

    def on_test_begin(self, logs=None):
        if self.around_validation:
            super().on_test_begin(logs)

    def on_test_end(self, logs=None):
        if self.around_validation:
            super().on_test_end(logs)

    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass


def ema_callbacks() -> tuple[keras.callbacks.Callback, keras.callbacks.Callback]:
    """The callbacks that make a run validated, selected and saved with the optimizer's moving
    average of its weights (`TrainConfig.ema`) while the training steps go on with the raw ones.

    Returns `(first, before_backup)`: `first` goes before every callback that reads the weights
    at an epoch's end (the metrics, the checkpoint); it swaps the average in there, and around
    each validation pass. `before_backup` goes after them and before `BackupAndRestore`: it swaps
    the raw weights back, so a backup holds each variable and its average in their own places
    and a resumed run goes on exactly. Batch-norm statistics stay those of the raw weights.
    """
    return _EMASwap(around_validation=True), _EMASwap(around_validation=False)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore` whose commit of an epoch is one atomic rename.

    Keras writes `latest.weights.h5` in place and the epoch number after it: a kill in between
    pairs new weights with the old epoch (the epoch then runs twice), or leaves a torn file. Here
    each commit writes its weights to their own file (`epoch-E.weights.h5`, through a temporary
    file), then atomically replaces `training_metadata.json`, which names that file, the epoch and
    `committed_at`, the time of the commit: what a resumed run uses to drop anything the killed
    process wrote after it (`resic_tf.resume`). The previous commit is kept beside it.

    Args:
        backup_dir: this process's own directory (one per worker).
        restore: the commit to resume from, as `restore_point` chose it (None: epoch 0).
            Defaults to `restore_point(backup_dir, model's strategy)` at the start of `fit`.
    """

    def __init__(self, backup_dir: str | os.PathLike, restore: dict | None = _FIND):
        super().__init__(os.fspath(backup_dir), double_checkpoint=True)
        self.restore = restore

    def on_train_begin(self, logs=None):
        commit = self.restore
        if commit is _FIND:
            commit = restore_point(self.backup_dir, self.model.distribute_strategy)
        if commit is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(_weights_file(self.backup_dir, commit))
        self.model._initial_epoch = commit["epoch"]

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch}.weights.h5"
        with atomic_path(os.path.join(self.backup_dir, name), suffix=".weights.h5") as tmp:
            self.model.save_weights(str(tmp))
        previous = read_backup_metadata(self.backup_dir)
        if previous is not None:
            atomic_write_text(self._prev_training_metadata_path, json.dumps(previous))
        atomic_write_text(self._training_metadata_path, json.dumps({
            "epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name,
            "committed_at": time.time()}))
        keep = {name, (previous or {}).get("weights")}
        for old in os.listdir(self.backup_dir):
            if old.endswith(".weights.h5") and old not in keep and not old.startswith("."):
                os.remove(os.path.join(self.backup_dir, old))


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"epoch": int(r["epoch"]), "output": r["output"], "accuracy": float(r["accuracy"]),
                 "macro_f1": float(r["macro_f1"])} for r in csv.DictReader(f)]


def final_exit_table(config: ResICConfig, scores: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, one row per exit, one accuracy/macro-F1 column pair per task."""
    header = ["exit"] + [f"{t} {m}" for t in config.tasks for m in ("acc", "macro-F1")]
    rows = []
    for i in range(config.num_exits):
        cells = [exit_label(i, config.num_exits)]
        for t in config.tasks:
            s = scores[config.exit_names(t)[i]]
            cells += [f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}"]
        rows.append(cells)
    return markdown_table(header, rows)


class EpochSummary(keras.callbacks.Callback):
    """One readable line per epoch: losses, every task's LC macro-F1 and its best exit.

    Keras's progress bar lists all 2 x (N+1) x tasks per-output losses; logs and CI need less.
    """

    def __init__(self, epochs: int, print_fn=print):
        super().__init__()
        self.epochs = epochs
        self.print_fn = print_fn
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "val_loss"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        for task in self.model.tasks:
            names = self.model.exit_names(task)
            f1 = [logs.get(f"val_{n}_macro_f1", float("nan")) for n in names]
            if all(np.isnan(v) for v in f1):
                continue
            best = best_index(f1)
            parts.append(f"{task}: LC macro-F1 {f1[-1]:.4f}, best {names[best]} {f1[best]:.4f}")
        if self._start is not None:
            parts.append(f"{time.perf_counter() - self._start:.0f} s")
        self.print_fn(" | ".join(parts), flush=True)
