"""Early-exit policies: each rule on hand-computed probabilities, their cost, their calibration to
a budget, the policy file, and the command line."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from resic_tf.config import ResICConfig
from resic_tf.flops import exit_flops, forward_flops, policy_flops
from resic_tf.policies import (ExitPolicy, apply_policy, calibrate_policy, fires,
                               normalised_entropy, patience_counts, policy_exits, policy_summary,
                               sweep)
from resic_tf.validation import InvalidValueError

# Two rows, three exits (ic1, ic2, lc), two classes.
PROBS = np.array([[[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]],
                  [[0.5, 0.5], [0.55, 0.45], [0.2, 0.8]]], np.float32)
EXITS = ["t_ic1", "t_ic2", "t_lc"]


def policy(name, values, width=10):
    return ExitPolicy(name, {"t": EXITS}, {"t": values}, width)


def test_each_rule_on_hand_computed_probabilities():
    lengths = [5, 15]
    # confidence 0.8: row 0 stops at ic2 (0.9), row 1 never reaches 0.8 -> LC
    assert policy_exits(policy("confidence", [0.8]), {"t": PROBS}, lengths)["t"].tolist() == [1, 2]
    # entropy / log 2: H(0.9, 0.1) = 0.469, H(0.6, 0.4) = 0.971, H(0.55, 0.45) = 0.993
    h = normalised_entropy(PROBS)
    np.testing.assert_allclose(h[0, 1], -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2),
                               rtol=1e-6)
    assert policy_exits(policy("entropy", [0.5]), {"t": PROBS}, lengths)["t"].tolist() == [1, 2]
    assert policy_exits(policy("entropy", [0.995]), {"t": PROBS}, lengths)["t"].tolist() == [0, 1]
    # patience: predictions 0, 0, 1 in both rows (a tie goes to class 0) -> counts 0, 1, 0
    assert patience_counts(PROBS).tolist() == [[0, 1, 0], [0, 1, 0]]
    assert policy_exits(policy("patience", [1]), {"t": PROBS}, lengths)["t"].tolist() == [1, 1]
    assert policy_exits(policy("patience", [2]), {"t": PROBS}, lengths)["t"].tolist() == [2, 2]
    assert policy_exits(policy("patience", [0]), {"t": PROBS}, lengths)["t"].tolist() == [0, 0]
    # hybrid: row 0 (length 5, bucket 0) at 0.55 stops at ic1; row 1 (bucket 1) at 0.95 -> LC
    assert policy_exits(policy("hybrid", [0.55, 0.95]), {"t": PROBS}, lengths)["t"].tolist() == \
        [0, 2]
    # length: the gate's exit per bucket, no probabilities read
    assert policy_exits(policy("length", [2, 0]), {"t": PROBS}, lengths)["t"].tolist() == [2, 0]
    # the LC always fires
    assert fires("confidence", PROBS, 2.0)[:, -1].all() and not fires("confidence", PROBS,
                                                                       2.0)[:, :-1].any()


def test_entropy_bounds_and_apply_policy_takes_the_deepest_task():
    assert normalised_entropy(np.array([[0.25] * 4, [1, 0, 0, 0]], np.float32)).tolist() == \
        [pytest.approx(1.0), 0.0]
    two = {"a": PROBS, "b": PROBS[::-1]}
    p = ExitPolicy("confidence", {"a": EXITS, "b": EXITS}, {"a": [0.8], "b": [0.58]})
    chosen, exits, blocks = apply_policy(p, two, [1, 1])
    assert exits["a"].tolist() == [1, 2] and exits["b"].tolist() == [2, 0]
    assert blocks.tolist() == [3, 3]  # row 0: a stops at ic2, b runs to the LC
    np.testing.assert_array_equal(chosen["a"], PROBS[[0, 1], [1, 2]])


def test_policy_flops_count_blocks_and_heads_to_the_deepest_exit():
    config = ResICConfig(tasks={"t": ["a", "b", "c"]}, vocab_size=10, filters=(4, 8),
                         blocks=(1, 1), embedding_dim=2, cbam_reduction=2, ngram_buckets=0)
    L = 9
    # one task: exit 0 costs the stem, block 1 and head 1; exit 1 is the whole model
    assert policy_flops(config, [L, L], {"t": [0, 1]}).tolist() == \
        [exit_flops(config, L)[0], forward_flops(config, L)]
    # two tasks: the row runs to the deeper one's exit and evaluates both heads on the way
    two = dataclasses.replace(config, tasks={"t": ["a", "b", "c"], "u": ["a", "b"]})
    assert policy_flops(two, [L], {"t": [0], "u": [1]}).tolist() == [forward_flops(two, L)]
    assert policy_flops(two, [L], {"t": [0], "u": [0]}).tolist() == [exit_flops(two, L)[0]]
    # a text longer than max_len costs max_len; an empty one costs one step
    assert policy_flops(config, [500, 0], {"t": [1, 1]}).tolist() == \
        [forward_flops(config, 132), forward_flops(config, 1)]


def _synthetic(n=400, seed=0):
    """A 2-class task whose first exit is right and confident on 3/4 of the rows and unsure
    elsewhere; the middle exit is wrong everywhere; the LC is always right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    easy = rng.random(n) < 0.75
    p = np.zeros((n, 3, 2), np.float32)
    conf = np.where(easy, 0.95, 0.55)
    pred0 = np.where(easy, y, 1 - y)
    p[np.arange(n), 0, pred0] = conf
    p[np.arange(n), 0, 1 - pred0] = 1 - conf
    p[np.arange(n), 1, 1 - y] = 0.6
    p[np.arange(n), 1, y] = 0.4
    p[np.arange(n), 2, y] = 0.99
    p[np.arange(n), 2, 1 - y] = 0.01
    return y, p


