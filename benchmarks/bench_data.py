"""The shared datasets the benchmarks train and score on, in one place.

`scripts/prepare_datasets.py` writes the `{data}` files (default `runs/paper/data`); the
korean-hate-speech files are the bundled demo data.
"""
from __future__ import annotations

import subprocess
import sys
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
