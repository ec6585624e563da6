"""A linear branch (`ResICConfig.linear_ngrams`): fitted on exactly the training rows before the
deep branch, frozen, mixed into every exit in thirds or by the log-linear mix the validation
rows prove better (`resic_tf.fusion.choose_mix`), and kept when a crashed run resumes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import LINEAR_NGRAMS, dev_texts, tiny_train_args


def _refit(run):
    """The linear branch fitted again apart from the model: `TfidfNGrams` adapted on the run's
    training rows, each task's `LinearHead` fitted on their TF-IDF matrix."""
    from resic_tf.tfidf import LinearHead, TfidfNGrams, fit_linear, tfidf_matrix
    from resic_tf.training import LINEAR_STEPS, load_splits

    train, _, tasks = load_splits(run.train_config)
    ids = run.model.preprocessor(tf.constant(train.texts))
    layer = TfidfNGrams(LINEAR_NGRAMS)
    layer.adapt([ids])
    layer = layer.trimmed()
    x = tfidf_matrix([layer(ids)], layer.max_ngrams)
    heads = {}
    for task, classes in tasks.items():
        heads[task] = LinearHead(len(classes), layer.max_ngrams)
        fit_linear(heads[task], x, [classes.index(c) for c in train.labels[task]],
                   run.train_config.linear_c, LINEAR_STEPS)
    return layer, heads, ids, train


def test_the_linear_branch_is_fitted_on_the_training_rows_and_left_frozen(linear_run):
    """Its vocabulary, IDF and regressions equal a fit made apart on the same 240 training rows
    after the deep branch's two epochs (the model's loss never moves them), and its
    regressions beat the majority class on those rows."""
    from resic_tf.run import Run

    run = Run.load(linear_run)
    model = run.model
    stats = json.loads((linear_run / "run.json").read_text())["linear_branch"]
    assert stats["texts"] == 240 and 0 < stats["columns"] < LINEAR_NGRAMS
    # the model holds the columns the training texts fill, not the cap asked for
    assert run.config.linear_ngrams == stats["columns"] == model.linear_heads[0].max_ngrams
    assert set(stats["tasks"]) == {"bias", "hate"}
    assert all(f["gradient_norm"] < 1e-2 for f in stats["tasks"].values())
    layer, heads, ids, train = _refit(run)
    ours = model.backbone.get_layer("tfidf_ngrams")
    np.testing.assert_array_equal(np.asarray(ours.ngrams), np.asarray(layer.ngrams))
    np.testing.assert_allclose(np.asarray(ours.idf), np.asarray(layer.idf), rtol=1e-6)
    assert not any(w.trainable for head in model.linear_heads for w in head.weights)
    columns, weights = layer(ids)
    for task, head in zip(model.tasks, model.linear_heads):
        np.testing.assert_allclose(np.asarray(head.kernel), np.asarray(heads[task].kernel),
                                   atol=1e-5)
        y = np.array([model.tasks[task].index(c) for c in train.labels[task]])
        accuracy = (np.asarray(head(columns, weights)).argmax(-1) == y).mean()
        assert accuracy > np.bincount(y).max() / len(y) + 0.1, (task, accuracy)


def _branches(model, texts):
    """Served and deep-alone exits of `texts`, and each task's wide and linear classifiers."""
    from resic_tf.fusion import _arithmetic, mix_state, set_mix_state, set_shares
    from resic_tf.run import predict_exits

    served = predict_exits(model, texts)
    kept = mix_state(model)
    _arithmetic(model)
    set_shares(model, {t: [0.0] * model.num_exits for t in model.tasks})
    deep = predict_exits(model, texts)
    set_mix_state(kept)
    ids = model.preprocessor(tf.constant(texts))
    wide = model.backbone.wide(ids, model.backbone.padding_mask(ids))
    shallow = {task: (np.asarray(model.wide_heads[t](wide.embedding)),
                      np.asarray(model.linear_heads[t](wide.columns, wide.weights)))
               for t, task in enumerate(model.tasks)}
    return served, deep, shallow


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


TEXTS = ["", "가" * 300, "Mixed 한국어 and English 🎉!"]


def test_every_exit_serves_deep_wide_and_linear_in_thirds(linear_run):
    """With the arithmetic mix every exit serves `deep / 3 + 2/3 * (wide + linear) / 2`, exit 0
    the mean of the wide and linear classifiers, from raw texts (empty, long, mixed)."""
    from resic_tf.fusion import set_mix, shares_of
    from resic_tf.run import Run

    model = Run.load(linear_run).model
    assert "wide_shares" not in json.loads((linear_run / "run.json").read_text())
    assert shares_of(model) == {t: [round(2 / 3, 4)] * model.num_exits for t in model.tasks}
    for task in model.tasks:
        set_mix(model, task, False, (1.0, 1.0, 1.0))
    served, deep, shallow = _branches(model, TEXTS + dev_texts(40))
    for task in model.tasks:
        mean = (shallow[task][0] + shallow[task][1]) / 2
        np.testing.assert_allclose(served[f"{task}_wide"], mean, atol=1e-6)
        np.testing.assert_allclose(served[task], deep[task] / 3 + 2 / 3 * mean[:, None],
                                   atol=1e-6)
        assert np.isfinite(served[task]).all()


