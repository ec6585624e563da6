"""Training a Res-IC model with `model.fit` into a run directory, resumable after a crash.

The run directory's files are `resic_tf.run`'s; training writes the small ones first (so a
crashed run resumes identically), `model.keras` through its checkpoint callback, and the final
summary (`run.json`, `final_exits.md`) last.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from resic_tf.callbacks import (AtomicBackupAndRestore, AtomicModelCheckpoint, EpochSummary,
                                ExitMetricsLogger, ResICTensorBoard, ema_callbacks,
                                final_exit_table, restore_point)
from resic_tf.config import (LEGACY_MODEL_SETTINGS, STRATEGIES, ResICConfig, TrainConfig,
                             default_ngram_table)
from resic_tf.data import (DataError, LabelledTexts, encode_labels, load_labelled_texts,
                           sorted_labels, split_train_val)
from resic_tf.fusion import calibrate_mix, calibrate_shares
from resic_tf.io import atomic_path, atomic_write_text, read_json
from resic_tf.losses import count_weights
from resic_tf.model import build_model, build_preprocessor
from resic_tf.nesting import find_nested_tasks
from resic_tf.preprocessor import string_dataset
from resic_tf.streaming import scan_training_file, streaming_dataset
from resic_tf.tfidf import TfidfNGrams, fit_linear, tfidf_matrix
from resic_tf.resume import prune_after_commit
from resic_tf.run import (BACKUP_DIR, FINAL_EXITS_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE,
                          TENSORBOARD_DIR, VALIDATION_FILE, Run)
from resic_tf.validation import InvalidValueError, check_choice
from resic_tf.vocabulary import CharVocabulary


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """`auto`: MultiWorkerMirrored when TF_CONFIG is set, Mirrored on several GPUs, else default."""
    check_choice(name, "strategy", STRATEGIES)
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This process's place among MultiWorkerMirrored workers: 0 for the chief (TF_CONFIG's
    `chief` task, else `worker` 0), which alone writes the run directory; 0 without workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 0
    if resolver.task_type in (None, "chief"):
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return int(resolver.task_id) + (1 if has_chief else 0)


class _Interrupt:
    """A Ctrl-C noted by `deferred_interrupt`, raised as KeyboardInterrupt at a safe point."""

    def __init__(self):
        self.pending = False

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


@contextmanager
def deferred_interrupt():
    """While the block runs (in the main thread, under Python's default SIGINT handler): the
    first SIGINT only marks the `_Interrupt` it yields, which `StopOnInterrupt` raises between
    steps; a second SIGINT raises at once. Elsewhere, and after the block, nothing changes."""
    interrupt = _Interrupt()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield interrupt
        return

    def handler(signum, frame):
        if interrupt.pending:
            raise KeyboardInterrupt
        interrupt.pending = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StopOnInterrupt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the first batch or epoch boundary after a deferred Ctrl-C, out
    of `fit` (the epoch under way is not committed, so the run resumes at its start)."""

    def __init__(self, interrupt: _Interrupt):
        super().__init__()
        self.interrupt = interrupt

    def on_train_batch_end(self, batch, logs=None):
        self.interrupt.check()

    def on_test_batch_end(self, batch, logs=None):
        self.interrupt.check()

    def on_epoch_begin(self, epoch, logs=None):
        self.interrupt.check()


def learning_rate(tc: TrainConfig, steps_per_epoch: int):
    """The learning rate of `tc`: a float ("constant"), or a schedule of the optimizer step
    ("cosine": linear warm-up from 0 over the first `warmup` share of all steps, then cosine
    decay to 0 at the last step)."""
    if tc.schedule == "constant":
        return tc.learning_rate
    total = max(1, tc.epochs * steps_per_epoch)
    warmup = int(round(tc.warmup * total))
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else tc.learning_rate, max(1, total - warmup),
        warmup_target=tc.learning_rate if warmup else None, warmup_steps=warmup)


