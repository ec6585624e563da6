"""TensorBoard as the inspection surface of a run (`tensorboard --logdir RUN/tensorboard`, or a
folder of runs to compare them).

Sub-directories of `RUN/tensorboard/` (each a TensorBoard "run"):
    train/, validation/   Keras's own curves: total and per-exit losses (`epoch_<output>_loss`)
    exits/                per epoch: scalars `accuracy/<output>`, `macro_f1/<output>`, and the
                          exit profile of every task (image `exit_profile/<task>`, Markdown
                          table `exit_table/<task>`)
    layout/               the custom-scalars layout (written once): per task one chart with
                          every exit for macro-F1, one for accuracy, one for the losses
    hparams/              the run's settings and final scores (HParams plugin): point
                          TensorBoard at a folder of runs for a sortable ablation table
    calibration/, evaluation_<data>/, analysis/
                          tables (text) and figures of `resic calibrate`, `evaluate`, `analyze`;
                          each is rewritten, never appended to, when the command runs again

The tags `accuracy/<output>` and `macro_f1/<output>` are a public contract.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from resic_tf.figures import new_figure, png_bytes
from resic_tf.markdown import fmt, markdown_table
from resic_tf.metrics import best_index

LAYOUT_DIR = "layout"
HPARAMS_DIR = "hparams"
EXITS_DIR = "exits"
CALIBRATION_DIR = "calibration"
ANALYSIS_DIR = "analysis"


def evaluation_dir(data_name: str) -> str:
    return f"evaluation_{data_name}"


# === Writing event files =========================================================================

@contextmanager
def replaced_event_file(directory: str | os.PathLike) -> Iterator[tf.summary.SummaryWriter]:
    """A summary writer whose one event file replaces every earlier one in `directory` when the
    block ends, so re-running a command does not stack event files (nor duplicate curves)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    writer = tf.summary.create_file_writer(str(tmp))
    try:
        yield writer
        writer.close()
        directory.mkdir(exist_ok=True)
        old = list(directory.glob("events.out.tfevents.*"))
        for new in tmp.glob("events.out.tfevents.*"):
            os.replace(new, directory / new.name)
        for path in old:
            path.unlink(missing_ok=True)
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(directory: str | os.PathLike, texts: Mapping[str, str], step: int = 0) -> None:
    """Markdown text summaries `{tag: text}`, replacing the directory's earlier event file."""
    with replaced_event_file(directory) as writer, writer.as_default(step=step):
        for tag, text in texts.items():
            tf.summary.text(tag, text)


def write_images(directory: str | os.PathLike, images: Mapping[str, bytes],
                 texts: Mapping[str, str] | None = None, description: str | None = None,
                 step: int = 0) -> None:
    """PNG images `{tag: png bytes}` (and text summaries), replacing the earlier event file."""
    with replaced_event_file(directory) as writer, writer.as_default(step=step):
        for tag, png in images.items():
            image = tf.image.decode_png(png, channels=4)
            tf.summary.image(tag, image[None], description=description)
        for tag, text in (texts or {}).items():
            tf.summary.text(tag, text)


# === Custom scalars: every exit of a task on one chart ===========================================

