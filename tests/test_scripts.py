"""The runnable scripts in scripts/ keep working, and what they write is a run directory that
`resic calibrate`, `evaluate` and `export` accept."""
from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import dev_texts, keras_gated, write_rows

ROOT = Path(__file__).resolve().parents[1]
EXITS = [f"ic{i}" for i in range(1, 8)] + ["lc"]


@pytest.fixture(scope="module")
def script_run(real_tsv, tmp_path_factory):
    out = tmp_path_factory.mktemp("script") / "fit"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_keras.py"), "--data", str(real_tsv),
         "--text-col", "comments", "--label-cols", "bias,hate", "--filters", "4,4,4,4",
         "--epochs", "1", "--batch-size", "64", "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.large
def test_train_keras_script_runs_model_fit(script_run):
    out, stdout = script_run
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {r["epoch"] for r in rows} == {"1"}
    f1 = {r["output"]: float(r["macro_f1"]) for r in rows}
    # the script prints each task's per-exit validation macro-F1 (History's last epoch)
    printed = {line.split(" ", 1)[0]: ast.literal_eval(line.split(": ", 1)[1])
               for line in stdout.splitlines() if " validation macro-F1 per exit: " in line}
    assert set(printed) == {"bias", "hate"}
    for task, values in printed.items():
        assert values == pytest.approx([f1[f"{task}_{e}"] for e in EXITS], abs=1e-4)
    for name in ("model.keras", "config.json", "vocab.json", "train_config.json",
                 "validation.parquet"):
        assert (out / name).is_file()
    assert (out / "tensorboard" / "exits").is_dir() and (out / "tensorboard" / "train").is_dir()


@pytest.mark.large
def test_script_output_calibrates_evaluates_and_exports(script_run, tmp_path, capsys):
    import tensorflow as tf

    from resic_tf.cli import main
    from resic_tf.run import Run

    out, _ = script_run
    assert main(["calibrate", str(out)]) == 0
    assert (out / "gate.json").is_file()
    data = write_rows(tmp_path / "dev40.tsv", 40, source="dev.tsv")
    assert main(["evaluate", str(out), "--data", str(data), "--out", str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "evaluation.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["exit"] for r in table if r["task"] == "hate"] == EXITS + ["max", "gate"]
    base = tmp_path / "savedmodels" / "fit"
    assert main(["export", str(out), "--out", str(base)]) == 0
    assert f"Exported {base / '1'}" in capsys.readouterr().out

    run = Run.load(out)
    texts = ["", "정말 재밌어요", "x" * 300] + dev_texts(40, start=200)
    expected = keras_gated(run, texts)
    served = tf.saved_model.load(str(base / "1")).signatures["serving_default"](
        text=tf.constant(texts, tf.string))
    for task, (labels, exits, probs) in expected.items():
        assert [v.decode("utf-8") for v in served[f"{task}_label"].numpy()] == labels
        assert served[f"{task}_exit"].numpy().tolist() == exits
        np.testing.assert_allclose(served[f"{task}_probabilities"].numpy(), probs,
                                   rtol=1e-4, atol=1e-5)


def test_parallel_runs_budget_stops_the_queue_in_time(tmp_path):
    """benchmarks/parallel_runs.sh with BUDGET: the run going at the deadline is stopped, no
    further run starts, and each run gets its queue line's arguments plus the fixed ones. A
    stand-in `python` records its arguments and sleeps, so no training happens."""
    import time

    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s|" "$@" >> "$RECORD"\necho >> "$RECORD"\nsleep 30\n',
                    encoding="utf-8")
    fake.chmod(0o755)
    queue = tmp_path / "queue.txt"
    queue.write_text("--seeds 1 --datasets 'a b'\n\n# skipped\n--seeds 2\n--seeds 3\n",
                     encoding="utf-8")
    record = tmp_path / "record.txt"
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
               RECORD=str(record), JOBS="1", BUDGET="2")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "parallel_runs.sh"), str(queue),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20  # not 3 x 30 s: the budget ended the queue
    assert proc.stdout.splitlines() == ["line 1 stopped or failed",
                                        "line 4 not started: past the budget",
                                        "line 5 not started: past the budget"]
    runs = record.read_text(encoding="utf-8").splitlines()
    assert len(runs) == 1
    args = runs[0].split("|")[:-1]  # the quoted 'a b' stays one argument
    assert args[0].endswith("benchmarks/accuracy.py") and args[1:] == [
        "--seeds", "1", "--datasets", "a b", "--no-baselines", "--no-speed", "--out",
        str(tmp_path / "out")]
