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
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.policies import (ExitPolicy, PairedBootstrap, apply_policy, bootstrap_counts,
                               calibrate_policy, fires, normalised_entropy, patience_counts,
                               policy_exits, policy_markdown, policy_summary, sweep)
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
    # the plain criterion (lowest first) jumps over the thresholds in (0.55, 0.6] that stop
    # the short rows at the wrong ic2; the bootstrap's search does not (below)
    conf = calibrate_policy(config, "confidence", {"t": p}, {"t": y}, lengths, budget=0.5,
                            confidence=0)
    hyb = calibrate_policy(config, "hybrid", {"t": p}, {"t": y}, lengths, budget=0.5,
                           confidence=0)
    table = hyb.thresholds["t"]
    assert len(table) == 5 and table[0] < 0.55 < conf.thresholds["t"][0]
    assert hyb.calibration["validation"]["tasks"]["t"]["macro_f1"] >= 1.0 - 0.005
    assert hyb.calibration["validation"]["saved"] > conf.calibration["validation"]["saved"]
    # bootstrap: the next candidate below the confidence start (0.775) is 0.575, past ic2's
    # 0.6: the short rows would stop there, wrong; so no bucket goes lower
    boot = calibrate_policy(config, "hybrid", {"t": p}, {"t": y}, lengths, budget=0.5)
    assert boot.thresholds["t"] == [conf.thresholds["t"][0]] * 5
    assert boot.calibration["validation"]["tasks"]["t"]["macro_f1"] == 1.0


def test_bootstrap_counts_are_seeded_resamples_of_every_row():
    a = bootstrap_counts(50, 40, seed=3)
    assert a.shape == (50, 40) and a.dtype == np.int32
    assert (a.sum(0) == 50).all() and (a >= 0).all()  # each column: 50 rows drawn
    np.testing.assert_array_equal(a, bootstrap_counts(50, 40, seed=3))
    assert not np.array_equal(a, bootstrap_counts(50, 40, seed=4))
    assert (a == 0).mean() == pytest.approx(np.exp(-1), abs=0.05)  # ~37% of rows left out


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_paired_bootstrap_equals_scoring_each_resample_row_by_row(metric):
    """The per-class sums updated over changed rows give exactly the score of each resample
    expanded into rows, policy minus LC, also when a rare class is missing from a resample."""
    rng = np.random.default_rng(5)
    n, k = 60, 3
    y = rng.integers(0, 2, n)
    y[:2] = 2  # class 2 has two rows: many resamples lack it
    lc = np.where(rng.random(n) < 0.8, y, rng.integers(0, k, n))
    pred = np.where(rng.random(n) < 0.3, rng.integers(0, k, n), lc)
    counts = bootstrap_counts(n, 30, seed=1)
    boot = PairedBootstrap(counts, y, lc, k, metric)

    def scored(yy, pp):
        return macro_f1(yy, pp, k) if metric == "macro_f1" else accuracy(yy, pp)

    def brute(pred):
        out = []
        for b in range(counts.shape[1]):
            rows = np.repeat(np.arange(n), counts[:, b])
            out.append(scored(y[rows], pred[rows]) - scored(y[rows], lc[rows]))
        return out
    assert any((counts[:2, b] == 0).all() for b in range(30))
    # a sweep: each call updates from the previous prediction when that is closer
    near = pred.copy()
    near[[3, 10, 40]] = (near[[3, 10, 40]] + 1) % k
    for p in (pred, near, pred, lc, near):
        np.testing.assert_allclose(boot.differences(p), brute(p), atol=1e-12)
    assert boot.differences(lc).tolist() == [0.0] * 30  # the LC against itself
    assert boot.lower_bound(pred, 0.9) == pytest.approx(np.quantile(brute(pred), 0.1),
                                                        abs=1e-12)


