"""Shared fixtures: real rows of the bundled korean-hate-speech data and one tiny trained run."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

DEMO_DIR = Path(__file__).resolve().parents[1] / "resic_tf" / "demo_data" / "korean_hate_speech"
TINY_FILTERS = "8,8,8,8"
# One block per stage (a Res-IC18 of depth 4: 3 ICs + LC per task): every export, load and trace
# of the shared tiny run scales with its depth.
TINY_BLOCKS = "1,1,1,1"
TINY_EXITS = ["ic1", "ic2", "ic3", "lc"]


def write_rows(path: Path, n: int, start: int = 0, source: str = "train.tsv") -> Path:
    """The header and rows [start, start + n) of a bundled TSV file, written to `path`."""
    lines = (DEMO_DIR / source).read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], *lines[1 + start: 1 + start + n]]) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


def session_dir(tmp_path_factory, name: str, build) -> Path:
    """A directory made once per test session by `build(directory)`, also under pytest-xdist:
    there the first worker to ask builds it in the session's shared temporary directory while
    the others wait on a lock, and every worker gets the same path."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    shared = tmp_path_factory.getbasetemp().parent / "shared"
    shared.mkdir(exist_ok=True)
    directory, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a failure
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a worker's failed attempt
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


@pytest.fixture(scope="session")
def real_tsv(tmp_path_factory) -> Path:
    """300 real training rows (bias + hate labels)."""
    return session_dir(tmp_path_factory, "data",
                       lambda d: write_rows(d / "train300.tsv", 300)) / "train300.tsv"


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`resic train`'s arguments for the tiny run's model and recipe (plus `extra` flags): the
    default recipe without its linear branch and wide stage (0.13's default; `linear_run`
    trains the whole 0.14 default). A flag in `extra` replaces the one here."""
    given = {flag for flag in extra if flag.startswith("--")}
    own = [("--linear-ngrams", "0"), ("--wide-epochs", "0")]
    return ["train", "--data", str(data), "--val-split", "0.2", "--text-col", "comments",
            "--label-cols", "bias,hate", "--arch", "resic18", "--filters", TINY_FILTERS,
            "--blocks", TINY_BLOCKS, "--epochs", "2", "--batch-size", "32", "--seed", "1",
            "--out", str(out), "--quiet",
            *[part for flag, value in own if flag not in given for part in (flag, value)],
            *extra]


def _train_tiny(data: Path, out: Path, *extra: str) -> None:
    from resic_tf.cli import main

    assert main(tiny_train_args(data, out, *extra)) == 0


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, real_tsv) -> Path:
    """A Res-IC18 of one block per stage (filters 8: 3 ICs + LC per task) trained 2 epochs by `resic train`.

    Session-scoped (one for all pytest-xdist workers): gate, export and analysis tests reuse it.
    Do not modify it in a test; copy it.
    """
    return session_dir(tmp_path_factory, "runs", lambda d: _train_tiny(real_tsv, d / "tiny")) \
        / "tiny"


LINEAR_NGRAMS = 5000  # the linear run's vocabulary: about 2,800 n-grams fill it


@pytest.fixture(scope="session")
def linear_run(tmp_path_factory, real_tsv) -> Path:
    """The tiny run's model with the default recipe's linear branch (`--linear-ngrams`, capped
    at `LINEAR_NGRAMS`) and wide stage, trained the same way: session-scoped like `tiny_run`;
    copy it before changing it."""
    return session_dir(tmp_path_factory, "linear",
                       lambda d: _train_tiny(real_tsv, d / "run", "--linear-ngrams",
                                             str(LINEAR_NGRAMS), "--wide-epochs", "25")) / "run"


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


# pytest-xdist: `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`, each test module a
# work unit (its module fixtures are built once) sent out in collection order. Workers collect
# the heaviest modules first, so that no worker is left with a long one at the end while the
# other idles; without xdist the order is pytest's own.
HEAVY_FIRST = ["test_export", "test_multiworker", "test_export_policies", "test_faults",
               "test_training", "test_recipe", "test_scripts", "test_length_adaptive",
               "test_layers_model", "test_callbacks", "test_reliability", "test_run",
               "test_tensorboard"]


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
        # a stable sort: each module's tests stay together and in their order
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