def make_optimizer(tc: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam or AdamW (`weight_decay`, decoupled; biases, norms and embeddings decay too), keeping
    a moving average of the weights when `tc.ema` > 0 (`resic_tf.callbacks.ema_callbacks`)."""
    rate = learning_rate(tc, steps_per_epoch)
    ema = {"use_ema": True, "ema_momentum": tc.ema} if tc.ema else {}
    if tc.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=tc.weight_decay, **ema)
    return keras.optimizers.Adam(rate, **ema)


class _WideStageSGD(keras.optimizers.SGD):
    """Plain SGD whose rate for the n-gram table is divided by the table's rate multiplier
    squared: the table is stored divided by the multiplier (`NGramEmbedding`), so an SGD step
    on the stored values moves the values used by the multiplier squared times the rate."""

    def __init__(self, learning_rate, table, multiplier: float, **kwargs):
        super().__init__(learning_rate, name="wide_stage_sgd", **kwargs)
        self.table, self.table_scale = table, 1.0 / multiplier ** 2

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) == self._var_key(self.table):
            learning_rate = keras.ops.multiply(learning_rate, self.table_scale)
        super().update_step(gradient, variable, learning_rate)


def train_wide_stage(model, train_ds: tf.data.Dataset, epochs: int, learning_rate: float,
                     steps_per_epoch: int, callbacks=()) -> list[float]:
    """Train a late-fusion model's wide branch alone (its n-gram table and its classifiers on
    their own cross-entropy, one per task, no class weights) for `epochs` by plain SGD at
    `learning_rate` decaying linearly to 0, as fastText trains, then freeze it.

    Adam gives every row of the table a step of the same size whatever its gradient's scale, so
    an n-gram seen twice learns as fast as one seen a thousand times and the table memorises
    rare n-grams; SGD moves a row in proportion to how often it is used. Trained alone this
    way the branch scored 1.7-3.2 points of validation macro-F1 more on korean-hate-speech than
    under AdamW, and inside late-fusion runs 2-4 points more on bias (docs/RESULTS.md, session
    15; the served LC's gain is not shown yet, so the stage is opt-in). Under late fusion the
    deep exits never see the wide branch in training, so training it first changes nothing
    else. Returns the stage's loss per epoch.
    """
    if not getattr(model, "late_fusion", False):
        raise InvalidValueError("The wide stage trains a late-fusion model's wide branch: "
                                "wide_fusion='late' with ngram_buckets > 0")
    table_layer = model.backbone.get_layer("ngram_embedding")
    ids = keras.Input(model.backbone.input.shape[1:], dtype="int32")
    wide = table_layer(ids)
    tasks = list(model.tasks)
    wide_model = keras.Model(ids, {t: head(wide) for t, head in zip(tasks, model.wide_heads)})

    def targets(*data):  # raw strings and class ids by task, as `TrainingData.datasets` gives
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return model.preprocessor(x), {t: y[t] for t in tasks}

    schedule = keras.optimizers.schedules.PolynomialDecay(
        learning_rate, max(1, epochs * steps_per_epoch), 0.0)
    wide_model.compile(optimizer=_WideStageSGD(schedule, table_layer.embedding.embeddings,
                                               table_layer.rate_multiplier),
                       loss={t: keras.losses.SparseCategoricalCrossentropy() for t in tasks})
    history = wide_model.fit(train_ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE)
                             .prefetch(tf.data.AUTOTUNE), epochs=epochs, verbose=0, shuffle=False,
                             steps_per_epoch=steps_per_epoch, callbacks=list(callbacks))
    model.freeze_wide()
    return [float(v) for v in history.history["loss"]]


LINEAR_STEPS = 300  # full-batch Adam steps of each logistic regression (`fit_linear`)


def linear_vocabulary(config: ResICConfig, vocabulary: CharVocabulary,
                      rows: tf.data.Dataset) -> tuple[TfidfNGrams, dict[str, int]]:
    """The linear branch's n-gram vocabulary and IDF from the training rows (`rows`: one pass of
    `(raw strings, labels)` batches): a `TfidfNGrams` adapted with `config.linear_ngrams`
    columns at most and trimmed to those filled (`resic train` builds the model that size).
    Returns it and `adapt`'s statistics."""
    to_ids = build_preprocessor(config, vocabulary.chars)
    layer = TfidfNGrams(config.linear_ngrams, config.ngram_sizes)
    stats = layer.adapt(to_ids(text) for text, _ in rows)
    return layer.trimmed(), stats


