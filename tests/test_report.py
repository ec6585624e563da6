"""The `resic analyze` report (resic_tf.report): `analyze_run` end to end on the tiny session
run, re-deriving the report's numbers from its predictions.parquet, its figures and their
TensorBoard images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_EXITS, write_rows
from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate, bucket_of
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.report import FIGURES, analyze_run
from resic_tf.run import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# === analyze_run end to end ===

def _copy_run(tiny_run: Path, dest: Path) -> Path:
    """A writable copy of the session run, without any gate or earlier analysis."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("gate.json", "analysis"))
    return dest


@pytest.fixture(scope="module")
def analyzed(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    run = _copy_run(tiny_run, base / "run")
    data = write_rows(base / "dev60.tsv", 60, source="dev.tsv")
    report = analyze_run(Run.load(run), data, base / "out")
    return run, base / "out", report


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start): text.index(end, text.index(start))]


def test_analyze_run_writes_files(analyzed):
    import tensorflow as tf
    run, out, report = analyzed
    assert report == out / "report.md"
    md = report.read_text(encoding="utf-8")
    for name in FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and f"]({name}.png)" in md
        h, w, c = tf.image.decode_png(png).shape
        assert h > 100 and w > 100 and c in (3, 4)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["analysis.json", "predictions.parquet", "report.md", "early_exit_sweep.csv",
         *(f"{n}.png" for n in FIGURES)])
    for heading in ("## 1. Per-exit", "## 2. Overthinking", "## 3. Error by length",
                    "## 4. Length gate", "## 5. Early exit"):
        assert heading in md
    # the sweep: every policy and task, cost rising with the threshold; the gate as a point
    sweep = pd.read_csv(out / "early_exit_sweep.csv")
    assert set(sweep["policy"]) == {"confidence", "entropy", "patience"}
    assert set(sweep["task"]) == {"bias", "hate"}
    conf = sweep[(sweep["policy"] == "confidence") & (sweep["task"] == "bias")]
    assert conf["flops_share"].is_monotonic_increasing and conf["flops_share"].max() <= 1
    assert "| length | bias |" in _section(md, "## 5. Early exit", "![macro-F1 against FLOPs]")
    # no gate.json in the run: one was calibrated on the run's validation rows, not on --data
    gate = json.loads((run / "gate.json").read_text(encoding="utf-8"))
    assert gate["calibration_data"] == str(run / "validation.parquet")
    assert "calibrated now on the run's own validation rows" in md


def test_predictions_parquet_columns(analyzed):
    run, out, _ = analyzed
    from resic_tf.vocabulary import text_lengths
    df = pd.read_parquet(out / "predictions.parquet")
    config = ResICConfig.load(run / "config.json")
    exits = TINY_EXITS
    expected = ["text", "length", "bucket"]
    for task in ("bias", "hate"):
        expected += [f"{task}_true"] + [f"{task}_{e}_{k}" for e in exits for k in ("pred", "conf")]
        expected += [f"{task}_gate_exit", f"{task}_gate_pred"]
    assert list(df.columns) == expected and len(df) == 60
    assert df["length"].tolist() == text_lengths(df["text"].tolist()).tolist()
    gate = LengthGate.load(run / "gate.json")
    assert df["bucket"].tolist() == bucket_of(df["length"], 10, gate.num_buckets).tolist()
    for task, classes in config.tasks.items():
        # gate_pred is the prediction of the exit named in gate_exit
        chosen = [df.at[i, f"{task}_{e}_pred"] for i, e in enumerate(df[f"{task}_gate_exit"])]
        assert df[f"{task}_gate_pred"].tolist() == chosen
        conf = df[[f"{task}_{e}_conf" for e in exits]].to_numpy()
        assert (conf >= 1 / len(classes) - 1e-6).all() and (conf <= 1 + 1e-6).all()


