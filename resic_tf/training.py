"""Training a Res-IC model with `model.fit` into a run directory, resumable after a crash.

The run directory's files are `resic_tf.run`'s; training writes the small ones first (so a
crashed run resumes identically), `model.keras` through its checkpoint callback, and the final
summary (`run.json`, `final_exits.md`) last.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from resic_tf.callbacks import (AtomicModelCheckpoint, EpochSummary, ExitMetricsLogger,
                                ResICTensorBoard, final_exit_table)
from resic_tf.config import STRATEGIES, ResICConfig, TrainConfig
from resic_tf.data import (DataError, LabelledTexts, encode_labels, load_labelled_texts,
                           sorted_labels, split_train_val)
from resic_tf.io import atomic_write_text, read_json
from resic_tf.losses import class_weights
from resic_tf.model import build_model
from resic_tf.preprocessor import string_dataset
from resic_tf.run import (BACKUP_DIR, FINAL_EXITS_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE,
                          TENSORBOARD_DIR, Run)
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
    """Adam or AdamW (`weight_decay`, decoupled; biases, norms and embeddings decay too)."""
    rate = learning_rate(tc, steps_per_epoch)
    if tc.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=tc.weight_decay)
    return keras.optimizers.Adam(rate)


def load_splits(tc: TrainConfig) -> tuple[LabelledTexts, LabelledTexts, dict[str, list[str]]]:
    """The training rows, validation rows and each task's classes that `tc` trains on: the
    validation file, or the seeded stratified hold-out of `val_split`."""
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
    same = state.get("train_config") == tc.to_dict() and state.get("model_kwargs") == \
        json.loads(json.dumps(dict(model_kwargs)))
    if not same:
        raise InvalidValueError(f"{out} holds an unfinished run with other settings; resume it "
                                "with the same command, or pass --overwrite to start again")
    return True


def _write_state(out: Path, state: Mapping[str, Any]) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, ensure_ascii=False, indent=2) + "\n")


def train(tc: TrainConfig, out_dir: str | os.PathLike, model_kwargs: Mapping[str, Any] | None = None,
          overwrite: bool = False, verbose: int | str = "auto") -> dict[str, Any]:
    """Train (or resume) a run; returns the final validation scores per output and timings.

    `model_kwargs` are ResICConfig fields other than `tasks` and `vocab_size` (arch, filters,
    max_len, ...). Re-running the same call after a crash resumes from the last finished epoch.
    `verbose`: "auto" (Keras's progress bar on a terminal) or 1, plus one summary line per epoch;
    0 prints only the summary lines; -1 prints nothing.
    """
    model_kwargs = dict(model_kwargs or {})
    out = Path(out_dir)
    resuming = _check_resume(out, tc, model_kwargs, overwrite)
    # Check data and model settings before touching `out`: a typo must neither delete the run that
    # --overwrite would replace nor leave an unfinished run that blocks the corrected command.
    train_data, val_data, tasks = load_splits(tc)
    val_ids = encode_labels(val_data, tasks)
    train_ids = encode_labels(train_data, tasks)
    vocab = CharVocabulary.build(train_data.texts, min_freq=tc.min_char_freq)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, **model_kwargs)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"status": "training", "train_config": tc.to_dict(), "model_kwargs": model_kwargs}
    _write_state(out, state)

    keras.utils.set_random_seed(tc.seed)
    strategy = get_strategy(tc.strategy)
    with strategy.scope():
        model = build_model(config, vocab)
        weights = {task: class_weights(train_ids[task], len(classes), tc.class_weighting)
                   for task, classes in tasks.items()} if tc.class_weighting != "none" else None
        model.compile(optimizer=make_optimizer(tc, -(-len(train_data) // tc.batch_size)),
                      label_smoothing=tc.label_smoothing, class_weights=weights,
                      distillation=tc.distillation, wide_loss=tc.wide_loss)
    Run(config, tc, vocab, model, validation=val_data).save(out, model=False)
    # Raw strings in; the model maps its preprocessor over the batches inside tf.data.
    # A length-adaptive model trains on batches of similar lengths (fresh ones every epoch).
    train_ds = string_dataset(train_data.texts, train_ids, tc.batch_size, shuffle=True,
                              seed=tc.seed, by_length=tc.groups_by_length(config))
    val_ds = string_dataset(val_data.texts, val_ids, tc.batch_size,
                            by_length=config.length_adaptive)
    tb_dir = out / TENSORBOARD_DIR
    callbacks = [
        ExitMetricsLogger(tb_dir / "exits", out / METRICS_FILE),
        AtomicModelCheckpoint(str(out / MODEL_FILE), save_best_only=tc.select == "best"),
        ResICTensorBoard(str(tb_dir)),
        keras.callbacks.BackupAndRestore(str(out / BACKUP_DIR), double_checkpoint=True),
    ]
    fit_verbose = 0
    if verbose != -1:
        callbacks.insert(1, EpochSummary(tc.epochs))
        if verbose == "auto":  # the progress bar only on a terminal; logs get EpochSummary lines
            fit_verbose = 1 if sys.stdout.isatty() else 0
        elif verbose:
            fit_verbose = 1
    if resuming and verbose != -1:
        print(f"Resuming the unfinished run in {out}")
    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=tc.epochs, callbacks=callbacks,
                        verbose=fit_verbose)
    seconds = time.perf_counter() - start

    best = Run.load(out).model
    result = best.evaluate(val_ds, verbose=0, return_dict=True)
    scores = {name: {"accuracy": float(result[f"{name}_accuracy"]),
                     "macro_f1": float(result[f"{name}_macro_f1"])}
              for task in config.tasks for name in config.exit_names(task)}
    summary = {**state, "status": "finished",
               "train_rows": len(train_data), "val_rows": len(val_data),
               "params": int(model.count_params()), "fit_seconds": round(seconds, 1),
               "replicas": int(strategy.num_replicas_in_sync),
               "epochs_run": history.epoch[-1] + 1 if history.epoch else tc.epochs,
               "epochs_this_process": len(history.epoch), "final_val_scores": scores}
    _write_state(out, summary)
    atomic_write_text(out / FINAL_EXITS_FILE, final_exit_table(config, scores) + "\n")
    run = Run(config, tc, vocab, best, path=out)
    lcs = [config.exit_names(task)[-1] for task in config.tasks]
    run.record_scores({f"validation/{name}_{m}": scores[name][m]
                       for name in lcs for m in ("accuracy", "macro_f1")})
    return summary