def _made(*groups, max_len=40):
    """Two classes (alternating), exits ic1, ic2, LC. Each group: (rows, ic1's top probability,
    rows ic1 gets wrong (the group's last), rows the LC gets wrong (its first), text length).
    ic2 is wrong everywhere at 0.55; the LC answers at 0.99."""
    n = sum(g[0] for g in groups)
    y = np.arange(n) % 2
    p = np.zeros((n, 3, 2), np.float32)
    first, lc = y.copy(), y.copy()
    conf, lengths = np.zeros(n), np.zeros(n, np.int64)
    start = 0
    for rows, c, ic1_wrong, lc_wrong, length in groups:
        part = slice(start, start + rows)
        conf[part], lengths[part] = c, length
        first[start + rows - ic1_wrong:start + rows] ^= 1
        lc[start:start + lc_wrong] ^= 1
        start += rows
    at = np.arange(n)
    p[at, 0, first], p[at, 0, 1 - first] = conf, 1 - conf
    p[at, 1, 1 - y], p[at, 1, y] = 0.55, 0.45
    p[at, 2, lc], p[at, 2, 1 - lc] = 0.99, 0.01
    config = ResICConfig(tasks={"t": ["x", "y"]}, vocab_size=10, filters=(4, 4, 4),
                         blocks=(1, 1, 1), ngram_buckets=0, embedding_dim=2, max_len=max_len)
    return config, {"t": p}, {"t": y}, lengths


def _lucky():
    """150 easy rows (ic1 right at 0.95) and 50 medium ones (ic1 at 0.7, wrong on one); the LC is
    always right. Stopping the medium rows at ic1 costs 1 error in 200 (0.5 points of
    macro-F1); a resample draws that row twice or more with probability 1 - 2/e = 26%, and
    loses twice as much."""
    return _made((150, 0.95, 0, 0, 30), (50, 0.7, 1, 0, 30))


def test_bootstrap_rejects_the_threshold_that_meets_the_budget_by_luck():
    config, probs, labels, lengths = _lucky()
    one_error = macro_f1(labels["t"], probs["t"][:, 2].argmax(-1), 2) - \
        macro_f1(labels["t"], probs["t"][:, 0].argmax(-1), 2)
    assert one_error == pytest.approx(0.005, abs=2e-4)  # within a budget of 0.75 points
    plain = calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75,
                             confidence=0)
    boot = calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75)
    # plain: every row stops at ic1 (the cheapest), the error included
    assert plain.thresholds["t"][0] <= 0.7
    assert plain.calibration["validation"]["tasks"]["t"]["mean_exit"] == 1.0
    assert plain.calibration["criterion"] == "point" and "bootstrap" not in plain.calibration
    # bootstrap: the medium rows go on to the LC; the easy rows still stop at ic1
    assert 0.7 < boot.thresholds["t"][0] <= 0.95
    v = boot.calibration["validation"]["tasks"]["t"]
    assert v["macro_f1"] == v["lc_macro_f1"] == 1.0
    assert v["mean_exit"] == pytest.approx(1 + 2 * 50 / 200)
    b = boot.calibration["bootstrap"]
    assert boot.calibration["criterion"] == "bootstrap"
    assert (b["confidence"], b["resamples"], b["seed"], b["paired"]) == (0.9, 500, 0, True)
    assert b["tasks"]["t"]["lower_bound_points"] == 0.0  # the chosen policy changes no answer
    # the plain choice's own bound, on the same resamples, is over the budget
    pb = PairedBootstrap(bootstrap_counts(200, 500, 0), labels["t"],
                         probs["t"][:, 2].argmax(-1), 2)
    assert pb.lower_bound(probs["t"][:, 0].argmax(-1), 0.9) < -0.0075
    # a lower confidence (the median resample) accepts the plain choice again
    assert calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75,
                            confidence=0.5).thresholds == plain.thresholds
    # --bootstrap 0 is the plain criterion too; so is a budget the bound meets anyway
    assert calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75,
                            resamples=0).thresholds == plain.thresholds
    assert calibrate_policy(config, "confidence", probs, labels, lengths,
                            budget=5).thresholds == plain.thresholds
    assert "90% lower bound vs LC" in policy_markdown(boot) and \
        "in 90% of 500 paired bootstrap resamples (seed 0)" in policy_markdown(boot)
    assert "(no bootstrap)" in policy_markdown(plain)
    with pytest.raises(InvalidValueError, match=r"`confidence` must be in \[0, 1\)"):
        calibrate_policy(config, "confidence", probs, labels, lengths, confidence=1.0)


