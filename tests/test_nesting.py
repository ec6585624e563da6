"""Nested label sets (`resic_tf.nesting`): found in the training rows, derived at every exit in
Keras and in every served path, the coarse task's own loss kept in training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import DEMO_DIR, TINY_FILTERS
from resic_tf.config import ResICConfig
from resic_tf.layers import DerivedLabels, LateFusion, derive_probabilities
from resic_tf.nesting import derivation_order, find_nested_tasks
from resic_tf.validation import InvalidValueError

TASKS = {"intent": ["a", "b", "c", "d"], "domain": ["x", "y"], "other": ["p", "q", "r"]}


def test_find_nested_tasks_by_hand():
    ids = {"intent": np.array([0, 0, 1, 1, 2, 2, 3, 3]),
           "domain": np.array([1, 1, 0, 0, 1, 1, 0, 0]),
           "other": np.array([0, 1, 2, 0, 1, 2, 0, 1])}
    assert find_nested_tasks(TASKS, ids) == {"domain": {"from": "intent", "classes": [1, 0, 1, 0]}}
    # one row of intent "a" with domain "x": "a" is in two domains, nothing nests
    crossed = {**ids, "domain": np.array([1, 0, 0, 0, 1, 1, 0, 0])}
    assert find_nested_tasks(TASKS, crossed) == {}
    # intent "d" seen once cannot show where it belongs (min_rows 2)
    once = {t: v[:7] for t, v in ids.items()}
    assert find_nested_tasks(TASKS, once) == {}
    assert find_nested_tasks(TASKS, once, min_rows=1)["domain"]["classes"] == [1, 0, 1, 0]
    # a coarse class that no finer class falls into: not derivable
    tasks3 = {**TASKS, "domain": ["x", "y", "z"]}
    assert find_nested_tasks(tasks3, ids) == {}
    # three levels: the nearest finer task is used, and the order derives the middle one first
    levels = {"leaf": list("abcdef"), "mid": list("abc"), "top": list("xy")}
    rows = {"leaf": np.repeat(np.arange(6), 2), "mid": np.repeat([0, 0, 1, 1, 2, 2], 2),
            "top": np.repeat([0, 0, 0, 0, 1, 1], 2)}
    found = find_nested_tasks(levels, rows)
    assert found == {"mid": {"from": "leaf", "classes": [0, 0, 1, 1, 2, 2]},
                     "top": {"from": "mid", "classes": [0, 0, 1]}}
    assert derivation_order({"top": found["top"], "mid": found["mid"]}) == ["mid", "top"]


def test_derived_probabilities_by_hand():
    fine = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32)
    want = np.array([[0.2 + 0.4, 0.1 + 0.3], [0.1 + 0.1, 0.7 + 0.1]], np.float32)
    np.testing.assert_allclose(derive_probabilities(fine, [1, 0, 1, 0], 2), want, rtol=1e-6)
    layer = DerivedLabels([1, 0, 1, 0], 2)
    own = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(layer(fine, own, training=False), want, rtol=1e-6)
    np.testing.assert_allclose(layer(fine, own, training=True), own)  # its own loss trains
    assert DerivedLabels.from_config(layer.get_config()).coarse_of == [1, 0, 1, 0]
    with pytest.raises(InvalidValueError, match=r"^`coarse_of` must be in \[0, 1\]. Received: "
                                                r"coarse_of=2$"):
        DerivedLabels([0, 2], 2)


@pytest.mark.parametrize("nested, match", [
    ({"domain": {"from": "intent", "classes": [0, 1]}}, r"nested_tasks\['domain'\]"),
    ({"domain": {"from": "nope", "classes": [0, 1, 0, 1]}}, r"nested_tasks\['domain'\]"),
    ({"domain": {"from": "intent", "classes": [0, 1, 0, 2]}}, r"nested_tasks\['domain'\]"),
    ({"domain": {"from": "intent", "classes": [0, 1, 0, 1]},
      "intent": {"from": "domain", "classes": [0, 1]}}, "cycle"),
])
def test_config_checks_nested_tasks(nested, match):
    with pytest.raises(InvalidValueError, match=match):
        ResICConfig(tasks=TASKS, vocab_size=10, nested_tasks=nested)


def test_config_round_trips_nested_tasks_and_old_configs_have_none():
    cfg = ResICConfig(tasks=TASKS, vocab_size=10,
                      nested_tasks={"domain": {"from": "intent", "classes": [1, 0, 1, 0]}})
    again = ResICConfig.from_json(cfg.to_json())
    assert again == cfg and dict(again.nested_tasks["domain"]) == \
        {"from": "intent", "classes": (1, 0, 1, 0)}
    old = json.loads(cfg.to_json())
    del old["nested_tasks"]
    assert dict(ResICConfig.from_dict(old).nested_tasks) == {}


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    """The tiny run's 300 real rows with a third label set, `toxic` ("yes" for hate or
    offensive, "no" for none): a coarser label set nested in `hate`. One block per stage (four
    exits) keeps the traces short."""
    from resic_tf.cli import main
    root = tmp_path_factory.mktemp("nested")
    lines = (DEMO_DIR / "train.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    hate = header.index("hate")
    rows = ["\t".join(header + ["toxic"])]
    for line in lines[1:301]:
        cells = line.split("\t")
        rows.append("\t".join(cells + ["no" if cells[hate] == "none" else "yes"]))
    (root / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["train", "--data", str(root / "train.tsv"), "--val-split", "0.2",
                 "--text-col", "comments", "--label-cols", "bias,hate,toxic", "--filters",
                 TINY_FILTERS, "--blocks", "1,1,1,1", "--epochs", "1", "--batch-size", "32",
                 "--seed", "1", "--linear-ngrams", "0", "--wide-epochs", "0",  # 0.13's recipe: a
                 # tiny deep branch beside a linear one serves near-equal exits (rows would stop
                 # at too few depths for the policy check below)
                 "--out", str(root / "run"), "--quiet"]) == 0
    assert main(["calibrate", str(root / "run"), "--min-support", "2"]) == 0
    return root / "run"


def test_training_finds_the_nesting_and_every_served_path_derives(nested_run, tmp_path):
    from resic_tf.export import export_run
    from resic_tf.policies import ExitPolicy, apply_policy
    from resic_tf.run import Run, predict_exits
    from resic_tf.vocabulary import text_lengths

    run = Run.load(nested_run)
    hate = run.config.tasks["hate"]
    assert list(run.config.tasks["toxic"]) == ["no", "yes"]
    assert dict(run.config.nested_tasks["toxic"]) == {
        "from": "hate", "classes": tuple(0 if c == "none" else 1 for c in hate)}
    lines = (DEMO_DIR / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:61]
    texts = [line.split("\t")[0] for line in lines] + ["", "가" * 300]
    probs = predict_exits(run.model, texts)
    none = hate.index("none")
    want = np.stack([probs["hate"][..., none], 1 - probs["hate"][..., none]], -1)
    np.testing.assert_allclose(probs["toxic"], want, atol=1e-6)  # every exit, derived
    np.testing.assert_allclose(probs["toxic_wide"][:, 0], probs["hate_wide"][:, none], atol=1e-6)
    # the coarse task keeps its own heads (trained by its own loss) under `{exit}_own`
    assert isinstance(run.model.get_layer("toxic_lc_own"), LateFusion)
    assert isinstance(run.model.get_layer("toxic_lc"), DerivedLabels)

    # an early-exit export stops rows at many exits; what it serves is the policy applied to
    # the same export's all_exits, the derived task included
    exits = {t: run.config.exit_names(t) for t in run.config.tasks}
    mid = {t: [float(np.median(probs[t][:, :-1].max(-1)))] for t in run.config.tasks}
    run.policies["confidence"] = ExitPolicy("confidence", exits, mid)
    path = export_run(run, tmp_path / "sm", early_exit=True, policy="confidence")
    loaded = tf.saved_model.load(str(path))
    text = tf.constant(texts, tf.string)
    served = {k: v.numpy() for k, v in loaded.signatures["serving_default"](text=text).items()}
    stacked = {k[:-len("_probabilities")]: v.numpy()
               for k, v in loaded.signatures["all_exits"](text=text).items()}
    np.testing.assert_allclose(stacked["toxic"], probs["toxic"], atol=1e-5)
    chosen, chosen_exits, blocks = apply_policy(run.policy("confidence"), stacked,
                                                text_lengths(texts))
    assert served["blocks_run"].tolist() == blocks.tolist() and len(set(blocks.tolist())) >= 3
    for task in run.config.tasks:
        assert served[f"{task}_exit"].tolist() == (chosen_exits[task] + 1).tolist(), task
        np.testing.assert_allclose(served[f"{task}_probabilities"], chosen[task], atol=1e-5)
