"""Training on files larger than memory: one chunked pass, then batches streamed every epoch.

`scan_training_file` reads the training file once, a chunk at a time: each task's classes, the
character counts of the training rows (the vocabulary), each class's training count (class
weights) and the validation rows, chosen by a stable hash of the row (`validation_mask`) and
written to a Parquet file chunk by chunk. `streaming_dataset` then reads the file again every
epoch through `tf.data` (a shuffle buffer of `shuffle_buffer` rows, batches grouped by length
when asked), so memory stays bounded by the buffer whatever the file's size.

The hash split is deterministic (same file, seed and `val_split`, same rows) and needs no full
load; identical rows always fall on the same side, so a duplicated row never sits in both.
Unlike the in-memory split it is not stratified: a class with a handful of rows may miss the
validation side.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from resic_tf.data import (DEFAULT_CHUNK_ROWS, DataError, LabelledTexts, iter_labelled_chunks,
                           sorted_labels)
from resic_tf.io import ParquetAppender
from resic_tf.preprocessor import window_batches
from resic_tf.progress import Progress
from resic_tf.vocabulary import count_chars

DEFAULT_SHUFFLE_BUFFER = 65536
_SEP = "\x1f"  # between a row's text and labels in its hash


def validation_mask(rows: LabelledTexts, val_split: float, seed: int) -> np.ndarray:
    """True for the rows of `rows` that belong to validation: the row's text and labels hashed
    (BLAKE2b keyed by `seed`) to a number in [0, 1) below `val_split`. Deterministic and
    independent of the other rows, so any chunk of a file gives the same answer."""
    key = int(seed).to_bytes(8, "little")
    label_lists = list(rows.labels.values())
    out = np.empty(len(rows), bool)
    limit = val_split * 2.0 ** 64
    for i, text in enumerate(rows.texts):
        h = hashlib.blake2b(_SEP.join([text, *(v[i] for v in label_lists)]).encode("utf-8",
                            "surrogatepass"), digest_size=8, key=key)
        out[i] = int.from_bytes(h.digest(), "little") < limit
    return out


@dataclass
class TableScan:
    """What one pass over a training file found (`scan_training_file`)."""

    source: str
    rows: int = 0
    train_rows: int = 0
    val_rows: int = 0
    classes: dict[str, list[str]] = field(default_factory=dict)
    train_counts: dict[str, Counter] = field(default_factory=dict)
    chars: Counter = field(default_factory=Counter)

    def class_counts(self, task: str) -> np.ndarray:
        """Training rows per class of `task`, in the order of `classes[task]`."""
        return np.array([self.train_counts[task][c] for c in self.classes[task]], np.int64)


def scan_training_file(data: str | os.PathLike, text_col: str, label_cols: Sequence[str],
                       val_out: str | os.PathLike, val_data: str | os.PathLike | None = None,
                       val_split: float = 0.1, seed: int = 42,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool | str = True,
                       ) -> TableScan:
    """One chunked pass over `data` (and `val_data`): classes, character and class counts of the
    training rows, and the validation rows written to `val_out` (Parquet, the run's
    `validation.parquet` columns). Without `val_data`, `validation_mask` holds rows out."""
    label_cols = list(label_cols)
    scan = TableScan(str(data), train_counts={c: Counter() for c in label_cols})
    seen = {c: Counter() for c in label_cols}
    writer = ParquetAppender(Path(val_out))
    try:
        with Progress(f"reading {data}", enabled=progress) as bar:
            for chunk in iter_labelled_chunks(data, text_col, label_cols, chunk_rows):
                scan.rows += len(chunk)
                for c in label_cols:
                    seen[c].update(chunk.labels[c])
                if val_data is None:
                    held = validation_mask(chunk, val_split, seed)
                    writer.add(chunk.subset(np.flatnonzero(held)).to_frame(text_col))
                    chunk = chunk.subset(np.flatnonzero(~held))
                scan.train_rows += len(chunk)
                for c in label_cols:
                    scan.train_counts[c].update(chunk.labels[c])
                scan.chars.update(count_chars(chunk.texts))
                bar.update(scan.rows - bar.done)
        # Classes come from the whole training file, so a class the split sent only to
        # validation is still known.
        scan.classes = {c: sorted_labels(seen[c]) for c in label_cols}
        for c, classes in scan.classes.items():
            if len(classes) < 2:
                raise DataError(data, f"label column needs at least 2 classes, found {classes}",
                                column=c)
        if val_data is not None:
            with Progress(f"reading {val_data}", enabled=progress) as bar:
                for chunk in iter_labelled_chunks(val_data, text_col, label_cols, chunk_rows):
                    _check_known(chunk, scan.classes)
                    writer.add(chunk.to_frame(text_col))
                    bar.update(len(chunk))
    finally:
        writer.close()
    scan.val_rows = writer.rows
    if scan.val_rows == 0 or scan.train_rows == 0:
        raise DataError(data, f"val_split={val_split} of {scan.rows} rows leaves an empty "
                        "train or validation set")
    return scan


def _check_known(chunk: LabelledTexts, classes: Mapping[str, Sequence[str]]) -> None:
    for task, known in classes.items():
        known = set(known)
        for i, label in enumerate(chunk.labels[task]):
            if label not in known:
                raise DataError(chunk.source, f"label {label!r} was not seen in training; known "
                                f"labels are {list(classes[task])}", row=chunk.first_row + i,
                                column=task)


def _encoded_chunks(path, text_col: str, tasks: Mapping[str, Sequence[str]], part: str,
                    val_split: float, seed: int, chunk_rows: int, sort: bool
                    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(UTF-8 texts, task -> class ids) of each chunk's `part` rows ("train", "val", "all")."""
    index = {t: {c: i for i, c in enumerate(classes)} for t, classes in tasks.items()}
    for chunk in iter_labelled_chunks(path, text_col, list(tasks), chunk_rows):
        if part != "all":
            held = validation_mask(chunk, val_split, seed)
            chunk = chunk.subset(np.flatnonzero(held if part == "val" else ~held))
        if len(chunk) == 0:
            continue
        texts = chunk.texts
        order = np.argsort([len(t) for t in texts], kind="stable") if sort else \
            np.arange(len(texts))
        try:
            ids = {t: np.array([index[t][chunk.labels[t][i]] for i in order], np.int64)
                   for t in tasks}
        except KeyError as e:
            raise DataError(path, f"label {e.args[0]!r} was not seen in training") from None
        yield np.array([texts[i].encode("utf-8") for i in order], dtype=object), ids


