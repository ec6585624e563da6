"""Training a Res-IC model with `model.fit` into a run directory, resumable after a crash.

A run directory holds: `config.json` (ResICConfig), `train_config.json` (TrainConfig),
`vocab.json` (characters), `validation.parquet` (the validation rows actually used),
`model.keras`, `metrics.csv` (per epoch and output: validation accuracy and macro-F1),
`tensorboard/` (Keras's `train/` and `validation/` curves plus `exits/` per-exit scalars) and,
while training runs, `backup/` (Keras BackupAndRestore, removed on success).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from resic_tf.callbacks import (AtomicModelCheckpoint, EpochSummary, MacroF1Callback,
                                final_exit_table)
from resic_tf.config import ResICConfig
from resic_tf.data import (DataError, LabelledTexts, encode_labels, load_labelled_texts,
                           sorted_labels, split_train_val)
from resic_tf.io import atomic_path, atomic_write_text
from resic_tf.model import build_model, compile_model
from resic_tf.vocabulary import CharEncoder, CharVocabulary, text_dataset, text_lengths

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SELECTIONS = ("best", "last")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run was trained; saved as `train_config.json` so a crashed run resumes identically."""

    data: str
    text_col: str
    label_cols: tuple[str, ...]
    val_data: str | None = None
    val_split: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 42
    min_char_freq: int = 1
    select: str = "best"
    strategy: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "label_cols", tuple(self.label_cols))
        if not self.label_cols:
            raise ValueError("At least one label column is needed. Received: label_cols=()")
        if len(set(self.label_cols)) != len(self.label_cols) or self.text_col in self.label_cols:
            raise ValueError(f"Text and label columns must be distinct. Received: text_col="
                             f"{self.text_col!r}, label_cols={list(self.label_cols)}")
        for name in ("epochs", "batch_size", "min_char_freq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"`{name}` must be a positive integer. Received: {name}={v!r}")
            if v < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={v!r}")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, (int, float)) \
                or not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be a number > 0. Received: "
                             f"learning_rate={self.learning_rate!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"`select` must be one of {list(SELECTIONS)}. Received: "
                             f"select={self.select!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}. Received: "
                             f"strategy={self.strategy!r}")
        if self.val_data is None and not 0.0 < self.val_split < 1.0:
            raise ValueError(f"`val_split` must be in (0, 1). Received: val_split={self.val_split}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label_cols"] = list(self.label_cols)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return cls(**dict(d))


@dataclasses.dataclass
class Run:
    """A trained run directory, loaded."""

    path: Path
    config: ResICConfig
    train_config: TrainConfig
    vocabulary: CharVocabulary
    model: keras.Model

    @property
    def encoder(self) -> CharEncoder:
        return CharEncoder(self.vocabulary.chars, self.config.max_len)


def load_run(run_dir: str | os.PathLike, model_file: str = "model.keras") -> Run:
    run_dir = Path(run_dir)
    for name in ("config.json", "train_config.json", "vocab.json", model_file):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run directory: {name} is missing")
    with open(run_dir / "train_config.json", encoding="utf-8") as f:
        train_config = TrainConfig.from_dict(json.load(f))
    return Run(run_dir, ResICConfig.load(run_dir / "config.json"), train_config,
               CharVocabulary.load(run_dir / "vocab.json"),
               keras.saving.load_model(run_dir / model_file))


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """`auto`: MultiWorkerMirrored when TF_CONFIG is set, Mirrored on several GPUs, else default."""
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}. Received: {name!r}")
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


def _targets(config: ResICConfig, label_ids: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: label_ids[task] for task in config.tasks for name in config.exit_names(task)}


def _load_splits(tc: TrainConfig) -> tuple[LabelledTexts, LabelledTexts, dict[str, list[str]]]:
    data = load_labelled_texts(tc.data, tc.text_col, tc.label_cols)
    if tc.val_data is not None:
        val = load_labelled_texts(tc.val_data, tc.text_col, tc.label_cols)
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


def _check_resume(out: Path, tc: TrainConfig, model_kwargs: Mapping[str, Any], overwrite: bool):
    """A finished run is not overwritten; an unfinished one resumes only with the same settings."""
    state_file = out / "run.json"
    if not state_file.exists():
        if out.exists() and any(out.iterdir()):
            # --overwrite replaces runs only: it must never wipe a folder of other files.
            raise FileExistsError(f"{out} exists, is not empty and holds no run (no run.json); "
                                  "choose a new --out")
        return False
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("status") == "finished" and not overwrite:
        raise FileExistsError(f"{out} holds a finished run; choose a new --out or pass --overwrite")
    if overwrite:
        return False
    same = state.get("train_config") == tc.to_dict() and state.get("model_kwargs") == \
        json.loads(json.dumps(dict(model_kwargs)))
    if not same:
        raise ValueError(f"{out} holds an unfinished run with other settings; resume it with the "
                         f"same command, or pass --overwrite to start again")
    return True