def test_calibration_meets_the_budget_at_the_least_cost():
    y, p = _synthetic()
    config = ResICConfig(tasks={"t": ["x", "y"]}, vocab_size=10, filters=(4, 4, 4),
                         blocks=(1, 1, 1), ngram_buckets=0, embedding_dim=2)
    lengths = np.full(len(y), 30)
    pol = calibrate_policy(config, "confidence", {"t": p}, {"t": y}, lengths, budget=0.5)
    # every easy row (0.95) stops at ic1, every unsure one (0.55) goes on to the LC
    t = pol.thresholds["t"][0]
    assert 0.55 < t <= 0.95
    v = pol.calibration["validation"]
    assert v["tasks"]["t"]["macro_f1"] == 1.0 and v["tasks"]["t"]["lc_macro_f1"] == 1.0
    assert v["tasks"]["t"]["mean_exit"] == pytest.approx(1 + 2 * (1 - 0.75), abs=0.1)
    assert v["saved"] > 0.2
    # a budget of 0 on a task whose first exit is wrong on the unsure rows: never stop on them
    ent = calibrate_policy(config, "entropy", {"t": p}, {"t": y}, lengths, budget=0.0)
    assert ent.calibration["validation"]["tasks"]["t"]["macro_f1"] == 1.0
    # patience: ic1 and ic2 disagree on the easy rows, so only t = 2 (the LC) keeps the score
    pat = calibrate_policy(config, "patience", {"t": p}, {"t": y}, lengths, budget=0.0)
    assert pat.calibration["validation"]["tasks"]["t"]["macro_f1"] == 1.0
    # a huge budget lets every row stop at the first exit
    cheap = calibrate_policy(config, "confidence", {"t": p}, {"t": y}, lengths, budget=100)
    assert cheap.calibration["validation"]["tasks"]["t"]["mean_exit"] == 1.0


def test_hybrid_lowers_thresholds_per_bucket_within_the_budget():
    y, p = _synthetic(600, seed=1)
    config = ResICConfig(tasks={"t": ["x", "y"]}, vocab_size=10, filters=(4, 4, 4),
                         blocks=(1, 1, 1), ngram_buckets=0, max_len=40,
                         embedding_dim=2)
    # short texts (bucket 0): the first exit is right even when unsure
    lengths = np.where(np.arange(600) < 300, 5, 35)
    short = lengths == 5
    p[short, 0] = np.where(np.arange(2) == y[short, None], 0.55, 0.45)
    conf = calibrate_policy(config, "confidence", {"t": p}, {"t": y}, lengths, budget=0.5)
    hyb = calibrate_policy(config, "hybrid", {"t": p}, {"t": y}, lengths, budget=0.5)
    table = hyb.thresholds["t"]
    assert len(table) == 5 and table[0] < 0.55 < conf.thresholds["t"][0]
    assert hyb.calibration["validation"]["tasks"]["t"]["macro_f1"] >= 1.0 - 0.005
    assert hyb.calibration["validation"]["saved"] > conf.calibration["validation"]["saved"]