def streaming_dataset(path: str | os.PathLike, text_col: str,
                      tasks: Mapping[str, Sequence[str]], batch_size: int, *, part: str = "all",
                      rows: int | None = None, val_split: float = 0.1, seed: int = 42,
                      shuffle_buffer: int = 0, by_length: bool = False, window: int = 64,
                      chunk_rows: int = 8192) -> tf.data.Dataset:
    """Batches `(texts, {task: class ids})` read from `path` a chunk at a time, every epoch anew.

    `part` picks the rows (`validation_mask` decides "train" and "val"; "all" takes every row).
    `shuffle_buffer` > 0 shuffles through a buffer of that many rows, freshly every epoch;
    `by_length` then groups rows of similar length into batches (as `string_dataset` does);
    without shuffling, each chunk is sorted by length (for evaluation: a length-adaptive model's
    outputs do not depend on the batch). `rows`, when known (`scan_training_file`), fixes the
    number of batches so Keras can count steps.
    """
    shuffle = shuffle_buffer > 0

    def generate():
        yield from _encoded_chunks(path, text_col, tasks, part, val_split, seed, chunk_rows,
                                   sort=not shuffle)

    spec = (tf.TensorSpec([None], tf.string), {t: tf.TensorSpec([None], tf.int64) for t in tasks})
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec).unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if shuffle and by_length:
        ds = window_batches(ds, batch_size, window, seed)
    else:
        ds = ds.batch(batch_size)
    if rows is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-rows // batch_size)))
    options = tf.data.Options()
    # A generator has no files to shard: under MultiWorkerMirrored each worker keeps its share
    # of the batches.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
