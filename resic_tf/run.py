"""The run directory: the one module that knows its files, and reads and writes them.

A run directory holds:
    config.json          the model (`ResICConfig`)
    train_config.json    how it was trained (`TrainConfig`)
    vocab.json           the characters (`CharVocabulary`)
    validation.parquet   the validation rows used (text column + label columns)
    model.keras          the classifier, with its preprocessor: predicts raw strings
    gate.json            the length gate, after `resic calibrate`
    policies/NAME.json   an early-exit policy, after `resic calibrate --policy NAME`
    metrics.csv          per epoch and output: validation accuracy and macro-F1
    run.json             training state ("training" / "finished") and the final summary
    final_exits.md       the final per-exit validation table
    tensorboard/         Keras's train/ and validation/ curves, exits/ per-exit scalars
    backup/              atomic BackupAndRestore commits while training runs (removed on success;
                         worker N of a MultiWorkerMirrored run keeps its own backup-worker-N/)

`Run.save(dir)` writes what a run has; `Run.load(dir)` reads it back. Training, the gate,
evaluation, analysis and export take a `Run` (or a model) plus data.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from resic_tf.config import ResICConfig, TrainConfig, wide_exit_name
from resic_tf.data import (DEFAULT_CHUNK_ROWS, LabelledTexts, encode_labels, iter_labelled_chunks,
                           load_labelled_texts)
from resic_tf.gate import (DEFAULT_MIN_SUPPORT, LengthGate, calibrate, gate_markdown,
                           gated_predictions)
from resic_tf.io import atomic_path, atomic_write_text, read_json
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.model import ResICClassifier, build_preprocessor
from resic_tf.policies import (DEFAULT_BUDGET, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES,
                               DEFAULT_SEED, POLICIES, ExitPolicy, calibrate_policy)
from resic_tf.preprocessor import ResICPreprocessor
from resic_tf.progress import Progress
from resic_tf.tensorboard import CALIBRATION_DIR, run_hparams, write_hparams, write_text
from resic_tf.validation import InvalidValueError
from resic_tf.vocabulary import CharVocabulary, text_lengths

CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
VOCAB_FILE = "vocab.json"
VALIDATION_FILE = "validation.parquet"
MODEL_FILE = "model.keras"
GATE_FILE = "gate.json"
POLICIES_DIR = "policies"
METRICS_FILE = "metrics.csv"
STATE_FILE = "run.json"
FINAL_EXITS_FILE = "final_exits.md"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
REQUIRED_FILES = (CONFIG_FILE, TRAIN_CONFIG_FILE, VOCAB_FILE, MODEL_FILE)


class RunDirectoryError(InvalidValueError, FileNotFoundError):
    """A directory that is not (or not yet) a finished run."""


@dataclasses.dataclass
class Run:
    """A trained run: model, configs, vocabulary, validation rows and (after calibration) gate."""

    config: ResICConfig
    train_config: TrainConfig
    vocabulary: CharVocabulary
    model: ResICClassifier | None = None
    validation: LabelledTexts | None = None
    gate: LengthGate | None = None
    path: Path | None = None
    policies: dict[str, ExitPolicy] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.model is not None and self.model.preprocessor is None:
            # Runs saved before the preprocessor was part of the model: attach it from vocab.json.
            self.model.preprocessor = self._new_preprocessor()

    @property
    def preprocessor(self) -> ResICPreprocessor:
        if self.model is not None:
            return self.model.preprocessor
        return self._new_preprocessor()

    def _new_preprocessor(self) -> ResICPreprocessor:
        return build_preprocessor(self.config, self.vocabulary.chars)

    def file(self, name: str) -> Path:
        if self.path is None:
            raise InvalidValueError("This run has no directory yet; call `run.save(directory)`")
        return self.path / name

    def save(self, directory: str | os.PathLike, model: bool = True) -> "Run":
        """Write every part this run has into `directory` (atomically, file by file).

        `model=False` writes only the small files (training writes `model.keras` through its
        checkpoint callback).
        """
        self.path = Path(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.save(self.path / CONFIG_FILE)
        self.train_config.save(self.path / TRAIN_CONFIG_FILE)
        self.vocabulary.save(self.path / VOCAB_FILE)
        if self.validation is not None:
            with atomic_path(self.path / VALIDATION_FILE) as tmp:
                self.validation.to_frame(self.train_config.text_col).to_parquet(tmp, index=False)
        if self.gate is not None:
            self.gate.save(self.path / GATE_FILE)
        for name, policy in self.policies.items():
            (self.path / POLICIES_DIR).mkdir(exist_ok=True)
            policy.save(self.path / POLICIES_DIR / f"{name}.json")
        if model and self.model is not None:
            with atomic_path(self.path / MODEL_FILE) as tmp:
                self.model.save(tmp)
        return self

    @classmethod
    def load(cls, directory: str | os.PathLike, model_file: str = MODEL_FILE,
             skip: Sequence[str] = ()) -> "Run":
        """Read a run directory (also one written by resic_tf 0.1). `skip` names calibrations
        not to read (`length`: gate.json; a policy: policies/NAME.json), because they are about to
        be made again: a truncated file must not stop its own repair."""
        path = Path(directory)
        for name in (*REQUIRED_FILES[:-1], model_file):
            if not (path / name).exists():
                raise RunDirectoryError(f"{path} is not a finished run directory: {name} is "
                                        "missing")
        config = ResICConfig.load(path / CONFIG_FILE)
        train_config = TrainConfig.load(path / TRAIN_CONFIG_FILE)
        try:
            model = keras.saving.load_model(path / model_file)
        except (OSError, ValueError, KeyError) as e:  # zip, h5 and config errors of a bad file
            raise InvalidValueError(f"{path / model_file}: cannot load the model ({type(e).__name__}"
                                    f": {str(e).splitlines()[0] if str(e) else ''}); the file is "
                                    "truncated or from another program") from None
        validation = None
        if (path / VALIDATION_FILE).exists():
            validation = load_labelled_texts(path / VALIDATION_FILE, train_config.text_col,
                                             train_config.label_cols)
        gate = None
        if (path / GATE_FILE).exists() and "length" not in skip:
            gate = LengthGate.load(path / GATE_FILE)
        policies = {p.stem: ExitPolicy.load(p) for p in sorted((path / POLICIES_DIR).glob("*.json"))
                    if p.stem in POLICIES and p.stem != "length" and p.stem not in skip}
        return cls(config, train_config, CharVocabulary.load(path / VOCAB_FILE), model,
                   validation, gate, path, policies)

    def policy(self, name: str = "length") -> ExitPolicy:
        """The calibrated early-exit policy `name` (`length`: the gate), checked against the
        model; a clear error says which `resic calibrate` makes it."""
        where = self.path or "the run"
        if name == "length":
            if self.gate is None:
                raise RunDirectoryError(f"{where} has no {GATE_FILE}: run `resic calibrate "
                                        f"{where}` first")
            self.gate.check(self.config)
            return ExitPolicy.from_gate(self.gate)
        if name not in self.policies:
            if name not in POLICIES:
                raise InvalidValueError(f"policy must be one of {list(POLICIES)}. Received: "
                                        f"policy={name!r}")
            raise RunDirectoryError(f"{where} has no {POLICIES_DIR}/{name}.json: run `resic "
                                    f"calibrate {where} --policy {name}` first")
        self.policies[name].check(self.config)
        return self.policies[name]

    def calibration_predictions(self, data: str | os.PathLike | None = None,
                                batch_size: int = 256,
                                progress: bool = False) -> FilePredictions:
        """Every exit's predictions on `data` (default: the run's own validation rows): what
        `calibrate` and `calibrate_policy` choose on. Make them once and pass them to both
        when calibrating several policies on the same rows."""
        return predict_file(self, self._calibration_rows(data)[0], batch_size, progress=progress)

    def calibrate(self, data: str | os.PathLike | None = None, bucket_width: int = 10,
                  metric: str = "macro_f1", min_support: int = DEFAULT_MIN_SUPPORT,
                  batch_size: int = 256, progress: bool = False,
                  predictions: FilePredictions | None = None) -> LengthGate:
        """Choose the length gate on `data` (default: the run's own validation rows), keep it as
        `self.gate` and write `gate.json`. Never pass test data: the gate would be tuned on what
        it is judged on. `predictions`: `calibration_predictions(data)`, if already made."""
        source = self._calibration_rows(data)[1]
        p = predictions or self.calibration_predictions(data, batch_size, progress)
        gate = calibrate(self.config, p.probs, p.labels, p.lengths, bucket_width, metric,
                         min_support)
        self.gate = dataclasses.replace(gate, details={**gate.details, "_source": source})
        if self.path is not None:
            self.gate.save(self.file(GATE_FILE))
            write_text(self.file(TENSORBOARD_DIR) / CALIBRATION_DIR,
                       {f"gate/{t}": gate_markdown(self.gate, t) for t in self.config.tasks})
            # The gate scored on the rows it was chosen on: optimistic, and labelled so.
            scores = {}
            for task, classes in self.config.tasks.items():
                pred = gated_predictions(self.gate, task, p.probs[task], p.lengths)[0].argmax(-1)
                scores[f"calibration/{task}_gate_macro_f1"] = macro_f1(p.labels[task], pred,
                                                                        len(classes))
                scores[f"calibration/{task}_gate_accuracy"] = accuracy(p.labels[task], pred)
            self.record_scores(scores)
        return self.gate

    def calibrate_policy(self, name: str, data: str | os.PathLike | None = None,
                         budget: float = DEFAULT_BUDGET, metric: str = "macro_f1",
                         bucket_width: int = 10, min_support: int = DEFAULT_MIN_SUPPORT,
                         batch_size: int = 256, progress: bool = False,
                         confidence: float = DEFAULT_CONFIDENCE,
                         resamples: int = DEFAULT_RESAMPLES,
                         seed: int = DEFAULT_SEED,
                         predictions: FilePredictions | None = None,
                         wide_exit: bool | None = None) -> ExitPolicy:
        """Choose policy `name`'s thresholds on `data` (default: the run's validation rows) so
        that each task's `metric` stays within `budget` points of its LC's at the least compute
        (and, unless `confidence` is 0, within it in all but the worst `1 - confidence` of
        `resamples` paired bootstrap resamples drawn with `seed`: `calibrate_policy`); keep it
        in `self.policies` and write `policies/NAME.json`. `length` is the gate: calibrate it
        first (`calibrate`). `predictions`: `calibration_predictions(data)`, if already made.
        `wide_exit`: may rows stop at a late-fusion model's wide classifier (default: yes, for
        every policy but `length`)."""
        source = self._calibration_rows(data)[1]
        p = predictions or self.calibration_predictions(data, batch_size, progress)
        policy = calibrate_policy(self.config, name, p.probs, p.labels, p.lengths, budget,
                                  metric, bucket_width, min_support,
                                  self.gate if name == "length" else None,
                                  confidence=confidence, resamples=resamples, seed=seed,
                                  wide_exit=wide_exit)
        policy = dataclasses.replace(policy, calibration={**policy.calibration,
                                                          "calibration_data": source})
        self.policies[name] = policy
        if self.path is not None:
            if name != "length":  # the length policy's file is gate.json
                (self.path / POLICIES_DIR).mkdir(exist_ok=True)
                policy.save(self.file(POLICIES_DIR) / f"{name}.json")
            v = policy.calibration["validation"]
            self.record_scores({f"calibration/policy_{name}_saved": v["saved"],
                                f"calibration/policy_{name}_mean_blocks": v["mean_blocks_run"],
                                **{f"calibration/policy_{name}_{t}_macro_f1": r["macro_f1"]
                                   for t, r in v["tasks"].items()}})
        return policy

    def _calibration_rows(self, data):
        """(`data`, its name), or the run's own validation rows (an in-memory run too) when
        `data` is None."""
        if data is not None:
            return data, str(data)
        if self.validation is None:
            raise RunDirectoryError(f"{VALIDATION_FILE} is missing: pass validation data")
        return self.validation, (str(self.file(VALIDATION_FILE)) if self.path is not None
                                 else "validation rows (in memory)")

    def record_scores(self, scores: dict[str, float]) -> None:
        """Add final scores (`section/name` -> value) to `run.json` and rewrite the run's row of
        TensorBoard's HParams dashboard (settings + every score recorded so far)."""
        state_path = self.file(STATE_FILE)
        state = read_json(state_path) if state_path.exists() else {}
        state.setdefault("scores", {}).update({k: float(v) for k, v in scores.items()})
        atomic_write_text(state_path, json.dumps(state, ensure_ascii=False, indent=2) + "\n")
        write_hparams(self.file(TENSORBOARD_DIR), run_hparams(self.config, self.train_config),
                      state["scores"], trial_id=str(self.path.resolve()))