def test_bootstrap_search_stops_at_the_first_threshold_that_fails():
    """20 more rows at 0.6 on which ic1 is right and the LC wrong: stopping everything at ic1
    gains 19 rows and passes every test, but on the way down from the LC the medium rows'
    error fails first, and the search does not go past it."""
    config, probs, labels, lengths = _made((150, 0.95, 0, 0, 30), (50, 0.7, 1, 0, 30),
                                           (20, 0.6, 0, 20, 30))
    plain = calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75,
                             confidence=0)
    boot = calibrate_policy(config, "confidence", probs, labels, lengths, budget=0.75)
    assert plain.thresholds["t"][0] <= 0.6
    assert 0.7 < boot.thresholds["t"][0] <= 0.95
    pb = PairedBootstrap(bootstrap_counts(220, 500, 0), labels["t"],
                         probs["t"][:, 2].argmax(-1), 2)
    assert pb.lower_bound(probs["t"][:, 0].argmax(-1), 0.9) > 0.05  # the cheapest passes
    assert boot.calibration["validation"]["tasks"]["t"]["macro_f1"] == \
        boot.calibration["validation"]["tasks"]["t"]["lc_macro_f1"]


def test_bootstrap_calibration_is_deterministic_given_the_seed():
    config, probs, labels, lengths = _lucky()  # 1.5 points: the error may stop at ic1
    runs = [calibrate_policy(config, "confidence", probs, labels, lengths, budget=1.5, seed=s)
            for s in (7, 7, 8)]
    assert runs[0].thresholds == runs[1].thresholds == runs[2].thresholds
    assert runs[0].thresholds["t"][0] <= 0.7
    assert runs[0].calibration == runs[1].calibration
    assert runs[0].calibration["bootstrap"]["seed"] == 7
    # another seed draws other resamples: other bound figures for the same policy
    bounds = [r.calibration["bootstrap"]["tasks"]["t"]["lower_bound_points"] for r in runs]
    assert bounds[0] == bounds[1] != bounds[2]
    assert -1.5 <= min(bounds) and max(bounds) < -0.5  # about twice the one error's 0.5


def test_hybrid_lowers_a_bucket_only_where_the_bootstrap_agrees():
    """Easy rows in bucket 2; medium rows (ic1 at 0.7) all right in bucket 0, one wrong of 25 in
    bucket 1, five wrong in bucket 3. Confidence alone cannot stop the medium rows at ic1."""
    groups = [(150, 0.95, 0, 0, 25), (25, 0.7, 0, 0, 5), (25, 0.7, 1, 0, 15),
              (25, 0.7, 5, 0, 35)]
    config, probs, labels, lengths = _made(*groups)
    kw = dict(budget=1.5, min_support=20)
    boot = calibrate_policy(config, "hybrid", probs, labels, lengths, **kw)
    plain = calibrate_policy(config, "hybrid", probs, labels, lengths, confidence=0, **kw)
    conf = calibrate_policy(config, "confidence", probs, labels, lengths, **kw)
    start = conf.thresholds["t"][0]
    assert 0.7 < start <= 0.95
    table = boot.thresholds["t"]
    # bucket 0 (all right at ic1) is lowered; bucket 1 is not: its error would keep the task
    # within 1.5 points, but not the step no worse than before it; bucket 3 stays too
    assert table[0] <= 0.7 < start == table[1] == table[3]
    exits = policy_exits(boot, probs, lengths)["t"]
    assert (exits[lengths == 5] == 0).all() and (exits[lengths == 15] == 2).all()
    assert boot.calibration["bootstrap"]["tasks"]["t"]["lower_bound_points"] == 0.0
    assert boot.calibration["validation"]["saved"] > conf.calibration["validation"]["saved"]
    # the plain criterion stops bucket 1 at ic1, error included, whose bound meets the budget
    ptable = plain.thresholds["t"]
    assert ptable[0] <= 0.7 and ptable[1] <= 0.7 < ptable[3]
    pb = PairedBootstrap(bootstrap_counts(len(lengths), 500, 0), labels["t"],
                         probs["t"][:, 2].argmax(-1), 2)
    chosen, _, _ = apply_policy(plain, probs, lengths)
    assert -0.015 <= pb.lower_bound(chosen["t"].argmax(-1), 0.9) < 0


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