def train_linear_branch(model, rows: tf.data.Dataset, C: float = 10.0,
                        vocabulary: TfidfNGrams | None = None) -> dict[str, Any]:
    """Fit a model's linear branch on the training rows, before its deep branch trains: its
    `TfidfNGrams` takes `vocabulary`'s n-grams and IDF (`linear_vocabulary`, same size) or is
    adapted to the rows' texts, then each task's `LinearHead` is fitted by `fit_linear`
    (logistic regression, scikit-learn's `C`) on their TF-IDF matrix. `rows`: one pass over
    `(raw strings, {task: class ids})` batches. The heads are never trained by the model's loss
    (they are non-trainable), so the deep branch trains as it would without them. Returns the
    matrix's entries, each task's final objective and gradient norm, and `adapt`'s statistics
    when it adapted."""
    backbone = model.backbone
    layer = backbone.get_layer("tfidf_ngrams")
    if vocabulary is not None:
        layer.set_weights(vocabulary.get_weights())
        stats = {}
    else:
        stats = layer.adapt(model.preprocessor(text) for text, _ in rows)

    @tf.function
    def features(text):
        ids = model.preprocessor(text)
        return layer(ids, padding_mask=backbone.padding_mask(ids))

    parts, labels = [], {t: [] for t in model.tasks}
    for text, y in rows:
        parts.append(features(text))
        for task in model.tasks:
            labels[task].append(np.asarray(y[task]))
    x = tfidf_matrix(parts, layer.max_ngrams)
    fits = {task: fit_linear(head, x, np.concatenate(labels[task]), C, LINEAR_STEPS)
            for task, head in zip(model.tasks, model.linear_heads)}
    return {**stats, "entries": int(x.values.shape[0]), "tasks": fits}


def load_splits(tc: TrainConfig, progress: bool | str = False,
                ) -> tuple[LabelledTexts, LabelledTexts, dict[str, list[str]]]:
    """The training rows, validation rows and each task's classes that `tc` trains on: the
    validation file, or the seeded stratified hold-out of `val_split`."""
    data = load_labelled_texts(tc.data, tc.text_col, tc.label_cols, progress)
    if tc.val_data is not None:
        val = load_labelled_texts(tc.val_data, tc.text_col, tc.label_cols, progress)
        train = data
    else:
        train, val = split_train_val(data, tc.val_split, tc.seed)
    # Classes come from the whole training file, so a class that the split sent only to
    # validation is still known; a separate validation file must use the training classes.
    tasks = {col: sorted_labels(data.labels[col]) for col in tc.label_cols}
    for col, classes in tasks.items():
        if len(classes) < 2:
            raise DataError(tc.data, f"label column needs at least 2 classes, found {classes}",
                            column=col)
    return train, val, tasks


