"""ResICClassifier.compile(): Eq. 1 loss weights from the model itself, per-exit stateful
metrics that reach History, EarlyStopping and CSVLogger, and fit on raw strings with labels keyed
by task."""
from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

from conftest import DEMO_DIR
from resic_tf.config import ResICConfig
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.model import (ResICClassifier, build_backbone, build_model, exit_loss_weights,
                            loss_weights_of)
from resic_tf.validation import InvalidValueError

TASKS = {"bias": ["gender", "none", "others"], "hate": ["hate", "none", "offensive"]}


def config(**overrides) -> ResICConfig:
    kwargs = {"tasks": TASKS, "vocab_size": 12, "filters": (4, 4), "blocks": (1, 2),
              "max_len": 16, "embedding_dim": 2, **overrides}
    return ResICConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# compile(): defaults
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks, weighting, expected", [
    # 3 blocks: N = 2 internal classifiers -> ic1 1/2, ic2 2/2, lc 1
    ((1, 2), "paper", {"ic1": 0.5, "ic2": 1.0, "lc": 1.0}),
    # 5 blocks: N = 4 -> 1/4, 2/4, 3/4, 4/4, lc 1
    ((2, 3), "paper", {"ic1": 0.25, "ic2": 0.5, "ic3": 0.75, "ic4": 1.0, "lc": 1.0}),
    ((2, 3), "uniform", {"ic1": 1.0, "ic2": 1.0, "ic3": 1.0, "ic4": 1.0, "lc": 1.0}),
    # 2 blocks: N = 1 -> ic1 1/1
    ((1, 1), "paper", {"ic1": 1.0, "lc": 1.0}),
])
def test_auto_loss_weights_are_eq_1_of_the_models_own_depth(blocks, weighting, expected):
    model = build_model(config(blocks=blocks, loss_weighting=weighting))
    model.compile()
    want = {f"{task}_{e}": w for task in TASKS for e, w in expected.items()}
    assert model.get_compile_config()["loss_weights"] == pytest.approx(want)
    assert set(model.get_compile_config()["loss_weights"]) == set(model.output_names)
    assert loss_weights_of(model) == pytest.approx(want)
    assert exit_loss_weights(config(blocks=blocks, loss_weighting=weighting)) == \
        pytest.approx(want)
    # the default optimizer is Adam(1e-3); every exit has a plain cross-entropy loss
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    losses = model.get_compile_config()["loss"]
    assert sorted(losses) == sorted(model.output_names)
    assert {v["class_name"] for v in losses.values()} == {"ExitLoss"}
    assert all(v["config"]["label_smoothing"] == 0.0 and v["config"]["class_weights"] is None
               for v in losses.values())


def test_auto_weights_read_the_classifier_not_a_config():
    """A classifier assembled by hand (no ResICConfig) weighs by its own tasks, depth and
    `loss_weighting`."""
    backbone = build_backbone(config(blocks=(2, 3)))
    model = ResICClassifier(backbone, {"sent": ["neg", "pos"]}, loss_weighting="uniform")
    model.compile()
    assert model.get_compile_config()["loss_weights"] == {
        f"sent_{e}": 1.0 for e in ("ic1", "ic2", "ic3", "ic4", "lc")}
    paper = ResICClassifier(build_backbone(config(blocks=(2, 3))), {"sent": ["neg", "pos"]})
    paper.compile()
    assert paper.get_compile_config()["loss_weights"] == pytest.approx(
        {"sent_ic1": 0.25, "sent_ic2": 0.5, "sent_ic3": 0.75, "sent_ic4": 1.0, "sent_lc": 1.0})
    with pytest.raises(InvalidValueError, match=r"^`loss_weighting` must be one of \['paper', "
                                                r"'uniform'\]. Received: loss_weighting='eq2'$"):
        ResICClassifier(build_backbone(config()), {"sent": ["neg", "pos"]},
                        loss_weighting="eq2")


@pytest.mark.parametrize("weights, received", [
    # a misspelled key: Keras 3 would silently reassign the weights by sorted position
    ({"bias_ic1": 0.5, "bias_ic2": 1.0, "bias_lc": 1.0, "hate_ic1": 0.5, "hate_ic2": 1.0,
      "hate_LC": 1.0}, "['bias_ic1', 'bias_ic2', 'bias_lc', 'hate_LC', 'hate_ic1', 'hate_ic2']"),
    # a missing output
    ({"bias_ic1": 0.5, "bias_ic2": 1.0, "bias_lc": 1.0}, "['bias_ic1', 'bias_ic2', 'bias_lc']"),
])
def test_mismatched_loss_weight_keys_raise(weights, received):
    model = build_model(config())
    with pytest.raises(InvalidValueError) as info:
        model.compile(loss_weights=weights)
    assert str(info.value) == (
        f"Loss-weight keys {received} do not match model outputs ['bias_ic1', 'bias_ic2', "
        "'bias_lc', 'hate_ic1', 'hate_ic2', 'hate_lc']")
    # matching keys in another order are fine and kept as given
    good = {name: 0.1 * (i + 1) for i, name in enumerate(reversed(model.output_names))}
    model.compile(loss_weights=good)
    assert model.get_compile_config()["loss_weights"] == pytest.approx(good)


