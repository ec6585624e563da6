"""Training callbacks: AtomicModelCheckpoint (a ModelCheckpoint written through a rename, whose
best value survives a restart) and ExitMetricsLogger (reads the compiled exit metrics from
`logs`; adds the selection key; rewrites metrics.csv)."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from conftest import DEMO_DIR
from resic_tf.callbacks import (SELECTION_KEY, AtomicModelCheckpoint, ExitMetricsLogger,
                                ema_callbacks,
                                read_metrics_csv)
from resic_tf.config import ResICConfig
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels
from resic_tf.model import build_model
from resic_tf.vocabulary import CharVocabulary

OUTPUTS = ["bias_ic1", "bias_lc", "hate_ic1", "hate_lc"]


@pytest.fixture(scope="module")
def data():
    rows = load_labelled_texts(DEMO_DIR / "train.tsv", "comments", ["bias", "hate"])
    train, val = rows.subset(range(700, 764)), rows.subset(range(764, 796))
    tasks = {c: sorted_labels(rows.labels[c]) for c in ("bias", "hate")}
    return train, val, tasks, CharVocabulary.build(train.texts)


def small_model(data):
    train, val, tasks, vocab = data
    cfg = ResICConfig(tasks=tasks, vocab_size=vocab.size, filters=(4, 4), blocks=(1, 1),
                      max_len=32, embedding_dim=4)
    keras.utils.set_random_seed(11)
    model = build_model(cfg, vocab)
    model.compile()
    return model


def fit(model, data, callbacks, epochs=1, initial_epoch=0):
    train, val, tasks, _ = data
    return model.fit(train.texts, encode_labels(train, tasks), batch_size=16, epochs=epochs,
                     initial_epoch=initial_epoch, verbose=0, callbacks=callbacks,
                     validation_data=(val.texts, encode_labels(val, tasks)))


def hidden_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# AtomicModelCheckpoint
# ---------------------------------------------------------------------------------------------

def test_is_a_keras_model_checkpoint_monitoring_the_selection_key(tmp_path):
    cb = AtomicModelCheckpoint(str(tmp_path / "model.keras"), save_best_only=True)
    assert isinstance(cb, keras.callbacks.ModelCheckpoint)
    assert (cb.monitor, cb.mode, cb.save_best_only) == (SELECTION_KEY, "max", True)
    assert SELECTION_KEY == "val_macro_f1"
    assert cb.state_path == str(tmp_path / "model.keras") + ".best.json"
    assert cb.best is None  # nothing to resume from


def test_the_tiny_run_left_no_temporary_files(tiny_run):
    assert hidden_files(tiny_run) == []
    assert not list(tiny_run.glob("*.tmp*"))
    best = json.loads((tiny_run / "model.keras.best.json").read_text(encoding="utf-8"))
    assert set(best) == {"monitor", "value", "epoch"}


def test_saves_every_epoch_through_a_temporary_file(data, tmp_path):
    model = small_model(data)
    path = tmp_path / "model.keras"
    seen = []

    class Spy(keras.callbacks.Callback):  # after the checkpoint of each epoch
        def on_epoch_end(self, epoch, logs=None):
            seen.append((hidden_files(tmp_path), path.stat().st_mtime_ns))

    history = fit(model, data, [ExitMetricsLogger(), AtomicModelCheckpoint(str(path)), Spy()],
                  epochs=2)
    assert [s[0] for s in seen] == [[], []]  # no `.model.keras.tmp<pid>.keras` left behind
    assert seen[0][1] < seen[1][1]  # save_best_only=False: written again at epoch 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "model.keras.best.json"]
    state = json.loads((tmp_path / "model.keras.best.json").read_text(encoding="utf-8"))
    assert state == {"monitor": "val_macro_f1", "epoch": 2,
                     "value": pytest.approx(history.history["val_macro_f1"][-1])}
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(data[1].texts, verbose=0)["hate_lc"],
                               model.predict(data[1].texts, verbose=0)["hate_lc"], atol=1e-6)


def test_best_value_survives_a_restart(data, tmp_path):
    model = small_model(data)
    path = tmp_path / "model.keras"
    state_path = tmp_path / "model.keras.best.json"
    first = fit(model, data, [ExitMetricsLogger(), AtomicModelCheckpoint(str(path),
                                                                         save_best_only=True)])
    value = first.history["val_macro_f1"][0]
    assert json.loads(state_path.read_text()) == {"monitor": "val_macro_f1",
                                                  "value": pytest.approx(value), "epoch": 1}
    # a resumed process builds a new callback: it reads the best value back
    resumed = AtomicModelCheckpoint(str(path), save_best_only=True)
    assert resumed.best == pytest.approx(value)

    # a better model than anything this training reaches is never overwritten
    state_path.write_text(json.dumps({"monitor": "val_macro_f1", "value": 2.0, "epoch": 1}))
    before = path.read_bytes(), path.stat().st_mtime_ns
    kept = AtomicModelCheckpoint(str(path), save_best_only=True)
    assert kept.best == 2.0
    fit(model, data, [ExitMetricsLogger(), kept], epochs=2, initial_epoch=1)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert json.loads(state_path.read_text())["value"] == 2.0
    assert hidden_files(tmp_path) == []

    # a worse recorded best is beaten by the next epoch: model and state are rewritten
    state_path.write_text(json.dumps({"monitor": "val_macro_f1", "value": -1.0, "epoch": 1}))
    beaten = AtomicModelCheckpoint(str(path), save_best_only=True)
    history = fit(model, data, [ExitMetricsLogger(), beaten], epochs=3, initial_epoch=2)
    assert path.stat().st_mtime_ns > before[1]
    assert json.loads(state_path.read_text()) == {
        "monitor": "val_macro_f1", "value": pytest.approx(history.history["val_macro_f1"][0]),
        "epoch": 3}
    assert hidden_files(tmp_path) == []


def test_state_without_the_model_is_ignored(tmp_path):
    (tmp_path / "model.keras.best.json").write_text(json.dumps({"value": 0.9}))
    cb = AtomicModelCheckpoint(str(tmp_path / "model.keras"), save_best_only=True)
    assert cb.best is None  # the model it described is gone: start afresh


# ---------------------------------------------------------------------------------------------
# ExitMetricsLogger
# ---------------------------------------------------------------------------------------------

def test_selection_key_is_the_mean_lc_macro_f1_and_reaches_history(data, tmp_path):
    model = small_model(data)
    history = fit(model, data, [ExitMetricsLogger(csv_path=tmp_path / "metrics.csv")], epochs=2)
    h = history.history
    for e in range(2):
        assert h["val_macro_f1"][e] == pytest.approx(
            (h["val_bias_lc_macro_f1"][e] + h["val_hate_lc_macro_f1"][e]) / 2, abs=1e-7)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [(r["epoch"], r["output"]) for r in rows] == \
        [(e, o) for e in (1, 2) for o in OUTPUTS]
    for r in rows:
        for m in ("accuracy", "macro_f1"):
            assert r[m] == pytest.approx(h[f"val_{r['output']}_{m}"][r["epoch"] - 1], abs=5e-7)


def test_needs_validation_metrics(data):
    model = small_model(data)
    train, _, tasks, _ = data
    with pytest.raises(KeyError) as info:
        model.fit(train.texts, encode_labels(train, tasks), batch_size=32, epochs=1, verbose=0,
                  callbacks=[ExitMetricsLogger()])
    assert info.value.args[0] == (
        "ExitMetricsLogger needs validation data and the model's exit metrics "
        "(`model.compile(metrics='auto')`); logs lack ['val_bias_ic1_accuracy', "
        "'val_bias_ic1_macro_f1', 'val_bias_lc_accuracy']")


def test_csv_rows_of_a_crashed_run_are_replaced(data, tmp_path):
    """A crashed run may have written epochs 2 and 3 before its last backup (epoch 1): when the
    resumed run finishes epoch 2, rows of epochs >= 2 are replaced, epoch 1 rows are kept."""
    model = small_model(data)
    csv_path = tmp_path / "metrics.csv"
    old = ["epoch,output,accuracy,macro_f1"] + [
        f"{e},{o},0.{e}00000,0.0{e}0000" for e in (1, 2, 3) for o in OUTPUTS]
    csv_path.write_text("\n".join(old) + "\n", encoding="utf-8")
    logger = ExitMetricsLogger(csv_path=csv_path)
    logger.set_model(model)
    logs = {f"val_{o}_{m}": 0.5 + 0.01 * i for i, o in enumerate(OUTPUTS)
            for m in ("accuracy", "macro_f1")}
    logger.on_epoch_end(1, logs)  # epoch index 1 = epoch 2
    assert logs[SELECTION_KEY] == pytest.approx((0.51 + 0.53) / 2)
    text = csv_path.read_text(encoding="utf-8").splitlines()
    assert text == old[:5] + [f"2,{o},{0.5 + 0.01 * i:.6f},{0.5 + 0.01 * i:.6f}"
                              for i, o in enumerate(OUTPUTS)]


def test_ema_callbacks_show_the_average_where_weights_are_read_by_hand():
    """SGD on w with loss (w - 1)^2 from w = 0: w <- w - 0.1 * 2 (w - 1), so w_t = 1 - 0.8^t;
    the average a_1 = w_1, a_t = 0.5 a_(t-1) + 0.5 w_t. Two epochs of 3 steps."""
    raw, avg = [0.0], []
    for t in range(1, 7):
        raw.append(raw[-1] - 0.2 * (raw[-1] - 1.0))
        avg.append(raw[-1] if t == 1 else 0.5 * avg[-1] + 0.5 * raw[-1])
    seen = {"end": [], "after": [], "validation": []}

    class Record(keras.callbacks.Callback):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def on_epoch_end(self, epoch, logs=None):
            seen[self.key].append(float(self.model.get_weights()[0][0, 0]))

        def on_test_batch_begin(self, batch, logs=None):
            if self.key == "end" and batch == 0:
                seen["validation"].append(float(self.model.get_weights()[0][0, 0]))

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
                  loss="mse")
    x, y = np.ones((12, 1), np.float32), np.ones((12, 1), np.float32)
    first, before_backup = ema_callbacks()
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, validation_data=(x, y),
              callbacks=[first, Record("end"), before_backup, Record("after")])
    np.testing.assert_allclose(seen["validation"], [avg[2], avg[5]], rtol=1e-6)
    np.testing.assert_allclose(seen["end"], [avg[2], avg[5]], rtol=1e-6)  # checkpoints see this
    np.testing.assert_allclose(seen["after"], [raw[3], raw[6]], rtol=1e-6)  # backups see this
    # training went on from the raw weights; Keras leaves the average in the model at the end
    np.testing.assert_allclose(model.get_weights()[0][0, 0], avg[5], rtol=1e-6)