def test_a_log_linear_mix_is_served_at_every_exit(linear_run):
    """`set_mix(geometric=True)`: every exit serves `softmax(a_d log deep + a_w log wide + a_l
    log linear)` and exit 0 `softmax(a_w log wide + a_l log linear)`, per task, finite on empty
    and long texts; a power of 0 drops a branch."""
    from resic_tf.fusion import set_mix
    from resic_tf.run import Run

    model = Run.load(linear_run).model
    powers = {"bias": (0.5, 0.25, 1.5), "hate": (0.0, 1.0, 2.0)}
    for task, a in powers.items():
        set_mix(model, task, True, a)
    served, deep, shallow = _branches(model, TEXTS + dev_texts(40))
    for task, (a_d, a_w, a_l) in powers.items():
        wide, linear = (np.log(p.astype(np.float64) + 1e-9) for p in shallow[task])
        np.testing.assert_allclose(served[f"{task}_wide"], _softmax(a_w * wide + a_l * linear),
                                   atol=1e-5)
        logits = a_d * np.log(deep[task] + 1e-9) + (a_w * wide + a_l * linear)[:, None]
        np.testing.assert_allclose(served[task], _softmax(logits), atol=1e-5)
        assert np.isfinite(served[task]).all()
    # no deep power: every hate exit is its shallow classifier
    np.testing.assert_allclose(served["hate"], np.repeat(served["hate_wide"][:, None],
                                                         model.num_exits, 1), atol=1e-5)


def test_training_records_each_tasks_mix_as_the_validation_rows_choose_it(linear_run):
    """`--linear-mix auto` (the default): run.json holds each task's choice, the saved model
    serves it, and `choose_mix` on the run's own validation rows chooses it again."""
    from resic_tf.fusion import choose_mix, linear_branch_predictions
    from resic_tf.run import Run

    run = Run.load(linear_run)
    recorded = json.loads((linear_run / "run.json").read_text())["linear_mix"]
    assert set(recorded) == {"bias", "hate"}
    branches = linear_branch_predictions(run)
    for t, task in enumerate(run.model.tasks):
        assert recorded[task]["rows"] == len(run.validation.texts)
        assert choose_mix(*branches[task]) == recorded[task]
        geometric = float(recorded[task]["geometric"])
        assert float(run.model.shallow_mixes[t].geometric.numpy()) == geometric
        for layer in run.model.fusion_layers(task):
            assert float(layer.geometric.numpy()) == geometric
            assert float(layer.deep_power.numpy()) == pytest.approx(recorded[task]["powers"][0])


def test_training_saves_the_fitted_mix_when_the_rule_adopts_it(real_tsv, tmp_path,
                                                                monkeypatch):
    """With the rule's threshold lowered so that it fires, `resic train` adopts the fitted mix:
    run.json says so, and the saved model, loaded again, serves the log-linear formula with the
    recorded powers at every exit."""
    import functools

    from resic_tf import fusion
    from resic_tf.cli import main
    from resic_tf.run import Run

    monkeypatch.setattr(fusion, "choose_mix", functools.partial(fusion.choose_mix,
                                                                min_z=-np.inf))
    assert main(tiny_train_args(real_tsv, tmp_path / "run", "--linear-ngrams", "3000",
                                "--epochs", "1")) == 0
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["linear_mix"]
    assert all(recorded[t]["geometric"] for t in ("bias", "hate"))
    model = Run.load(tmp_path / "run").model
    served, deep, shallow = _branches(model, TEXTS + dev_texts(20))
    for task in model.tasks:
        a_d, a_w, a_l = recorded[task]["powers"]
        wide, linear = (np.log(p.astype(np.float64) + 1e-9) for p in shallow[task])
        logits = a_d * np.log(deep[task] + 1e-9) + (a_w * wide + a_l * linear)[:, None]
        np.testing.assert_allclose(served[task], _softmax(logits), atol=1e-5)


def test_fit_powers_by_hand():
    """One classifier saying (0.8, 0.2) on every row: the best power `a` makes `4^a / (4^a + 1)`
    the share of class 0, so 16 rows of 17 give a = 2; 1 of 5 would give a = -1, and the power
    stays at its bound, 0."""
    from resic_tf.fusion import fit_powers

    logs = np.log(np.tile([0.8, 0.2], (17, 1)))
    assert fit_powers([logs], np.array([0] * 16 + [1]))[0] == pytest.approx(2.0, abs=1e-6)
    assert fit_powers([logs[:5]], np.array([0, 1, 1, 1, 1]))[0] == 0.0