def test_metrics_none_compiles_no_exit_metrics():
    model = build_model(config())
    model.compile(metrics=None)
    ids = np.random.default_rng(0).integers(0, 12, size=(4, 16)).astype("int32")
    y = {"bias": np.array([0, 1, 2, 0]), "hate": np.array([1, 1, 0, 2])}
    result = model.evaluate(ids, y, verbose=0, return_dict=True)
    assert sorted(result) == sorted(["loss", *(f"{o}_loss" for o in model.output_names)])
    model.compile()
    result = model.evaluate(ids, y, verbose=0, return_dict=True)
    assert {f"{o}_{m}" for o in model.output_names for m in ("accuracy", "macro_f1")} <= \
        set(result)


# ---------------------------------------------------------------------------------------------
# fit on raw strings: the compiled metrics reach History, EarlyStopping and CSVLogger
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs on 96 real rows balanced over the hate classes; 24 other rows validate."""
    rows = load_labelled_texts(DEMO_DIR / "train.tsv", "comments", ["bias", "hate"])
    hate = np.array(rows.labels["hate"])
    index = np.concatenate([np.flatnonzero(hate == c)[:40] for c in ("hate", "none", "offensive")])
    np.random.default_rng(0).shuffle(index)
    train, val = rows.subset(index[:96]), rows.subset(index[96:])
    tasks = {c: sorted_labels(rows.labels[c]) for c in ("bias", "hate")}
    from resic_tf.vocabulary import CharVocabulary
    vocab = CharVocabulary.build(train.texts)
    cfg = ResICConfig(tasks=tasks, vocab_size=vocab.size, filters=(8, 8), blocks=(1, 2),
                      max_len=64, embedding_dim=8)
    keras.utils.set_random_seed(3)  # a seed whose exits do not all predict one class
    model = build_model(cfg, vocab)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    csv_path = tmp_path_factory.mktemp("fit") / "log.csv"
    stopper = keras.callbacks.EarlyStopping(monitor="val_hate_lc_macro_f1", patience=5)
    val_labels = encode_labels(val, tasks)
    history = model.fit(train.texts, encode_labels(train, tasks), batch_size=16, epochs=2,
                        validation_data=(val.texts, val_labels), verbose=0,
                        callbacks=[stopper, keras.callbacks.CSVLogger(str(csv_path))])
    return model, history, val, val_labels, stopper, csv_path


def test_history_has_every_exits_metrics(fitted):
    model, history, *_ = fitted
    assert history.epoch == [0, 1]
    keys = set(history.history)
    for o in model.output_names:
        for prefix in ("", "val_"):
            for m in ("accuracy", "macro_f1", "loss"):
                assert f"{prefix}{o}_{m}" in keys
    assert {"loss", "val_loss"} <= keys
    assert len(keys) == 2 + 2 * 3 * len(model.output_names)


def test_validation_metrics_equal_numpy_scores_of_predict(fitted):
    model, history, val, val_labels, *_ = fitted
    probs = model.predict(val.texts, verbose=0)
    varied = 0
    for o in model.output_names:
        y = val_labels[o.rsplit("_", 1)[0]]
        pred = probs[o].argmax(-1)
        varied += len(set(pred.tolist())) > 1
        assert history.history[f"val_{o}_macro_f1"][-1] == pytest.approx(
            macro_f1(y, pred, 3), abs=1e-6), o
        assert history.history[f"val_{o}_accuracy"][-1] == pytest.approx(
            accuracy(y, pred), abs=1e-6), o
    assert varied > 0  # some exit predicts several classes: the comparison is not trivial
    # the metrics are per pass, not per batch: a fresh evaluate gives the same numbers
    result = model.evaluate(val.texts, val_labels, batch_size=5, verbose=0, return_dict=True)
    for o in model.output_names:
        assert result[f"{o}_macro_f1"] == pytest.approx(
            history.history[f"val_{o}_macro_f1"][-1], abs=1e-6)


def test_early_stopping_infers_max_mode_for_macro_f1(fitted):
    model, history, _, _, stopper, _ = fitted
    assert stopper.monitor_op is keras.ops.greater  # mode="auto" found the metric's direction
    values = history.history["val_hate_lc_macro_f1"]
    assert stopper.best == pytest.approx(max(values))
    assert stopper.stopped_epoch == 0 and model.stop_training is False


def test_csv_logger_writes_the_exit_metrics(fitted):
    model, history, *_, csv_path = fitted
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for o in model.output_names:
        for m in ("accuracy", "macro_f1"):
            key = f"val_{o}_{m}"
            assert [float(r[key]) for r in rows] == pytest.approx(history.history[key], abs=1e-6)


def test_validation_split_holds_out_the_last_raw_strings(fitted):
    """`fit(texts, labels, validation_split=...)`: Keras cannot split a dataset, so the model
    holds out the last rows itself (as Keras does for arrays)."""
    trained, _, val, val_labels, *_ = fitted
    model = ResICClassifier.from_config(trained.get_config())  # leave the fixture's model alone
    model.set_weights(trained.get_weights())
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    texts = val.texts  # 24 rows: 18 train, the last 6 validate
    history = model.fit(texts, val_labels, validation_split=0.25, batch_size=8, epochs=1,
                        verbose=0)
    probs = model.predict(texts[18:], verbose=0)
    for o in model.output_names:
        y = val_labels[o.rsplit("_", 1)[0]][18:]
        pred = probs[o].argmax(-1)
        assert history.history[f"val_{o}_macro_f1"][0] == pytest.approx(
            macro_f1(y, pred, 3), abs=1e-6), o
        assert history.history[f"val_{o}_accuracy"][0] == pytest.approx(
            accuracy(y, pred), abs=1e-6), o