def test_policy_file_round_trip_and_checks(tmp_path):
    config = ResICConfig(tasks={"t": ["x", "y"]}, vocab_size=10, filters=(4,), blocks=(3,),
                         ngram_buckets=0)
    p = ExitPolicy("confidence", {"t": EXITS}, {"t": [0.7]}, calibration={"budget_points": 0.5})
    p.save(tmp_path / "p.json")
    q = ExitPolicy.load(tmp_path / "p.json")
    assert q == p and q.calibration["budget_points"] == 0.5
    p.check(config)
    with pytest.raises(InvalidValueError, match=r"is for tasks \['t'\], the model has \['u'\]"):
        p.check(dataclasses.replace(config, tasks={"u": ["x", "y"]}))
    with pytest.raises(InvalidValueError, match=r"one threshold per task. Received: t=\[0.1, 0.2\]"):
        ExitPolicy("entropy", {"t": EXITS}, {"t": [0.1, 0.2]})
    with pytest.raises(InvalidValueError, match="name"):
        ExitPolicy("greedy", {"t": EXITS}, {"t": [0.1]})
    (tmp_path / "bad.json").write_text('{"name": "confidence"}')
    with pytest.raises(InvalidValueError, match="bad.json: not a policy file"):
        ExitPolicy.load(tmp_path / "bad.json")


def test_sweep_traces_cost_against_score():
    y, p = _synthetic()
    config = ResICConfig(tasks={"t": ["x", "y"]}, vocab_size=10, filters=(4, 4, 4),
                         blocks=(1, 1, 1), ngram_buckets=0, embedding_dim=2)
    rows = sweep(config, "confidence", {"t": p}, {"t": y}, np.full(len(y), 20), points=12)
    shares = [r["flops_share"] for r in rows]
    assert len(rows) == 12 and shares == sorted(shares)  # higher thresholds cost more
    assert rows[0]["mean_exit"] == 1.0 and rows[-1]["flops_share"] <= 1.0
    assert rows[-1]["macro_f1"] > rows[0]["macro_f1"]


def test_calibrate_and_export_policy_from_the_command_line(tiny_run, tmp_path, capsys):
    from resic_tf.cli import main
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", str(run), "--policy", "confidence,patience", "--budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "gate.json" in out and "policies/confidence.json" in out and "% saved" in out
    saved = json.loads((run / "policies" / "confidence.json").read_text())
    assert saved["name"] == "confidence" and saved["calibration"]["budget_points"] == 1.0
    v = saved["calibration"]["validation"]
    for task, r in v["tasks"].items():
        assert r["macro_f1"] >= r["lc_macro_f1"] - 0.01 - 1e-9
    assert main(["export", str(run), "--policy", "confidence", "--out", str(tmp_path / "sm")]) == 0
    export = json.loads((tmp_path / "sm" / "1" / "export.json").read_text())
    assert export["early_exit"] is True and export["policy"]["name"] == "confidence"
    assert export["policy"]["thresholds"] == saved["thresholds"]
    assert (tmp_path / "sm" / "1" / "policy.json").exists()
    capsys.readouterr()
    assert main(["export", str(run), "--policy", "entropy", "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"resic calibrate {run} --policy entropy" in err
    assert main(["calibrate", str(run), "--policy", "greedy"]) == 2
    assert "--policy must name policies of" in capsys.readouterr().err

    # evaluate scores the gate and every calibrated policy on the test file
    import pandas as pd

    from conftest import write_rows
    from resic_tf.run import Run, predict_file
    dev = write_rows(tmp_path / "dev.tsv", 80, source="dev.tsv")
    assert main(["evaluate", str(run), "--data", str(dev)]) == 0
    assert "## Early-exit policies" in capsys.readouterr().out
    table = pd.read_csv(run / "eval_dev" / "policies.csv")
    assert sorted(set(table["policy"])) == ["confidence", "length", "patience"]
    loaded = Run.load(run)
    p = predict_file(loaded, dev)
    s = policy_summary(loaded.config, loaded.policy("patience"), p.probs, p.labels, p.lengths)
    row = table[(table["policy"] == "patience") & (table["task"] == "hate")].iloc[0]
    assert row["macro_f1"] == pytest.approx(s["tasks"]["hate"]["macro_f1"], abs=1e-6)
    assert row["saved"] == pytest.approx(s["saved"], abs=1e-6)
    assert "## Early-exit policies" in (run / "eval_dev" / "evaluation.md").read_text()


def test_summary_on_real_predictions_matches_its_parts(tiny_run):
    from resic_tf.run import Run, predict_file
    run = Run.load(tiny_run)
    p = predict_file(run, run.validation)
    pol = ExitPolicy("confidence", {t: run.config.exit_names(t) for t in run.config.tasks},
                     {t: [0.5] for t in run.config.tasks})
    s = policy_summary(run.config, pol, p.probs, p.labels, p.lengths)
    _, exits, blocks = apply_policy(pol, p.probs, p.lengths)
    assert s["mean_blocks_run"] == pytest.approx(blocks.mean())
    cost = policy_flops(run.config, p.lengths, exits)
    assert s["mean_flops"] == pytest.approx(cost.mean())
    assert 0 <= s["saved"] < 1