def train(tc: TrainConfig, out_dir: str | os.PathLike, model_kwargs: Mapping[str, Any] | None = None,
          overwrite: bool = False, verbose: int | str = "auto") -> dict[str, Any]:
    """Train (or resume) a run; returns the final validation scores per output and timings.

    `model_kwargs` are ResICConfig fields other than `tasks` and `vocab_size` (arch, filters,
    max_len, ...). Re-running the same call after a crash resumes from the last finished epoch.
    """
    model_kwargs = dict(model_kwargs or {})
    out = Path(out_dir)
    resuming = _check_resume(out, tc, model_kwargs, overwrite)
    # Check data and model settings before touching `out`: a typo must neither delete the run that
    # --overwrite would replace nor leave an unfinished run that blocks the corrected command.
    train_data, val_data, tasks = _load_splits(tc)
    val_ids = encode_labels(val_data, tasks)
    train_ids = encode_labels(train_data, tasks)
    vocab = CharVocabulary.build(train_data.texts, min_freq=tc.min_char_freq)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, **model_kwargs)
    if overwrite and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", json.dumps(
        {"status": "training", "train_config": tc.to_dict(), "model_kwargs": model_kwargs},
        ensure_ascii=False, indent=2) + "\n")

    keras.utils.set_random_seed(tc.seed)
    config.save(out / "config.json")
    vocab.save(out / "vocab.json")
    atomic_write_text(out / "train_config.json",
                      json.dumps(tc.to_dict(), ensure_ascii=False, indent=2) + "\n")
    val_frame = val_data.to_frame(tc.text_col)
    with atomic_path(out / "validation.parquet") as tmp:
        val_frame.to_parquet(tmp, index=False)

    encoder = CharEncoder(vocab.chars, config.max_len)
    strategy = get_strategy(tc.strategy)
    with strategy.scope():
        model = build_model(config)
        compile_model(model, config, tc.learning_rate)
    train_ds = text_dataset(train_data.texts, encoder, tc.batch_size,
                            targets=_targets(config, train_ids), shuffle=True, seed=tc.seed)
    val_ds = text_dataset(val_data.texts, encoder, tc.batch_size,
                          targets=_targets(config, val_ids))
    val_inputs = text_dataset(val_data.texts, encoder, tc.batch_size)
    tb_dir = out / "tensorboard"
    f1 = MacroF1Callback(config, val_inputs, val_ids, log_dir=str(tb_dir / "exits"),
                         csv_path=str(out / "metrics.csv"))
    callbacks = [
        f1,
        AtomicModelCheckpoint(str(out / "model.keras"), save_best_only=tc.select == "best"),
        keras.callbacks.TensorBoard(str(tb_dir)),
        keras.callbacks.BackupAndRestore(str(out / "backup"), double_checkpoint=True),
    ]
    fit_verbose = verbose
    if verbose:
        callbacks.insert(1, EpochSummary(config, tc.epochs))
        if verbose == "auto":  # the progress bar only on a terminal; logs get EpochSummary lines
            fit_verbose = 1 if sys.stdout.isatty() else 0
    if resuming and verbose:
        print(f"Resuming the unfinished run in {out}")
    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=tc.epochs, callbacks=callbacks,
                        verbose=fit_verbose, shuffle=False)  # the dataset shuffles itself, seeded
    seconds = time.perf_counter() - start

    best = load_run(out).model
    f1.set_model(best)
    scores = f1.evaluate()
    summary = {"status": "finished", "train_config": tc.to_dict(), "model_kwargs": model_kwargs,
               "train_rows": len(train_data), "val_rows": len(val_data),
               "params": int(model.count_params()), "fit_seconds": round(seconds, 1),
               "replicas": int(strategy.num_replicas_in_sync),
               "epochs_run": history.epoch[-1] + 1 if history.epoch else tc.epochs,
               "epochs_this_process": len(history.epoch), "final_val_scores": scores}
    atomic_write_text(out / "run.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "final_exits.md", final_exit_table(config, scores) + "\n")
    return summary


def predict_exits(run: Run, texts, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Probabilities of every exit: task -> float32 array `(n, num_exits, classes)`, exits shallow
    to deep (`ic1`..`icN`, `lc`)."""
    if len(texts) == 0:
        return {t: np.zeros((0, run.config.num_exits, len(c)), np.float32)
                for t, c in run.config.tasks.items()}
    probs = run.model.predict(text_dataset(list(texts), run.encoder, batch_size), verbose=0)
    return {task: np.stack([probs[name] for name in run.config.exit_names(task)], axis=1)
            for task in run.config.tasks}


@dataclasses.dataclass
class FilePredictions:
    """A labelled file read with a run's columns, and every exit's predictions on it."""

    rows: LabelledTexts
    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    lengths: np.ndarray


def predict_file(run: Run, data: str | os.PathLike, batch_size: int = 256) -> FilePredictions:
    """Read `data` with the run's text and label columns, encode its labels with the run's
    classes, and predict every exit; lengths are counted as the served graph counts them."""
    tc = run.train_config
    rows = load_labelled_texts(data, tc.text_col, tc.label_cols)
    labels = encode_labels(rows, run.config.tasks)
    return FilePredictions(rows, labels, predict_exits(run, rows.texts, batch_size),
                           text_lengths(rows.texts))
