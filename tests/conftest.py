"""Shared fixtures: real rows of the bundled korean-hate-speech data and one tiny trained run."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

DEMO_DIR = Path(__file__).resolve().parents[1] / "resic_tf" / "demo_data" / "korean_hate_speech"
TINY_FILTERS = "8,8,8,8"


def write_rows(path: Path, n: int, start: int = 0, source: str = "train.tsv") -> Path:
    """The header and rows [start, start + n) of a bundled TSV file, written to `path`."""
    lines = (DEMO_DIR / source).read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], *lines[1 + start: 1 + start + n]]) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def real_tsv(tmp_path_factory) -> Path:
    """300 real training rows (bias + hate labels)."""
    return write_rows(tmp_path_factory.mktemp("data") / "train300.tsv", 300)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, real_tsv) -> Path:
    """A Res-IC18 (filters 8 per stage: 7 ICs + LC per task) trained 2 epochs by `resic train`.

    Session-scoped: gate, export and analysis tests reuse it. Do not modify it in a test; copy it.
    """
    from resic_tf.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--data", str(real_tsv), "--val-split", "0.2", "--text-col", "comments",
                 "--label-cols", "bias,hate", "--arch", "resic18", "--filters", TINY_FILTERS,
                 "--epochs", "2", "--batch-size", "32", "--seed", "1", "--out", str(out),
                 "--quiet"])
    assert code == 0
    return out


def dev_texts(n: int, start: int = 0) -> list[str]:
    """The texts of rows [start, start + n) of the bundled dev.tsv."""
    lines = (DEMO_DIR / "dev.tsv").read_text(encoding="utf-8").splitlines()[1 + start:1 + start + n]
    return [line.split("\t")[0] for line in lines]


def keras_gated(run, texts):
    """What the served `serving_default` must answer, computed from the Keras model and the gate
    in numpy: task -> (labels, 1-based exits, probabilities)."""
    import numpy as np

    from resic_tf.gate import gated_predictions
    from resic_tf.run import predict_exits
    from resic_tf.vocabulary import text_lengths

    probs = predict_exits(run.model, texts)
    lengths = text_lengths(texts)
    out = {}
    for task, classes in run.config.tasks.items():
        p, idx = gated_predictions(run.gate, task, probs[task], lengths)
        out[task] = ([classes[i] for i in p.argmax(-1)], (idx + 1).tolist(), np.asarray(p))
    return out
