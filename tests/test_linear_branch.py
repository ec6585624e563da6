"""A linear branch (`ResICConfig.linear_ngrams`): fitted on exactly the training rows before the
deep branch, frozen, mixed into every exit in thirds, and kept when a crashed run resumes."""
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


def test_every_exit_serves_deep_wide_and_linear_in_thirds(linear_run):
    """No share is calibrated: every exit serves `deep / 3 + 2/3 * (wide + linear) / 2`, exit 0
    the mean of the wide and linear classifiers, from raw texts (empty, long, mixed)."""
    from resic_tf.fusion import set_shares, shares_of
    from resic_tf.run import Run, predict_exits

    run = Run.load(linear_run)
    model = run.model
    assert "wide_shares" not in json.loads((linear_run / "run.json").read_text())
    assert shares_of(model) == {t: [round(2 / 3, 4)] * model.num_exits for t in model.tasks}
    texts = ["", "가" * 300, "Mixed 한국어 and English 🎉!"] + dev_texts(40)
    served = predict_exits(model, texts)
    set_shares(model, {t: [0.0] * model.num_exits for t in model.tasks})
    deep = predict_exits(model, texts)
    ids = model.preprocessor(tf.constant(texts))
    wide = model.backbone.wide(ids, model.backbone.padding_mask(ids))
    for t, task in enumerate(model.tasks):
        shallow = (np.asarray(model.wide_heads[t](wide.embedding)) +
                   np.asarray(model.linear_heads[t](wide.columns, wide.weights))) / 2
        np.testing.assert_allclose(served[f"{task}_wide"], shallow, atol=1e-6)
        np.testing.assert_allclose(served[task], deep[task] / 3 + 2 / 3 * shallow[:, None],
                                   atol=1e-6)
        assert np.isfinite(served[task]).all()


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
                           "--wide-epochs", "0")  # no wide stage: not what is tested here
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    assert len(fitted) == 1
    monkeypatch.setattr(AtomicBackupAndRestore, "on_epoch_end", commit)
    assert main(args) == 0
    assert len(fitted) == 1  # resumed: restored from the backup, not fitted again
    assert json.loads((tmp_path / "run" / "run.json").read_text())["linear_branch"]["texts"] == 240
    model = Run.load(tmp_path / "run").model
    for head, kernel in zip(model.linear_heads, fitted[0]):
        np.testing.assert_array_equal(np.asarray(head.kernel), kernel)