def test_calibrate_and_export_policy_from_the_command_line(tiny_run, tmp_path, capsys,
                                                           monkeypatch):
    import resic_tf.run
    from resic_tf.cli import main
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calls = []  # the gate and both policies are chosen on one prediction pass
    real = resic_tf.run.predict_file
    monkeypatch.setattr(resic_tf.run, "predict_file",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["calibrate", str(run), "--policy", "confidence,patience", "--budget", "1"]) == 0
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert "gate.json" in out and "policies/confidence.json" in out and "% saved" in out
    saved = json.loads((run / "policies" / "confidence.json").read_text())
    assert saved["name"] == "confidence" and saved["calibration"]["budget_points"] == 1.0
    boot = saved["calibration"]["bootstrap"]  # on by default
    assert saved["calibration"]["criterion"] == "bootstrap" and boot["confidence"] == 0.9
    for task, r in boot["tasks"].items():
        assert r["lower_bound_points"] >= -1.0 - 1e-9
    v = saved["calibration"]["validation"]
    for task, r in v["tasks"].items():
        assert r["macro_f1"] >= r["lc_macro_f1"] - 0.01 - 1e-9
    assert main(["export", str(run), "--policy", "confidence", "--out", str(tmp_path / "sm")]) == 0
    export = json.loads((tmp_path / "sm" / "1" / "export.json").read_text())
    assert export["early_exit"] is True and export["policy"]["name"] == "confidence"
    assert export["policy"]["thresholds"] == saved["thresholds"]
    assert export["policy"]["calibration"]["bootstrap"] == boot
    assert (tmp_path / "sm" / "1" / "policy.json").exists()
    capsys.readouterr()
    assert main(["export", str(run), "--policy", "entropy", "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"resic calibrate {run} --policy entropy" in err
    assert main(["calibrate", str(run), "--policy", "greedy"]) == 2
    assert "--policy must name policies of" in capsys.readouterr().err
    # --confidence 0: the point criterion alone, as before
    assert main(["calibrate", str(run), "--policy", "patience", "--budget", "1",
                 "--confidence", "0"]) == 0
    assert "(no bootstrap)" in capsys.readouterr().out
    plain = json.loads((run / "policies" / "patience.json").read_text())["calibration"]
    assert plain["criterion"] == "point" and "bootstrap" not in plain
    assert main(["calibrate", str(run), "--policy", "patience", "--bootstrap", "50",
                 "--bootstrap-seed", "3", "--confidence", "0.8"]) == 0
    capsys.readouterr()
    b = json.loads((run / "policies" / "patience.json").read_text())["calibration"]["bootstrap"]
    assert (b["confidence"], b["resamples"], b["seed"]) == (0.8, 50, 3)

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


# A late-fusion model's exit 0: its wide classifier, before the stem and every block.
WIDE = np.array([[0.95, 0.05], [0.6, 0.4]], np.float32)


def wide_policy(name, values, wide, width=10):
    return ExitPolicy(name, {"t": EXITS}, {"t": values}, width, wide_thresholds={"t": wide})


def test_the_wide_exit_has_its_own_threshold_and_stops_rows_before_any_block():
    probs, lengths = {"t": PROBS, "t_wide": WIDE}, [5, 15]
    # wide threshold 0.9: row 0 stops at the wide classifier (0.95): exit -1, no block run;
    # row 1 (0.6) goes on, and the blocks' threshold 0.8 takes it to the LC
    pol = wide_policy("confidence", [0.8], 0.9)
    assert pol.wide_exit and not policy("confidence", [0.8]).wide_exit
    chosen, exits, blocks = apply_policy(pol, probs, lengths)
    assert exits["t"].tolist() == [-1, 2] and blocks.tolist() == [0, 3]
    np.testing.assert_array_equal(chosen["t"], [WIDE[0], PROBS[1, 2]])
    # a wide threshold of its own: at 0.5 both rows stop there, whatever the blocks' is
    assert policy_exits(wide_policy("confidence", [0.8], 0.5), probs, lengths)["t"].tolist() == \
        [-1, -1]
    # entropy: H(0.95, 0.05) / log 2 = 0.286 is at or below 0.3; H(0.6, 0.4) = 0.971 is not
    assert policy_exits(wide_policy("entropy", [0.5], 0.3), probs, lengths)["t"].tolist() == \
        [-1, 2]
    # patience keeps counting over the blocks' exits; the wide exit reads the top probability
    assert policy_exits(wide_policy("patience", [1], 0.9), probs, lengths)["t"].tolist() == \
        [-1, 1]
    # hybrid: one wide threshold per task, beside the per-bucket ones
    assert policy_exits(wide_policy("hybrid", [0.55, 0.95], 0.99), probs, lengths)["t"] \
        .tolist() == [0, 2]
    # the same policy without the wide exit never reads it
    assert policy_exits(policy("confidence", [0.8]), probs, lengths)["t"].tolist() == [1, 2]
    with pytest.raises(InvalidValueError, match="'t_wide'"):
        policy_exits(pol, {"t": PROBS}, lengths)
    with pytest.raises(InvalidValueError, match="length policy"):
        wide_policy("length", [2, 0], 0.5)
    with pytest.raises(InvalidValueError, match="one value per task"):
        ExitPolicy("confidence", {"t": EXITS}, {"t": [0.8]}, wide_thresholds={"u": 0.5})


def test_a_row_stopped_at_the_wide_exit_costs_the_wide_branch_alone():
    from resic_tf.flops import wide_flops
    config = ResICConfig(tasks={"t": ["a", "b", "c"], "u": ["a", "b"]}, vocab_size=10,
                         filters=(4, 8), blocks=(1, 1), embedding_dim=2, cbam_reduction=2,
                         ngram_buckets=16, ngram_dim=5, ngram_sizes=(1, 2), wide_fusion="late")
    L = 9
    # the n-gram mean (9 steps x 2 sizes x 5 dims) and the two wide classifiers (5 -> 3, 5 -> 2)
    assert wide_flops(config, L) == 90 + 2 * 5 * 3 + 2 * 5 * 2
    assert policy_flops(config, [L], {"t": [-1], "u": [-1]}).tolist() == [wide_flops(config, L)]
    # one task going on to block 1 costs what the stem and block 1 cost with both tasks' heads
    assert policy_flops(config, [L], {"t": [-1], "u": [0]}).tolist() == \
        [exit_flops(config, L)[0]]
    assert policy_flops(config, [L], {"t": [1], "u": [-1]}).tolist() == \
        [forward_flops(config, L)]


def test_calibration_stops_rows_at_the_wide_exit_when_it_is_right(tmp_path):
    """A wide classifier as right as the LC and confident on half the rows, an IC that never is:
    those rows stop before any block, the others run to the LC; without the wide exit every
    row runs to the LC. A wide classifier that is confidently wrong is never used."""
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, filters=(4, 8), blocks=(1, 1),
                         embedding_dim=2, cbam_reduction=2, ngram_buckets=16, ngram_dim=5,
                         wide_fusion="late")
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    onehot = np.eye(2)[y]
    lc = 0.8 * onehot + 0.1  # right on every row
    ic = np.full((n, 2), 0.5)  # no information: never confident
    sure = np.arange(n) % 2 == 0
    wide = np.where(sure[:, None], 0.98 * onehot + 0.01, 0.5)
    probs = {"t": np.stack([ic, lc], axis=1).astype(np.float32), "t_wide": wide.astype(np.float32)}
    lengths = np.full(n, 20)
    for criterion in ({}, {"confidence": 0}):
        pol = calibrate_policy(config, "confidence", probs, {"t": y}, lengths, budget=0.5,
                               **criterion)
        assert pol.wide_exit and 0.5 < pol.wide_thresholds["t"] <= 0.98
        _, exits, blocks = apply_policy(pol, probs, lengths)
        assert (exits["t"][sure] == -1).all() and (exits["t"][~sure] == 1).all()
        assert (blocks[sure] == 0).all()
        assert pol.calibration["validation"]["tasks"]["t"]["macro_f1"] == 1.0
        assert pol.calibration["validation"]["saved"] > 0.45
    off = calibrate_policy(config, "confidence", probs, {"t": y}, lengths, budget=0.5,
                           wide_exit=False)
    assert not off.wide_exit and (policy_exits(off, probs, lengths)["t"] == 1).all()
    wrong = {**probs, "t_wide": (0.98 * np.eye(2)[1 - y] + 0.01).astype(np.float32)}
    never = calibrate_policy(config, "entropy", wrong, {"t": y}, lengths, budget=0.5)
    assert (policy_exits(never, wrong, lengths)["t"] == 1).all()
    # the policy file keeps the wide thresholds; policy files written before them load without
    pol.save(tmp_path / "p.json")
    assert ExitPolicy.load(tmp_path / "p.json").wide_thresholds == pol.wide_thresholds
    d = pol.to_dict()
    del d["wide_thresholds"]
    assert not ExitPolicy.from_dict(d).wide_exit
    pol.check(config)
    with pytest.raises(InvalidValueError, match="late-fusion"):
        pol.check(dataclasses.replace(config, wide_fusion="features"))
    assert "exit 0, the wide classifier" in policy_markdown(pol)
