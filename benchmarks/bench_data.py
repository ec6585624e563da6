"""The shared datasets the benchmarks train and score on, in one place.

`scripts/prepare_datasets.py` writes the `{data}` files (default `runs/paper/data`); the
korean-hate-speech files are the bundled demo data.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "resic_tf" / "demo_data" / "korean_hate_speech"
DEFAULT_DATA = REPO / "runs" / "paper" / "data"
DATASETS = {
    # name: (train, validation (None: hold out 10% of train), test, text column, label columns)
    "korean-hate-speech": (DEMO / "train.tsv", None, DEMO / "dev.tsv", "comments", "bias,hate"),
    "stylekqc": ("{data}/stylekqc/train.tsv", "{data}/stylekqc/val.tsv",
                 "{data}/stylekqc/test.tsv", "sentence", "act,topic"),
    "3i4k": ("{data}/3i4k/train.tsv", None, "{data}/3i4k/test.tsv", "text", "intent"),
    # In-scope accuracy, the figure Larson et al. (2019) and fastText's 89.0 report.
    "clinc150": ("{data}/clinc150/train.tsv", "{data}/clinc150/val.tsv",
                 "{data}/clinc150/test_inscope.tsv", "text", "intent,domain"),
    "nsmc": ("{data}/nsmc/train.tsv", "{data}/nsmc/val.tsv", "{data}/nsmc/test.tsv", "review",
             "polarity,rating"),
}


def resic(*args: str) -> None:
    """One `resic` command in its own process (as a user runs it), its output discarded."""
    subprocess.run([sys.executable, "-m", "resic_tf.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def scratch_run(path: str):
    """A trained run copied into a temporary folder (without its TensorBoard logs, evaluations
    and policies) and calibrated, so a benchmark never changes the original: yields (run,
    folder), and removes the folder afterwards."""
    from resic_tf.run import Run
    tmp = tempfile.mkdtemp()
    try:
        run_dir = os.path.join(tmp, "run")
        shutil.copytree(path, run_dir, ignore=shutil.ignore_patterns("tensorboard", "eval_*",
                                                                     "policies"))
        run = Run.load(run_dir)
        run.calibrate()
        yield run, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