def predict_exits(model: ResICClassifier, texts: Sequence[str],
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """Probabilities of every exit: task -> float32 array `(n, num_exits, classes)`, exits shallow
    to deep (`ic1`..`icN`, `lc`); for a late-fusion model also `wide_exit_name(task)` -> `(n,
    classes)`, its wide classifier (exit 0, where early-exit policies may stop before the
    first block)."""
    if len(texts) == 0:
        out = {t: np.zeros((0, model.num_exits, len(c)), np.float32)
               for t, c in model.tasks.items()}
        if model.late_fusion:
            out.update({wide_exit_name(t): np.zeros((0, len(c)), np.float32)
                        for t, c in model.tasks.items()})
        return out
    probs = model.predict(list(texts), batch_size=batch_size, verbose=0)
    out = {task: np.stack([probs[name] for name in model.exit_names(task)], axis=1)
           for task in model.tasks}
    if model.late_fusion:
        out.update(predict_wide(model, texts, batch_size))
    return out


def predict_wide(model: ResICClassifier, texts: Sequence[str],
                 batch_size: int = 256) -> dict[str, np.ndarray]:
    """`wide_exit_name(task)` -> `(n, classes)`: a late-fusion model's wide classifier on raw
    texts (the n-gram branch alone: no convolution runs, so it costs a small part of a
    `predict`)."""
    fn = getattr(model, "_resic_wide_fn", None)
    if fn is None:
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def fn(text):
            ids = model.preprocessor(text)
            wide = model.backbone.wide(ids, model.backbone.padding_mask(ids))
            return model.wide_probabilities(wide)
        object.__setattr__(model, "_resic_wide_fn", fn)  # untracked by Keras
    texts = list(texts)
    parts = [fn(tf.constant(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
    return {wide_exit_name(t): np.concatenate([p[t].numpy() for p in parts]) for t in model.tasks}


@dataclasses.dataclass
class FilePredictions:
    """Every exit's predictions on a labelled file read with a run's columns (`rows` holds the
    texts only when asked for: a large file's texts need not stay in memory)."""

    size: int
    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    lengths: np.ndarray
    rows: LabelledTexts | None = None


def _chunks(data, tc: TrainConfig, chunk_rows: int):
    if not isinstance(data, LabelledTexts):
        yield from iter_labelled_chunks(data, tc.text_col, tc.label_cols, chunk_rows)
        return
    for start in range(0, max(len(data), 1), chunk_rows):
        chunk = data.subset(np.arange(start, min(start + chunk_rows, len(data))))
        yield dataclasses.replace(chunk, first_row=data.first_row + start)


def predict_file(run: Run, data: str | os.PathLike | LabelledTexts, batch_size: int = 256,
                 keep_texts: bool = False, on_chunk=None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 progress: bool = False, keep: bool = True) -> FilePredictions:
    """Read `data` with the run's text and label columns a chunk at a time, encode its labels
    with the run's classes and predict every exit; lengths are counted as the served graph
    counts them. `on_chunk(rows, labels, probs, lengths)` sees each chunk (to write results as
    they come). The labels, probabilities and lengths are kept (with `keep_texts`, the rows
    too); without `keep` nothing per row is (`on_chunk` consumes each chunk: memory stays
    bounded by one chunk, and the result holds only `size`)."""
    tc = run.train_config
    parts, texts, size = [], [], 0
    name = data.source if isinstance(data, LabelledTexts) else str(data)
    with Progress(f"predicting {name}", enabled=progress) as bar:
        for chunk in _chunks(data, tc, chunk_rows):
            labels = encode_labels(chunk, run.config.tasks)
            probs = predict_exits(run.model, chunk.texts, batch_size)
            lengths = text_lengths(chunk.texts)
            if on_chunk is not None:
                on_chunk(chunk, labels, probs, lengths)
            size += len(chunk)
            if keep:
                parts.append((labels, probs, lengths))
            if keep_texts:
                texts.append(chunk)
            bar.update(len(chunk))
    tasks = run.config.tasks
    rows = None
    if keep_texts:
        rows = LabelledTexts([t for c in texts for t in c.texts],
                             {col: [v for c in texts for v in c.labels[col]]
                              for col in tc.label_cols}, name)
    if not keep:
        return FilePredictions(size, {}, {}, np.zeros(0, np.int32), rows)
    join = lambda key, i: np.concatenate([p[i][key] for p in parts])  # noqa: E731
    return FilePredictions(size, {t: join(t, 0) for t in tasks},
                           {key: join(key, 1) for key in parts[0][1]},
                           np.concatenate([p[2] for p in parts]), rows)