def test_report_numbers_recompute_from_parquet(analyzed):
    run, out, report = analyzed
    df = pd.read_parquet(out / "predictions.parquet")
    md = report.read_text(encoding="utf-8")
    result = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    n_classes = {t: len(c) for t, c in
                 json.loads((run / "config.json").read_text(encoding="utf-8"))["tasks"].items()}
    ics = TINY_EXITS[:-1]

    # (1) LC accuracy and macro-F1 of hate, in section 1's hate table
    y = df["hate_true"].to_numpy()
    lc = df["hate_lc_pred"].to_numpy()
    acc, f1 = accuracy(y, lc), macro_f1(y, lc, n_classes["hate"])
    assert result["tasks"]["hate"]["lc"]["macro_f1"] == pytest.approx(f1)
    assert f"| lc | {acc:.4f} | {f1:.4f} |" in _section(md, "### hate", "## 2.")

    # (2) overthinking of bias: some IC right and the LC wrong
    yb = df["bias_true"].to_numpy()[:, None]
    right_ic = (df[[f"bias_{e}_pred" for e in ics]].to_numpy() == yb).any(axis=1)
    lc_wrong = df["bias_lc_pred"].to_numpy() != yb[:, 0]
    count = int((right_ic & lc_wrong).sum())
    assert result["tasks"]["bias"]["overthinking"]["overthinking"] == pytest.approx(count / 60)
    bias_row = next(line for line in _section(md, "## 2.", "Lost later").splitlines()
                    if line.startswith("| bias |"))
    assert bias_row.split(" | ")[2] == f"{100 * count / 60:.1f}% ({count}/60)"
    # lost-later share of ic1 for bias
    ic1_right = df["bias_ic1_pred"].to_numpy() == yb[:, 0]
    lost = int((ic1_right & lc_wrong).sum())
    assert result["tasks"]["bias"]["overthinking"]["lost_at_lc"][0] == lost
    assert result["tasks"]["bias"]["overthinking"]["correct"][0] == int(ic1_right.sum())

    # (3) error share of bias's LC in the most populated bucket
    b = int(df["bucket"].value_counts().idxmax())
    share = (lc_wrong & (df["bucket"] == b)).sum() / lc_wrong.sum()
    assert result["tasks"]["bias"]["error_share"][-1][b] == pytest.approx(share)
    row = next(line for line in _section(md, "## 3.", "### hate").splitlines()
               if line.startswith("| lc |"))
    assert row.split(" | ")[2 + b] == f"{100 * share:.1f}%"
    # macro-F1 of hate's ic3 in that bucket
    rows = (df["bucket"] == b).to_numpy()
    assert result["tasks"]["hate"]["bucket_f1"][b][2] == pytest.approx(
        macro_f1(y[rows], df["hate_ic3_pred"].to_numpy()[rows], n_classes["hate"]))

    # (4) gated accuracy of hate in the Table 5 style rows
    g = accuracy(y, df["hate_gate_pred"].to_numpy())
    assert result["tasks"]["hate"]["gate"]["accuracy"] == pytest.approx(g)
    gate_row = next(line for line in _section(md, "## 4.", "Inputs routed").splitlines()
                    if line.startswith("| gate |"))
    assert gate_row.split(" | ")[3] == f"{g:.4f}"


def test_tensorboard_images(analyzed):
    import tensorflow as tf
    run, out, _ = analyzed
    log_dir = run / "tensorboard" / "analysis"
    files = list(log_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    images = {}
    for event in tf.compat.v1.train.summary_iterator(str(files[0])):
        for v in event.summary.value:
            images[v.tag] = (tf.make_ndarray(v.tensor), v.metadata.plugin_data.plugin_name)
    assert set(images) == {f"analysis/{n}" for n in FIGURES} | {"analysis/report"}
    text, plugin = images["analysis/report"]  # the report itself, as a text summary
    assert plugin == "text"
    assert text.item().decode("utf-8") == (out / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        (width, height, png), plugin = images[f"analysis/{name}"]
        assert plugin == "images" and png.startswith(PNG_MAGIC)
        h, w, _ = tf.image.decode_png((out / f"{name}.png").read_bytes()).shape
        assert (int(width), int(height)) == (w, h)


def test_analyze_run_uses_existing_gate(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    config = ResICConfig.load(run / "config.json")
    # a hand-made gate sending every bucket of every task to ic2
    n_b = config.max_len // 10 + 1
    LengthGate(10, "macro_f1", 1, {t: config.exit_names(t) for t in config.tasks},
               {t: [1] * n_b for t in config.tasks}, {t: 1 for t in config.tasks},
               {"_source": "hand-made"}).save(run / "gate.json")
    data = write_rows(tmp_path / "dev20.tsv", 20, start=100, source="dev.tsv")
    # through the CLI this time: `resic analyze` glues to analyze_run
    from resic_tf.cli import main
    assert main(["analyze", str(run), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    df = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    for task in config.tasks:
        assert (df[f"{task}_gate_exit"] == "ic2").all()
        assert df[f"{task}_gate_pred"].tolist() == df[f"{task}_ic2_pred"].tolist()
    assert "calibrated on hand-made" in md and "calibrated now" not in md
    assert "| 130+ | ic2 | ic2 |" in md