def exit_layout(tasks: Sequence[str]):
    """The custom-scalars layout: per task a category with three multi-line charts (macro-F1,
    accuracy and loss by exit; Keras's loss tags are matched in train/ and validation/)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, pattern: str):
        return layout_pb2.Chart(title=title,
                                multiline=layout_pb2.MultilineChartContent(tag=[pattern]))

    categories = []
    for task in tasks:
        exits = rf"{task}_(ic\d+|lc)"
        categories.append(layout_pb2.Category(title=task, chart=[
            chart(f"{task}: macro-F1 by exit (validation)", rf"^macro_f1/{exits}$"),
            chart(f"{task}: accuracy by exit (validation)", rf"^accuracy/{exits}$"),
            chart(f"{task}: loss by exit (train and validation)", rf"^epoch_{exits}_loss$"),
        ]))
    return layout_pb2.Layout(category=categories)


def write_layout(log_dir: str | os.PathLike, tasks: Sequence[str]) -> bool:
    """Write the layout once into `log_dir/layout/`; returns False when it is already there."""
    from tensorboard.plugins.custom_scalar import summary as custom_scalar

    directory = Path(log_dir) / LAYOUT_DIR
    if directory.is_dir() and any(directory.glob("events.out.tfevents.*")):
        return False
    with replaced_event_file(directory) as writer, writer.as_default(step=0):
        tf.summary.experimental.write_raw_pb(
            custom_scalar.pb(exit_layout(tasks)).SerializeToString(), step=0)
    return True


# === The exit profile of an epoch ================================================================

def exit_profile_png(exit_labels: Sequence[str], accuracy: Sequence[float],
                     macro_f1: Sequence[float], title: str) -> bytes:
    """A small figure: accuracy and macro-F1 against the exit index (the paper's Tables 1 and 4
    as a curve), the best macro-F1 marked."""
    fig = new_figure(max(4.0, 0.35 * len(exit_labels) + 2), 2.8)
    ax = fig.add_subplot()
    x = np.arange(len(exit_labels))
    ax.plot(x, accuracy, "o-", label="accuracy")
    ax.plot(x, macro_f1, "s--", label="macro-F1")
    best = best_index(macro_f1)
    ax.plot([best], [macro_f1[best]], "r*", markersize=12, label=f"best: {exit_labels[best]}")
    ax.set(xticks=x, xticklabels=exit_labels, ylim=(0, 1), xlabel="exit (shallow to deep)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
    return png_bytes(fig)


def exit_profile_text(exit_labels: Sequence[str], accuracy: Sequence[float],
                      macro_f1: Sequence[float]) -> str:
    """The per-exit table of an epoch as Markdown, the best macro-F1 in bold."""
    best = best_index(macro_f1)
    rows = [[e, fmt(a), f"**{fmt(f)}**" if i == best else fmt(f)]
            for i, (e, a, f) in enumerate(zip(exit_labels, accuracy, macro_f1))]
    return markdown_table(["exit", "accuracy", "macro-F1"], rows)


def log_exit_profiles(profiles: Mapping[str, tuple[list[str], list[float], list[float]]],
                      epoch: int) -> None:
    """Inside a writer's default context: per task the image `exit_profile/<task>` and the
    Markdown table `exit_table/<task>`."""
    for task, (labels, acc, f1) in profiles.items():
        png = exit_profile_png(labels, acc, f1, f"{task}, epoch {epoch + 1}")
        tf.summary.image(f"exit_profile/{task}", tf.image.decode_png(png, channels=4)[None],
                         step=epoch)
        tf.summary.text(f"exit_table/{task}", exit_profile_text(labels, acc, f1), step=epoch)


# === HParams: runs comparable by their settings ==================================================

def _hparam_value(value: Any):
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_hparams(log_dir: str | os.PathLike, hparams: Mapping[str, Any],
                  metrics: Mapping[str, float], trial_id: str | None = None) -> None:
    """The run's settings and its final scores in `log_dir/hparams/`, rewritten as a whole each
    time (after training, calibration and every evaluation), so the HParams dashboard of a
    folder of runs shows one row per run with every score known so far."""
    from tensorboard.plugins.hparams import api as hp

    values = {k: _hparam_value(v) for k, v in hparams.items()}
    with replaced_event_file(Path(log_dir) / HPARAMS_DIR) as writer, writer.as_default(step=0):
        hp.hparams(values, trial_id=trial_id)
        for tag, value in metrics.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                tf.summary.scalar(tag, float(value), step=0)


def run_hparams(config, train_config) -> dict[str, Any]:
    """Every setting that distinguishes one training recipe from another."""
    model = config.to_dict()
    model.pop("tasks")
    return {**{f"model/{k}": v for k, v in model.items()},
            **{f"train/{k}": v for k, v in train_config.to_dict().items()},
            "model/exits": config.num_exits,
            "data/tasks": ",".join(config.tasks)}


def read_event_tags(directory: str | os.PathLike) -> dict[str, set[str]]:
    """plugin name -> tags in every event file of `directory` (for tests and checks)."""
    out: dict[str, set[str]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                out.setdefault(value.metadata.plugin_data.plugin_name, set()).add(value.tag)
    return out

