"""TensorBoard as a user sees it: the event files of a real run, read back plugin by plugin, and a
`tensorboard` server on 127.0.0.1 answering its HTTP data endpoints over that run."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from resic_tf.cli import main
from resic_tf.tensorboard import exit_layout, read_event_tags
from conftest import TINY_EXITS

TASKS = ("bias", "hate")
EXITS = TINY_EXITS
OUTPUTS = [f"{t}_{e}" for t in TASKS for e in EXITS]


@pytest.fixture(scope="module")
def inspected_run(tiny_run, demo_dir, tmp_path_factory) -> Path:
    """A copy of the tiny run after calibrate, evaluate (twice) and analyze (twice)."""
    run = tmp_path_factory.mktemp("tb") / "run"
    shutil.copytree(tiny_run, run)
    dev = str(demo_dir / "dev.tsv")
    for args in (["calibrate", str(run)], ["evaluate", str(run), "--data", dev],
                 ["evaluate", str(run), "--data", dev],
                 ["analyze", str(run), "--data", dev, "--out", str(run / "an")],
                 ["analyze", str(run), "--data", dev, "--out", str(run / "an")]):
        assert main(args) == 0
    return run


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("events.out.tfevents.*"))


def test_run_directories_hold_exactly_these_plugins_and_tags(inspected_run):
    tb = inspected_run / "tensorboard"
    assert sorted(p.name for p in tb.iterdir()) == [
        "analysis", "calibration", "evaluation_dev", "exits", "hparams", "layout", "train",
        "validation"]
    exits = read_event_tags(tb / "exits")
    assert exits == {
        "scalars": {f"{m}/{o}" for m in ("accuracy", "macro_f1") for o in OUTPUTS},
        "images": {f"exit_profile/{t}" for t in TASKS},
        "text": {f"exit_table/{t}" for t in TASKS},
    }
    # Keras's own curves: per-exit losses in train/ and validation/; the validation exit metrics
    # are not written a second time there (exits/ holds them under the public tags).
    validation = read_event_tags(tb / "validation")["scalars"]
    assert {f"epoch_{o}_loss" for o in OUTPUTS} <= validation
    assert not [t for t in validation if t.endswith(("_macro_f1", "_accuracy"))]
    assert {f"epoch_{o}_loss" for o in OUTPUTS} <= read_event_tags(tb / "train")["scalars"]
    assert read_event_tags(tb / "layout") == {"custom_scalars": {"custom_scalars__config__"}}
    assert read_event_tags(tb / "calibration") == {"text": {f"gate/{t}" for t in TASKS}}
    assert read_event_tags(tb / "evaluation_dev") == {"text": {"evaluation/dev"}}
    assert read_event_tags(tb / "analysis") == {
        "images": {f"analysis/{f}" for f in
                   ("exit_scores", "overthinking", "error_by_length", "bucket_f1",
                    "early_exit")},
        "text": {"analysis/report"}}
    hparams = read_event_tags(tb / "hparams")
    assert hparams["hparams"] == {"_hparams_/session_start_info"}
    assert hparams["scalars"] == {f"{section}/{t}_{row}_{m}"
                                  for section, row in (("validation", "lc"), ("dev", "lc"),
                                                       ("dev", "gate"), ("calibration", "gate"))
                                  for t in TASKS for m in ("accuracy", "macro_f1")} | \
        {"dev/policy_length_saved"}  # the share of FLOPs the gate saves


def test_rerunning_commands_replaces_their_event_file(inspected_run):
    tb = inspected_run / "tensorboard"
    for name in ("calibration", "evaluation_dev", "analysis", "hparams", "layout"):
        assert len(event_files(tb / name)) == 1, name
    assert not [p for p in tb.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_exit_profile_is_logged_every_epoch(inspected_run):
    import tensorflow as tf
    steps = {}
    for path in event_files(inspected_run / "tensorboard" / "exits"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "exit_table/hate":
                    steps[event.step] = tf.make_ndarray(value.tensor).item().decode()
    assert sorted(steps) == [0, 1]  # tiny_run trains 2 epochs
    table = steps[1].splitlines()
    assert table[0] == "| exit | accuracy | macro-F1 |"
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == EXITS
    assert sum("**" in row for row in table[2:]) == 1  # the best exit is marked


def test_hparams_hold_the_recipe_and_the_recorded_scores(inspected_run):
    state = json.loads((inspected_run / "run.json").read_text(encoding="utf-8"))
    scores = state["scores"]
    final = state["final_val_scores"]
    assert scores["validation/hate_lc_macro_f1"] == pytest.approx(final["hate_lc"]["macro_f1"])
    evaluation = (inspected_run / "eval_dev" / "evaluation.csv").read_text().splitlines()
    gate_row = next(r for r in evaluation if r.startswith("hate,gate,"))
    assert scores["dev/hate_gate_macro_f1"] == pytest.approx(float(gate_row.split(",")[3]),
                                                             abs=1e-6)


def test_layout_has_one_chart_per_task_and_metric_matching_every_exit():
    import re
    layout = exit_layout(TASKS)
    assert [c.title for c in layout.category] == list(TASKS)
    charts = layout.category[1].chart
    assert [c.title for c in charts] == ["hate: macro-F1 by exit (validation)",
                                         "hate: accuracy by exit (validation)",
                                         "hate: loss by exit (train and validation)"]
    f1 = re.compile(charts[0].multiline.tag[0])
    assert [t for t in [f"macro_f1/{o}" for o in OUTPUTS] + ["macro_f1/hate_icx", "loss"]
            if f1.match(t)] == [f"macro_f1/hate_{e}" for e in EXITS]
    loss = re.compile(charts[2].multiline.tag[0])
    assert loss.match("epoch_hate_ic12_loss") and loss.match("epoch_hate_lc_loss")
    assert not loss.match("epoch_bias_lc_loss") and not loss.match("epoch_loss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.load(response)


def test_tensorboard_server_serves_layout_and_hparams(inspected_run, tmp_path):
    # Two runs in one folder, as a user comparing recipes would point TensorBoard at them.
    runs = tmp_path / "runs"
    shutil.copytree(inspected_run / "tensorboard", runs / "a" / "tensorboard")
    shutil.copytree(inspected_run / "tensorboard", runs / "b" / "tensorboard")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        listing = None
        deadline = time.monotonic() + 90
        while listing is None and time.monotonic() < deadline:
            try:
                listing = _get(base + "/data/plugins_listing")
            except OSError:
                time.sleep(0.5)
        assert listing is not None, "tensorboard did not answer within 90 s"
        for plugin in ("scalars", "custom_scalars", "images", "text", "hparams"):
            assert listing[plugin]["enabled"], plugin
        # The first load of the logdir runs in the background: wait for the hparams sessions.
        experiment = {}
        while not experiment.get("hparamInfos") and time.monotonic() < deadline:
            time.sleep(0.5)
            experiment = _get(base + "/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment.get("hparamInfos", [])}
        assert {"model/arch", "model/filters", "train/learning_rate", "train/epochs",
                "model/loss_weighting", "data/tasks"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"validation/hate_lc_macro_f1", "dev/hate_gate_macro_f1",
                "calibration/bias_gate_accuracy"} <= metrics
        groups = _get(base + "/data/plugin/hparams/session_groups",
                      {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN"],
                       "colParams": [], "startIndex": 0, "sliceSize": 100})
        sessions = [s["name"] for g in groups["sessionGroups"] for s in g["sessions"]]
        assert sorted(sessions) == ["a/tensorboard/hparams", "b/tensorboard/hparams"]
        layout = _get(base + "/data/plugin/custom_scalars/layout")
        assert [c["title"] for c in layout["category"]] == list(TASKS)
        assert layout["category"][0]["chart"][0]["multiline"]["tag"] == [
            r"^macro_f1/bias_(ic\d+|lc)$"]
    finally:
        server.terminate()
        server.wait(timeout=30)