@dataclass
class TrainingData:
    """What training reads: each task's classes, the vocabulary, the class counts of the
    training rows, and how to make the training and validation datasets.

    In memory (`rows`): the whole file is read and split (stratified, seeded). Streamed
    (`TrainConfig.stream`): one chunked pass (`resic_tf.streaming`), the validation rows written
    to a Parquet file, and every epoch read from the files again.
    """

    tasks: dict[str, list[str]]
    vocabulary: CharVocabulary
    class_counts: dict[str, np.ndarray]
    train_rows: int
    val_rows: int
    rows: tuple[LabelledTexts, LabelledTexts] | None = None  # in memory: (train, validation)
    ids: tuple[dict, dict] | None = None  # in memory: their class ids, task -> array
    staged_validation: Path | None = None  # streamed: the validation rows' Parquet file

    @property
    def validation(self) -> LabelledTexts | None:
        return None if self.rows is None else self.rows[1]

    def steps_per_epoch(self, tc: TrainConfig) -> int:
        return tc.steps_per_epoch or -(-self.train_rows // tc.batch_size)

    def training_rows(self, tc: TrainConfig, batch_size: int = 1024) -> tf.data.Dataset:
        """One pass over the training rows, `(raw strings, {task: class ids})` batches in file
        order (the linear branch's fit reads them: `train_linear_branch`)."""
        if self.rows is not None:
            return string_dataset(self.rows[0].texts, self.ids[0], batch_size)
        return streaming_dataset(tc.data, tc.text_col, self.tasks, batch_size,
                                 part="all" if tc.val_data is not None else "train",
                                 val_split=tc.val_split, seed=tc.seed)

    def place_validation(self, target: Path) -> None:
        """Move the streamed validation rows into the run directory (atomic rename)."""
        if self.staged_validation is not None and self.staged_validation.exists():
            os.replace(self.staged_validation, target)

    def datasets(self, tc: TrainConfig, config: ResICConfig, val_file: Path):
        """(training, validation) `tf.data` datasets of raw strings and class ids; the model maps
        its preprocessor over them. Training batches are freshly shuffled every epoch; with
        `steps_per_epoch` the training rows repeat, so an epoch may end anywhere in the file."""
        by_length = tc.groups_by_length(config)
        if self.rows is not None:
            (train, val), (train_ids, val_ids) = self.rows, self.ids
            train_ds = string_dataset(train.texts, train_ids, tc.batch_size, shuffle=True,
                                      seed=tc.seed, by_length=by_length)
            val_ds = string_dataset(val.texts, val_ids, tc.batch_size,
                                    by_length=config.length_adaptive)
        else:
            train_ds = streaming_dataset(
                tc.data, tc.text_col, self.tasks, tc.batch_size,
                part="all" if tc.val_data is not None else "train", rows=self.train_rows,
                val_split=tc.val_split, seed=tc.seed, shuffle_buffer=tc.shuffle_buffer,
                by_length=by_length)
            val_ds = streaming_dataset(val_file, tc.text_col, self.tasks, tc.batch_size,
                                       rows=self.val_rows)
        if tc.steps_per_epoch is not None:
            train_ds = train_ds.repeat()
        return train_ds, val_ds


def training_data(tc: TrainConfig, out: Path, progress: bool | str = False) -> TrainingData:
    """Read `tc`'s data (all of it, or streamed with `tc.stream`), checking every row before
    training starts. A streamed run stages its validation rows beside `out` (`out` itself is
    not touched until the data is known to be good)."""
    if not tc.stream:
        train, val, tasks = load_splits(tc, progress)
        val_ids = encode_labels(val, tasks)  # a validation file's unseen label names its row
        ids = encode_labels(train, tasks)
        counts = {t: np.bincount(ids[t], minlength=len(c)) for t, c in tasks.items()}
        vocab = CharVocabulary.build(train.texts, min_freq=tc.min_char_freq)
        return TrainingData(tasks, vocab, counts, len(train), len(val), rows=(train, val),
                            ids=(ids, val_ids))
    staged = out.parent / f".{out.name}.validation.{os.getpid()}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        scan = scan_training_file(tc.data, tc.text_col, tc.label_cols, staged, tc.val_data,
                                  tc.val_split, tc.seed, progress=progress)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    vocab = CharVocabulary.from_counts(scan.chars, min_freq=tc.min_char_freq)
    return TrainingData(scan.classes, vocab, {t: scan.class_counts(t) for t in scan.classes},
                        scan.train_rows, scan.val_rows, staged_validation=staged)


