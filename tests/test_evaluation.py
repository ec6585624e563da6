"""resic_tf.evaluation (per-exit, max and gate rows: the paper's Tables 1, 4 and 5) and the one
Markdown table writer, on hand-computed predictions and on the tiny session run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_EXITS, write_rows
from resic_tf.config import ResICConfig
from resic_tf.data import encode_labels, load_labelled_texts
from resic_tf.evaluation import evaluate_run, exit_scores, scores_markdown
from resic_tf.gate import LengthGate
from resic_tf.markdown import fmt, markdown_table
from resic_tf.metrics import accuracy, best_index, macro_f1
from resic_tf.run import Run, predict_exits
from resic_tf.vocabulary import text_lengths

NAN = float("nan")


def test_fmt_and_markdown_table():
    assert fmt(0.123456) == "0.1235" and fmt(1.0) == "1.0000" and fmt(0.5, digits=2) == "0.50"
    assert fmt(0.1234, pct=True) == "12.3%" and fmt(1.0, pct=True) == "100.0%"
    assert fmt(None) == "n/a" and fmt(NAN) == "n/a" and fmt(NAN, pct=True) == "n/a"
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |")
    assert markdown_table(["only"], []) == "| only |\n|---|"


def toy():
    """Two tasks, 2 ICs + LC, 4 inputs of lengths 3, 15, 9, 40; a gate sending bucket 0 to ic1
    and every other bucket to the LC."""
    config = ResICConfig(tasks={"t": ["a", "b"], "u": ["x", "y", "z"]}, vocab_size=5,
                         filters=(8,), blocks=(3,), max_len=20)
    p_t = np.array([[[.9, .1], [.2, .8], [.4, .6]],     # exits predict a, b, b
                    [[.3, .7], [.3, .7], [.6, .4]],     # b, b, a
                    [[.2, .8], [.7, .3], [.1, .9]],     # b, a, b
                    [[.6, .4], [.6, .4], [.8, .2]]], np.float32)   # a, a, a
    eye = np.eye(3, dtype=np.float32) * 0.7 + 0.1
    p_u = eye[np.array([[0, 1, 2], [1, 1, 2], [2, 1, 2], [0, 0, 2]])]  # u: ic1, ic2, lc ids
    gate = LengthGate(10, "macro_f1", 1, {t: config.exit_names(t) for t in config.tasks},
                      {"t": [0, 2, 2], "u": [0, 2, 2]}, {"t": 2, "u": 2})
    labels = {"t": np.array([0, 1, 0, 1]), "u": np.array([0, 1, 2, 2])}
    return config, gate, {"t": p_t, "u": p_u}, labels, np.array([3, 15, 9, 40])


def test_exit_scores_hand_computed():
    config, gate, probs, labels, lengths = toy()
    table = exit_scores(config, probs, labels, lengths, gate)
    # task t, y = [0, 1, 0, 1]:
    #   ic1 = [0, 1, 1, 0]: acc 2/4; F1(a) = 2*1/(2+1+1) = 1/2, F1(b) = 1/2 -> 1/2
    #   ic2 = [1, 1, 0, 0]: acc 2/4; F1(a) = 1/2, F1(b) = 1/2 -> 1/2
    #   lc  = [1, 0, 1, 0]: all wrong, acc 0, F1 0
    #   max: ic1 and ic2 tie at 1/2 -> the shallower, ic1
    #   gate: rows 0, 2 (bucket 0) take ic1, rows 1, 3 the lc: [0, 0, 1, 0]: acc 1/4;
    #         F1(a) = 2/(2+2+1) = 0.4, F1(b) = 0 -> 0.2
    # task u, y = [0, 1, 2, 2]:
    #   ic1 = [0, 1, 2, 0]: acc 3/4; F1 = (2/3, 1, 2/3) -> 7/9
    #   ic2 = [1, 1, 1, 0]: acc 1/4; F1 = (0, 2/4, 0) -> 1/6
    #   lc  = [2, 2, 2, 2]: acc 2/4; classes 0, 1 absent from predictions but present in y:
    #         F1 = (0, 0, 2*2/(4+2)) -> 2/9
    #   max: ic1. gate: [0, 2, 2, 2]: acc 3/4; F1 = (1, 0, 4/5) -> 0.6
    expected = pd.DataFrame([
        ["t", "ic1", 0.5, 0.5, ""], ["t", "ic2", 0.5, 0.5, ""], ["t", "lc", 0.0, 0.0, ""],
        ["t", "max", 0.5, 0.5, "ic1"], ["t", "gate", 0.25, 0.2, ""],
        ["u", "ic1", 0.75, 7 / 9, ""], ["u", "ic2", 0.25, 1 / 6, ""], ["u", "lc", 0.5, 2 / 9, ""],
        ["u", "max", 0.75, 7 / 9, "ic1"], ["u", "gate", 0.75, 0.6, ""],
    ], columns=["task", "exit", "accuracy", "macro_f1", "best_exit"])
    pd.testing.assert_frame_equal(table, expected, check_exact=False, atol=1e-12)
    no_gate = exit_scores(config, probs, labels)
    pd.testing.assert_frame_equal(no_gate, expected[expected.exit != "gate"].reset_index(drop=True),
                                  check_exact=False, atol=1e-12)


def test_max_row_uses_the_nan_safe_best_rule():
    config, gate, probs, labels, lengths = toy()
    # with every t prediction from one class only, ties everywhere: the first exit wins
    flat = {"t": np.tile(np.array([[.9, .1]], np.float32), (4, 3, 1)), "u": probs["u"]}
    table = exit_scores(config, flat, labels)
    row = table[(table.task == "t") & (table.exit == "max")].iloc[0]
    assert row.best_exit == "ic1" and row.macro_f1 == pytest.approx(1 / 3)  # F1(a) 2/3, F1(b) 0
    assert best_index([1 / 3, 1 / 3, 1 / 3]) == 0


def test_scores_markdown_exact():
    config, gate, probs, labels, lengths = toy()
    table = exit_scores(config, probs, labels, lengths, gate)
    assert scores_markdown(table[table.task == "t"]) == "\n".join([
        "### t", "",
        "| exit | accuracy | macro-F1 |", "|---|---|---|",
        "| ic1 | 0.5000 | 0.5000 |", "| ic2 | 0.5000 | 0.5000 |", "| lc | 0.0000 | 0.0000 |",
        "| max (ic1) | 0.5000 | 0.5000 |", "| gate | 0.2500 | 0.2000 |", ""])
    md = scores_markdown(table)
    assert md.index("### t") < md.index("### u")  # tasks in model order
    assert "| ic2 | 0.2500 | 0.1667 |" in md and "| max (ic1) | 0.7500 | 0.7778 |" in md


def test_evaluate_run_on_the_tiny_run(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("gate.json"))
    data = write_rows(tmp_path / "dev50.tsv", 50, start=10, source="dev.tsv")
    run = Run.load(run_dir)
    table = evaluate_run(run, data)  # no gate yet; default out_dir RUN_DIR/eval_<data stem>
    out = run_dir / "eval_dev50"
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.csv", "evaluation.md"]
    assert "gate" not in set(table.exit)
    md = (out / "evaluation.md").read_text(encoding="utf-8")
    assert md.startswith(f"# Evaluation of {run_dir} on {data} (50 rows)\n\n"
                         "No gate.json: run `resic calibrate` for the gated row.\n\n### bias")

    rows = load_labelled_texts(data, "comments", ["bias", "hate"])
    labels = encode_labels(rows, run.config.tasks)
    probs = predict_exits(run.model, rows.texts)
    for task, classes in run.config.tasks.items():
        for e, name in enumerate(TINY_EXITS):
            pred = probs[task][:, e].argmax(-1)
            row = table[(table.task == task) & (table.exit == name)].iloc[0]
            assert row.accuracy == pytest.approx(accuracy(labels[task], pred), abs=1e-12)
            assert row.macro_f1 == pytest.approx(macro_f1(labels[task], pred, len(classes)),
                                                 abs=1e-12)
    written = pd.read_csv(out / "evaluation.csv", keep_default_na=False)
    assert list(written.columns) == ["task", "exit", "accuracy", "macro_f1", "best_exit"]
    np.testing.assert_allclose(written.macro_f1, table.macro_f1, atol=1e-6)

    # with a gate: the gate row, and the scores recorded in run.json for HParams
    gate = run.calibrate(min_support=2)
    table = evaluate_run(run, data, tmp_path / "eval")
    gated = table[table.exit == "gate"].set_index("task")
    from resic_tf.gate import gated_predictions
    lengths = text_lengths(rows.texts)
    for task, classes in run.config.tasks.items():
        pred = gated_predictions(gate, task, probs[task], lengths)[0].argmax(-1)
        assert gated.loc[task, "macro_f1"] == pytest.approx(
            macro_f1(labels[task], pred, len(classes)), abs=1e-12)
    scores = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["scores"]
    for task in ("bias", "hate"):
        for exit_ in ("lc", "gate"):
            row = table[(table.task == task) & (table.exit == exit_)].iloc[0]
            for m in ("accuracy", "macro_f1"):
                assert scores[f"dev50/{task}_{exit_}_{m}"] == pytest.approx(getattr(row, m))


def test_tallied_chunks_score_as_the_whole():
    """`ScoreTally` adds confusion matrices and sums chunk by chunk (how `evaluate_run` scores a
    file of any size): any split of the rows gives the whole's tables, policies included."""
    from resic_tf.evaluation import ScoreTally, policy_scores
    from resic_tf.policies import ExitPolicy, policy_summary
    config, gate, probs, labels, lengths = toy()
    policy = ExitPolicy("confidence", {t: config.exit_names(t) for t in config.tasks},
                        {"t": [0.75], "u": [0.75]})
    whole = exit_scores(config, probs, labels, lengths, gate)
    tally = ScoreTally(config, gate, {"confidence": policy})
    for part in (slice(0, 1), slice(1, 3), slice(3, 4)):
        tally.add({t: p[part] for t, p in probs.items()}, {t: y[part] for t, y in labels.items()},
                  lengths[part])
    pd.testing.assert_frame_equal(tally.exit_table(), whole)
    pd.testing.assert_frame_equal(tally.policy_table(),
                                  policy_scores(config, {"confidence": policy}, probs, labels,
                                                lengths))
    s = policy_summary(config, policy, probs, labels, lengths)
    row = tally.policy_table().iloc[0]
    assert row["macro_f1"] == pytest.approx(s["tasks"]["t"]["macro_f1"])
    assert row["mean_exit"] == pytest.approx(s["tasks"]["t"]["mean_exit"])
    assert row["saved"] == pytest.approx(s["saved"])
    assert row["mean_mflops"] == pytest.approx(s["mean_flops"] / 1e6)
