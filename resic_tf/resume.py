"""Resuming a killed or interrupted run so that every epoch is recorded exactly once.

`AtomicBackupAndRestore` commits an epoch atomically and records when (`committed_at`). A killed
process may have written more after its last commit: the next epoch's rows in `metrics.csv`,
its TensorBoard scalars and images. The resumed process runs that epoch again, so before it
starts, `prune_after_commit` drops

    metrics.csv rows of epochs after the last committed one, and
    TensorBoard events written after the commit (`wall_time > committed_at`; all of them when no
    epoch was committed) from the event files of the training curves (`train/`, `validation/`,
    `exits/`), each rewritten atomically.

Every event of an epoch is written (and flushed) before that epoch's commit, and every later
one after it, on the same machine's clock, so the wall time separates them; the step would not
for `evaluation_*_vs_iterations` (optimizer steps) nor for the graph.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from resic_tf.callbacks import METRICS_CSV_FIELDS, read_backup_metadata
from resic_tf.io import atomic_write_text

# The TensorBoard sub-directories that `model.fit` writes to every epoch.
EPOCH_EVENT_DIRS = ("train", "validation", "exits")


def last_commit(backup_dir: str | os.PathLike) -> dict | None:
    """The last epoch commit in `backup_dir` (`epoch`: epochs finished; `committed_at`), or None
    when no epoch finished."""
    meta = read_backup_metadata(backup_dir)
    return meta if meta and meta["epoch"] > 0 else None


def prune_event_file(path: str | os.PathLike, after: float) -> int:
    """Rewrite the event file `path` atomically without the events whose wall time is later than
    `after` (its `file_version` header stays); delete it when nothing else is left. Returns the
    number of events dropped."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    kept, dropped = [], 0
    records = iter(tf.data.TFRecordDataset(str(path)))
    while True:
        try:
            record = next(records).numpy()
        except StopIteration:
            break
        except tf.errors.DataLossError:  # a record cut short by the kill
            dropped += 1
            break
        event = event_pb2.Event.FromString(record)
        if event.HasField("file_version") or event.wall_time <= after:
            kept.append(record)
        else:
            dropped += 1
    if not dropped:
        return 0
    if all(event_pb2.Event.FromString(r).HasField("file_version") for r in kept):
        os.remove(path)
        return dropped
    # Not atomic_path: its temporary name would hold "tfevents", which TensorBoard reads.
    tmp = Path(path).parent / f".pruned-{os.getpid()}.tmp"
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for record in kept:
                writer.write(record)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dropped


def prune_metrics_csv(path: str | os.PathLike, epochs: int) -> int:
    """Keep the rows of `metrics.csv` of epochs 1..`epochs`; returns the number dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(r["epoch"]) <= epochs]
    if len(kept) == len(rows):
        return 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buf.getvalue())
    return len(rows) - len(kept)


def prune_after_commit(tensorboard_dir: str | os.PathLike, metrics_csv: str | os.PathLike,
                       commit: dict | None) -> int:
    """Drop what a killed run wrote after `commit`, the one training resumes from
    (`resic_tf.callbacks.restore_point`; None: no epoch finished, so everything of its training
    curves); returns the number of events and rows dropped."""
    epochs = commit["epoch"] if commit else 0
    after = commit.get("committed_at") if commit else float("-inf")
    dropped = prune_metrics_csv(metrics_csv, epochs)
    if after is None:  # a backup of Keras's own BackupAndRestore: no commit time to cut at
        return dropped
    for sub in EPOCH_EVENT_DIRS:
        directory = Path(tensorboard_dir) / sub
        if directory.is_dir():
            for path in sorted(directory.glob("events.out.tfevents.*")):
                dropped += prune_event_file(path, float(after))
    return dropped


def interrupted_message(out: str | os.PathLike, epochs: int) -> str:
    """What an interrupted `resic train` of `epochs` epochs into `out` leaves: from which epoch
    the same command resumes, or that no epoch finished (it starts again)."""
    from resic_tf.run import BACKUP_DIR
    commit = last_commit(Path(out) / BACKUP_DIR)
    if commit is None:
        return "no epoch had finished, so nothing is saved to resume; start it again with"
    done = commit["epoch"]
    return (f"the run is resumable from epoch {done + 1}/{epochs} ({done} finished and saved); "
            "resume it with the same command")