def _check_resume(out: Path, tc: TrainConfig, model_kwargs: Mapping[str, Any], overwrite: bool):
    """A finished run is not overwritten; an unfinished one resumes only with the same settings."""
    state_file = out / STATE_FILE
    if not state_file.exists():
        if out.exists() and any(out.iterdir()):
            # --overwrite replaces runs only: it must never wipe a folder of other files.
            raise FileExistsError(f"{out} exists, is not empty and holds no run (no {STATE_FILE}); "
                                  "choose a new --out")
        return False
    state = read_json(state_file)
    if state.get("status") == "finished" and not overwrite:
        raise FileExistsError(f"{out} holds a finished run; choose a new --out or pass --overwrite")
    if overwrite:
        return False
    given = json.loads(json.dumps(dict(model_kwargs)))
    # A run begun by an older version stored no value for a newer setting: it meant the legacy one.
    stored = {**{k: v for k, v in LEGACY_MODEL_SETTINGS.items() if k in given},
              **(state.get("model_kwargs") or {})}
    if stored.get("wide_weight") == 0.5 and given.get("wide_weight") is None \
            and not given.get("linear_ngrams"):
        stored["wide_weight"] = None  # 0.12 stored its default, 0.5, where 0.13 stores None
    # A setting newer than the run's version is absent from its train_config: its default.
    stored_tc = _stored_train_config(state)
    same = stored_tc == tc and stored == given
    begun_before_0_14 = "linear_mix" not in (state.get("train_config") or {})
    if not same and begun_before_0_14 and stored_tc is not None \
            and replace(tc, wide_epochs=0) == stored_tc \
            and {**given, "linear_ngrams": 0} == stored:
        # the same command line under 0.14's default recipe asks for a linear branch and a
        # wide stage that the run's own recipe did not have
        raise InvalidValueError(f"{out} holds an unfinished run begun before 0.14, whose default "
                                "recipe had no linear branch and no wide stage; resume it with "
                                "the same command plus --linear-ngrams 0 --wide-epochs 0, or pass "
                                "--overwrite to start again")
    if not same:
        raise InvalidValueError(f"{out} holds an unfinished run with other settings; resume it "
                                "with the same command, or pass --overwrite to start again")
    return True


def _stored_train_config(state: Mapping[str, Any]) -> TrainConfig | None:
    try:
        return TrainConfig.from_dict(state.get("train_config"))
    except (InvalidValueError, TypeError):
        return None


def _write_state(out: Path, state: Mapping[str, Any]) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, ensure_ascii=False, indent=2) + "\n")