def _calibrated(labels, rng, confidence=0.7, classes=3):
    """Probabilities that say `confidence` on a class that is right on that share of rows."""
    right = rng.random(len(labels)) < confidence
    said = np.where(right, labels, (labels + rng.integers(1, classes, len(labels))) % classes)
    p = np.full((len(labels), classes), (1 - confidence) / (classes - 1))
    p[np.arange(len(labels)), said] = confidence
    return p


def test_choose_mix_moves_only_on_proof():
    """Three copies of one calibrated classifier: nothing to gain, the thirds stay (powers sum
    to about 1). A deep branch confidently wrong on every row beside two useful shallow ones:
    the fitted mix wins by many standard errors and drops the deep branch (power 0)."""
    from resic_tf.fusion import choose_mix

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    same = _calibrated(y, rng)
    kept = choose_mix(y, same, same, same)
    assert not kept["geometric"] and kept["z"] < 4 and kept["rows"] == 2000
    assert sum(kept["powers"]) == pytest.approx(1.0, abs=0.05)
    wrong = np.full((2000, 3), 0.05)
    wrong[np.arange(2000), (y + 1) % 3] = 0.9
    moved = choose_mix(y, wrong, _calibrated(y, rng), _calibrated(y, rng))
    assert moved["geometric"] and moved["z"] > 10 and moved["powers"][0] == 0.0


def test_mixes_saved_by_0_13_load_with_their_defaults():
    """A 0.13 linear-branch model's `LateFusion` stored its share only and its shallow mix was
    a weightless `Average`: they load as the arithmetic mix with that share."""
    from resic_tf.layers import LateFusion, ShallowMix

    fusion = LateFusion(0.5, log_linear=True)
    fusion.build((None, 3))
    fusion.load_own_variables({"0": np.float32(0.25)})
    assert [float(v.numpy()) for v in fusion.weights] == [0.25, 0.0, 1.0]
    plain = LateFusion(0.5)  # a model without a linear branch: the share alone, as before
    plain.build((None, 3))
    assert len(plain.weights) == 1
    mix = ShallowMix()
    mix.build()
    mix.load_own_variables({})
    assert float(mix.geometric.numpy()) == 0.0
    wide, linear = np.array([[0.2, 0.8]], np.float32), np.array([[0.6, 0.4]], np.float32)
    np.testing.assert_allclose(np.asarray(mix([wide, linear])), [[0.4, 0.6]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(fusion(np.array([[1.0, 0.0]], np.float32), wide)),
                               [[0.8, 0.2]], atol=1e-7)


def test_a_resumed_run_keeps_its_linear_branch(real_tsv, tmp_path, monkeypatch):
    """Killed after its first epoch's commit, the run resumes from the backup: the linear
    branch is not fitted again, and the finished model holds the regressions fitted first."""
    from resic_tf import training
    from resic_tf.callbacks import AtomicBackupAndRestore
    from resic_tf.cli import main
    from resic_tf.run import Run

    fitted = []
    fit = training.train_linear_branch

    def spy(model, *args):
        out = fit(model, *args)
        fitted.append([np.asarray(h.kernel).copy() for h in model.linear_heads])
        return out

    commit = AtomicBackupAndRestore.on_epoch_end

    def crash(self, epoch, logs=None):
        commit(self, epoch, logs)
        if epoch == 0:
            raise RuntimeError("killed after the first commit")

    monkeypatch.setattr(training, "train_linear_branch", spy)
    monkeypatch.setattr(AtomicBackupAndRestore, "on_epoch_end", crash)
    args = tiny_train_args(real_tsv, tmp_path / "run", "--linear-ngrams", "5000",
                           "--wide-epochs", "0",  # no wide stage: not what is tested here
                           "--linear-mix", "thirds")
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    assert len(fitted) == 1
    monkeypatch.setattr(AtomicBackupAndRestore, "on_epoch_end", commit)
    assert main(args) == 0
    assert len(fitted) == 1  # resumed: restored from the backup, not fitted again
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["linear_branch"]["texts"] == 240
    assert "linear_mix" not in state  # --linear-mix thirds: no mix chosen
    model = Run.load(tmp_path / "run").model
    assert all(float(layer.geometric.numpy()) == 0.0 for task in model.tasks
               for layer in model.fusion_layers(task))
    for head, kernel in zip(model.linear_heads, fitted[0]):
        np.testing.assert_array_equal(np.asarray(head.kernel), kernel)
