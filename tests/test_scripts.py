"""The runnable scripts in scripts/ keep working."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.large
def test_train_keras_script_runs_model_fit(real_tsv, tmp_path):
    out = tmp_path / "fit"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_keras.py"), "--data", str(real_tsv),
         "--text-col", "comments", "--label-cols", "bias,hate", "--filters", "4,4,4,4",
         "--epochs", "1", "--batch-size", "64", "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lc |" in proc.stdout and "| ic7 |" in proc.stdout
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {r["epoch"] for r in rows} == {"1"}
    for name in ("model.keras", "config.json", "vocab.json"):
        assert (out / name).is_file()
    assert (out / "tensorboard" / "exits").is_dir() and (out / "tensorboard" / "train").is_dir()