def train(tc: TrainConfig, out_dir: str | os.PathLike, model_kwargs: Mapping[str, Any] | None = None,
          overwrite: bool = False, verbose: int | str = "auto") -> dict[str, Any]:
    """Train (or resume) a run; returns the final validation scores per output and timings.

    `model_kwargs` are ResICConfig fields other than `tasks` and `vocab_size` (arch, filters,
    max_len, ...); `ngram_buckets` and `ngram_rate` left out or None follow the number of
    training rows (`default_ngram_table`); `nested_tasks` left out or None are found in the
    training rows (`resic_tf.nesting`; none in a streamed run). Re-running the same call after a crash resumes from the last finished epoch.
    `verbose`: "auto" (Keras's progress bar on a terminal) or 1, plus one summary line per epoch;
    0 prints only the summary lines; -1 prints nothing.
    """
    model_kwargs = dict(model_kwargs or {})
    out = Path(out_dir)
    # First: MultiWorkerMirrored configures collective ops, which TensorFlow allows only before
    # its first op runs.
    strategy = get_strategy(tc.strategy)
    # Only the chief (worker 0) writes the run directory; another worker keeps just its own
    # BackupAndRestore directory, so that it can resume too.
    worker = worker_index(strategy)
    chief = worker == 0
    backup_dir = out / (BACKUP_DIR if chief else f"{BACKUP_DIR}-worker-{worker}")
    resuming = _check_resume(out, tc, model_kwargs, overwrite) if chief else \
        backup_dir.exists() and not overwrite
    # Check data and model settings before touching `out`: a typo must neither delete the run that
    # --overwrite would replace nor leave an unfinished run that blocks the corrected command.
    data = training_data(tc, out, progress=(verbose != -1 and chief) and
                         ("lines" if verbose == 0 else True))
    tasks, vocab = data.tasks, data.vocabulary
    # The table's size and rate follow the data when not given; the run keeps what was given, so
    # that the same command resumes it.
    table = {k: v for k, v in default_ngram_table(data.train_rows).items()
             if model_kwargs.get(k) is None}
    if model_kwargs.get("nested_tasks") is None:  # found in the rows (a streamed run: none)
        table["nested_tasks"] = {} if data.ids is None else find_nested_tasks(tasks, data.ids[0])
        if verbose != -1 and chief:
            for coarse, spec in table["nested_tasks"].items():
                print(f"Task {coarse!r} is derived from {spec['from']!r} at every exit: each "
                      f"{spec['from']!r} class occurs with one {coarse!r} class in the training "
                      "rows (--nested-tasks off keeps its own predictions)", flush=True)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, **{**model_kwargs, **table})
    if tc.wide_epochs and not config.late_fusion:
        raise InvalidValueError(f"The wide stage trains a late-fusion model's wide branch "
                                f"(wide_fusion='late', ngram_buckets > 0). Received: "
                                f"wide_epochs={tc.wide_epochs}, wide_fusion="
                                f"{config.wide_fusion!r}, ngram_buckets={config.ngram_buckets}")
    linear = vocabulary = None
    if config.linear_ngrams:  # the model's vocabulary holds the n-grams found, at most as many
        start = time.perf_counter()
        vocabulary, linear = linear_vocabulary(config, vocab, data.training_rows(tc))
        linear["seconds"] = round(time.perf_counter() - start, 1)
        config = replace(config, linear_ngrams=vocabulary.max_ngrams)
    state = {"status": "training", "train_config": tc.to_dict(), "model_kwargs": model_kwargs}
    if resuming and chief and "linear_branch" in (stored := read_json(out / STATE_FILE)):
        state["linear_branch"] = stored["linear_branch"]  # the first process's fit, kept
    # From here until fit returns, Ctrl-C is taken at the next safe point (between steps, never
    # inside TensorFlow or a callback's write); a second Ctrl-C stops at once.
    with deferred_interrupt() as interrupt:
        if not chief:
            if overwrite:
                shutil.rmtree(backup_dir, ignore_errors=True)
        else:
            if overwrite and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            _write_state(out, state)

        keras.utils.set_random_seed(tc.seed)
        with strategy.scope():
            model = build_model(config, vocab)
        if chief:
            Run(config, tc, vocab, model, validation=data.validation).save(out, model=False)
            data.place_validation(out / VALIDATION_FILE)
        train_ds, val_ds = data.datasets(
            tc, config, out / VALIDATION_FILE if chief else data.staged_validation)
        # Every worker, resuming or not: under MultiWorkerMirrored the workers agree on the epoch.
        commit = restore_point(backup_dir, strategy)
        if tc.wide_epochs and commit is None:  # trains the wide branch, then freezes it
            with strategy.scope():
                losses = train_wide_stage(model, train_ds, tc.wide_epochs,
                                          tc.wide_learning_rate, data.steps_per_epoch(tc),
                                          [StopOnInterrupt(interrupt)])
            if verbose != -1:
                print(f"Wide stage: {tc.wide_epochs} epochs by SGD, loss "
                      f"{losses[0]:.4f} -> {losses[-1]:.4f}; the wide branch is frozen",
                      flush=True)
        elif tc.wide_epochs:  # resumed: the weights come back from the backup, frozen as saved
            model.freeze_wide()
        if config.linear_ngrams and commit is None:  # resumed: it comes back from the backup
            start = time.perf_counter() - linear["seconds"]
            linear.update(train_linear_branch(model, data.training_rows(tc), tc.linear_c,
                                              vocabulary))
            linear["seconds"] = round(time.perf_counter() - start, 1)
            state["linear_branch"] = linear
            if chief:
                _write_state(out, state)
            interrupt.check()
            if verbose != -1:
                fits = ", ".join(f"{t} {f['objective']:.4f}" for t, f in linear["tasks"].items())
                print(f"Linear branch: {linear['columns']} of {linear['seen']} n-grams in "
                      f"{linear['texts']} texts; logistic regression (C={tc.linear_c:g}) "
                      f"objective {fits}; {linear['seconds']} s", flush=True)
        with strategy.scope():
            weights = {task: count_weights(data.class_counts[task], tc.class_weighting)
                       for task in tasks} if tc.class_weighting != "none" else None
            model.compile(optimizer=make_optimizer(tc, data.steps_per_epoch(tc)),
                          label_smoothing=tc.label_smoothing, class_weights=weights,
                          distillation=tc.distillation, wide_loss=tc.wide_loss)
        tb_dir = out / TENSORBOARD_DIR
        if chief:
            callbacks = [
                ExitMetricsLogger(tb_dir / "exits", out / METRICS_FILE),
                AtomicModelCheckpoint(str(out / MODEL_FILE), save_best_only=tc.select == "best"),
                ResICTensorBoard(str(tb_dir)),
            ]
        else:  # the epoch scores only (every worker's logs hold the same, all-reduced, values)
            callbacks = [ExitMetricsLogger()]
        if tc.ema:
            first, before_backup = ema_callbacks()
            callbacks = [first, *callbacks, before_backup]
        callbacks.append(AtomicBackupAndRestore(backup_dir, restore=commit))
        fit_verbose = 0
        if verbose != -1:
            callbacks.insert(1, EpochSummary(tc.epochs))
            # the progress bar only on a terminal; logs get EpochSummary lines
            if verbose == "auto":
                fit_verbose = 1 if sys.stdout.isatty() else 0
            elif verbose:
                fit_verbose = 1
        callbacks.insert(0, StopOnInterrupt(interrupt))
        if resuming:
            if chief:  # what the killed process wrote after that commit runs again
                prune_after_commit(tb_dir, out / METRICS_FILE, commit)
            if verbose != -1:
                print(f"Resuming the unfinished run in {out} at epoch "
                      f"{(commit['epoch'] if commit else 0) + 1}/{tc.epochs}", flush=True)
        interrupt.check()  # a Ctrl-C during the set-up stops here, before the first step
        start = time.perf_counter()
        history = model.fit(train_ds, validation_data=val_ds, epochs=tc.epochs,
                            callbacks=callbacks, steps_per_epoch=tc.steps_per_epoch,
                            verbose=fit_verbose)
    seconds = time.perf_counter() - start
    fitted = {"fit_seconds": round(seconds, 1), "replicas": int(strategy.num_replicas_in_sync),
              "epochs_run": history.epoch[-1] + 1 if history.epoch else tc.epochs,
              "epochs_this_process": len(history.epoch)}
    if not chief:
        if data.staged_validation is not None:  # a streamed run's copy of the validation rows
            data.staged_validation.unlink(missing_ok=True)
        return {**state, "status": "finished", "worker": worker, **fitted}

    best_run = Run.load(out)
    best, shares = best_run.model, {}
    if best.late_fusion and not config.linear_ngrams:
        # the wide classifier's share of each exit, on the validation rows (a linear branch's
        # model keeps its fixed thirds: `ResICConfig.wide_weight`, unless the mix below)
        shares = {"wide_shares": calibrate_shares(best_run)}
    elif best.late_fusion and tc.linear_mix == "auto":
        # thirds, or a log-linear mix where the validation rows prove it better (per task)
        shares = {"linear_mix": calibrate_mix(best_run)}
    if shares:
        with atomic_path(out / MODEL_FILE) as tmp:
            best.save(tmp)
    result = best.evaluate(val_ds, verbose=0, return_dict=True)
    scores = {name: {"accuracy": float(result[f"{name}_accuracy"]),
                     "macro_f1": float(result[f"{name}_macro_f1"])}
              for task in config.tasks for name in config.exit_names(task)}
    summary = {**state, "status": "finished",
               "train_rows": data.train_rows, "val_rows": data.val_rows,
               "params": int(model.count_params()), **fitted, **shares,
               "final_val_scores": scores}
    _write_state(out, summary)
    atomic_write_text(out / FINAL_EXITS_FILE, final_exit_table(config, scores) + "\n")
    run = Run(config, tc, vocab, best, path=out)
    lcs = [config.exit_names(task)[-1] for task in config.tasks]
    run.record_scores({f"validation/{name}_{m}": scores[name][m]
                       for name in lcs for m in ("accuracy", "macro_f1")})
    return summary
