"""Training into a run directory: files, per-exit metrics, TensorBoard, checkpoints, resume.

Most checks read the session's `tiny_run` (Res-IC18, filters 8, 2 epochs on 300 real rows,
trained by `resic train`); the few that must train use a two-block model on ~100 rows.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from resic_tf.callbacks import final_exit_table, read_metrics_csv
from resic_tf.config import ResICConfig, TrainConfig
from resic_tf.data import DataError, load_labelled_texts
from resic_tf.fusion import set_shares, shares_of
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.model import ResICClassifier, exit_loss_weights
from resic_tf.preprocessor import ResICPreprocessor, text_dataset
from resic_tf.run import Run, predict_exits
from resic_tf.training import train
from resic_tf.validation import InvalidValueError
from resic_tf.vocabulary import CharVocabulary
from conftest import TINY_EXITS

TINY_OUTPUTS = [f"{t}_{e}" for t in ("bias", "hate")
                for e in TINY_EXITS]
SMALL_MODEL = {"filters": [4, 4], "blocks": [1, 1], "max_len": 32, "embedding_dim": 4}


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar tag -> [(step, value), ...] over every event file in `directory`, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # e.g. Keras's model-config text summary in train/
                out.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return out


def csv_rows(run_dir: Path) -> dict[tuple[int, str], dict]:
    rows = read_metrics_csv(run_dir / "metrics.csv")
    keyed = {(r["epoch"], r["output"]): r for r in rows}
    assert len(keyed) == len(rows), "an (epoch, output) pair appears twice"
    return keyed


def write_real_rows(demo_dir: Path, path: Path, n: int, start: int = 0) -> Path:
    lines = (demo_dir / "train.tsv").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], *lines[1 + start:1 + start + n]]) + "\n",
                    encoding="utf-8")
    return path


def small_tc(data: Path, **overrides) -> TrainConfig:
    kwargs = {"data": str(data), "text_col": "comments", "label_cols": ("bias", "hate"),
              "val_split": 0.25, "epochs": 1, "batch_size": 16, "seed": 7, **overrides}
    return TrainConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# The tiny run made by `resic train`
# ---------------------------------------------------------------------------------------------

def test_run_directory_contents(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "vocab.json", "train_config.json", "validation.parquet",
            "model.keras", "model.keras.best.json", "metrics.csv", "tensorboard", "run.json",
            "final_exits.md"} <= names
    assert "backup" not in names  # BackupAndRestore cleans up after a finished run
    assert not [n for n in names if n.startswith(".")]  # no temporary files left behind
    state = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))
    assert state["status"] == "finished"
    assert state["epochs_run"] == 2
    assert state["train_rows"] + state["val_rows"] == 300
    # the LC's final validation scores are also recorded for the HParams dashboard
    final = state["final_val_scores"]
    assert state["scores"] == {f"validation/{t}_lc_{m}": final[f"{t}_lc"][m]
                               for t in ("bias", "hate") for m in ("accuracy", "macro_f1")}
    cfg = ResICConfig.load(tiny_run / "config.json")
    assert cfg.arch == "resic18" and cfg.filters == (8, 8, 8, 8)
    assert cfg.output_names == TINY_OUTPUTS
    vocab = CharVocabulary.load(tiny_run / "vocab.json")
    assert cfg.vocab_size == vocab.size
    tc = json.loads((tiny_run / "train_config.json").read_text(encoding="utf-8"))
    assert (tc["epochs"], tc["batch_size"], tc["seed"], tc["val_split"]) == (2, 32, 1, 0.2)
    assert tc["label_cols"] == ["bias", "hate"] and tc["text_col"] == "comments"


def test_classes_and_validation_rows_come_from_the_real_file(tiny_run, real_tsv):
    source = pd.read_csv(real_tsv, sep="\t", dtype=str, keep_default_na=False)
    cfg = ResICConfig.load(tiny_run / "config.json")
    assert cfg.tasks == {"bias": tuple(sorted(set(source["bias"]))),
                         "hate": tuple(sorted(set(source["hate"])))}
    val = pd.read_parquet(tiny_run / "validation.parquet")
    assert list(val.columns) == ["comments", "bias", "hate"]
    assert len(val) == json.loads((tiny_run / "run.json").read_text())["val_rows"]
    assert 50 <= len(val) <= 70  # 20% of 300, stratified per class
    source_rows = set(source[["comments", "bias", "hate"]].itertuples(index=False, name=None))
    assert set(val.itertuples(index=False, name=None)) <= source_rows
    # The vocabulary holds training characters only: every character of a training row.
    vocab = set(CharVocabulary.load(tiny_run / "vocab.json").chars)
    val_texts = set(val["comments"])
    train_chars = {c for t in source["comments"] if t not in val_texts for c in t}
    assert vocab == train_chars


def test_metrics_csv_has_one_row_per_epoch_and_output(tiny_run):
    with open(tiny_run / "metrics.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["epoch", "output", "accuracy", "macro_f1"]
        rows = list(reader)
    assert len(rows) == 2 * len(TINY_OUTPUTS)
    assert sorted((int(r["epoch"]), r["output"]) for r in rows) == \
        sorted((e, o) for e in (1, 2) for o in TINY_OUTPUTS)
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["macro_f1"]) <= 1.0


def test_tensorboard_exit_scalars_match_metrics_csv(tiny_run):
    """The per-exit values in TensorBoard are those of metrics.csv (tags and plugins of every
    folder are checked in test_tensorboard.py)."""
    tb = tiny_run / "tensorboard"
    assert sorted(p.name for p in tb.iterdir()) == ["exits", "hparams", "layout", "train",
                                                    "validation"]
    for sub in ("exits", "hparams", "layout", "train", "validation"):
        files = list((tb / sub).iterdir())
        assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    scalars = read_scalars(tb / "exits")
    assert set(scalars) == {f"{m}/{o}" for m in ("macro_f1", "accuracy") for o in TINY_OUTPUTS}
    rows = csv_rows(tiny_run)
    for tag, points in scalars.items():
        metric, output = tag.split("/")
        assert [step for step, _ in points] == [0, 1], tag  # step = epoch index, as Keras's
        for step, value in points:
            assert value == pytest.approx(rows[(step + 1, output)][metric], abs=1e-6), tag
    # Keras's own curves: losses (and training-time exit metrics) in train/, validation losses
    # in validation/; the validation exit metrics are not written there a second time.
    train_tags = set(read_scalars(tb / "train"))
    assert {"epoch_loss", "epoch_hate_lc_loss", "epoch_bias_ic1_loss", "epoch_hate_lc_macro_f1",
            "epoch_bias_ic1_accuracy"} <= train_tags
    validation = read_scalars(tb / "validation")
    assert {"epoch_loss", *(f"epoch_{o}_loss" for o in TINY_OUTPUTS)} <= set(validation)
    assert not {f"epoch_{o}_{m}" for o in TINY_OUTPUTS for m in ("accuracy", "macro_f1")} \
        & set(validation)
    assert [step for step, _ in validation["epoch_loss"]] == [0, 1]  # once per epoch
    assert all(np.isfinite(value) for _, value in validation["epoch_loss"])


def test_validation_exit_metrics_are_written_to_tensorboard_once(tiny_run):
    validation = read_scalars(tiny_run / "tensorboard" / "validation")
    duplicated = sorted(tag for tag in validation
                        if any(f"_{o}_{m}" in tag for o in TINY_OUTPUTS
                               for m in ("accuracy", "macro_f1")))
    assert duplicated == []


def test_kept_model_reproduces_metrics_csv(tiny_run):
    """Recompute every exit's scores from model.keras alone and compare with the callback's."""
    best = json.loads((tiny_run / "model.keras.best.json").read_text(encoding="utf-8"))
    rows = csv_rows(tiny_run)
    mean_lc = {e: np.mean([rows[(e, f"{t}_lc")]["macro_f1"] for t in ("bias", "hate")])
               for e in (1, 2)}
    # select=best keeps the first epoch with the highest mean LC macro-F1.
    assert best["monitor"] == "val_macro_f1"
    assert best["epoch"] == min(e for e in (1, 2) if mean_lc[e] == max(mean_lc.values()))
    assert best["value"] == pytest.approx(mean_lc[best["epoch"]], abs=1e-6)

    cfg = ResICConfig.from_json((tiny_run / "config.json").read_text(encoding="utf-8"))
    chars = json.loads((tiny_run / "vocab.json").read_text(encoding="utf-8"))["chars"]
    model = keras.saving.load_model(tiny_run / "model.keras")  # no custom_objects
    assert type(model) is ResICClassifier
    assert model.preprocessor.chars == chars and model.preprocessor.max_len == cfg.max_len
    val = pd.read_parquet(tiny_run / "validation.parquet")
    ids = ResICPreprocessor(chars, cfg.max_len)(tf.constant(val["comments"].tolist()))
    probs = model.predict(ids, verbose=0)  # with the wide shares training chose at its end
    assert set(probs) == set(TINY_OUTPUTS)
    # the epochs were scored (and the best one kept) with every late-fusion share at 0.5
    shares = shares_of(model)
    set_shares(model, {t: [0.5] * model.num_exits for t in cfg.tasks})
    epoch_probs = model.predict(ids, verbose=0)
    set_shares(model, shares)
    final = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))["final_val_scores"]
    for output in TINY_OUTPUTS:
        task = output.rsplit("_", 1)[0]
        classes = list(cfg.tasks[task])
        y = np.array([classes.index(label) for label in val[task]])
        pred = np.argmax(epoch_probs[output], axis=1)
        row = rows[(best["epoch"], output)]
        assert accuracy(y, pred) == pytest.approx(row["accuracy"], abs=1e-6), output
        assert macro_f1(y, pred, len(classes)) == pytest.approx(row["macro_f1"], abs=1e-6), output
        # run.json's scores come from the compiled (float32) metrics of the kept model
        pred = np.argmax(probs[output], axis=1)
        assert final[output]["accuracy"] == pytest.approx(accuracy(y, pred), abs=1e-6)
        assert final[output]["macro_f1"] == pytest.approx(macro_f1(y, pred, len(classes)),
                                                          abs=1e-6)
    assert (tiny_run / "final_exits.md").read_text(encoding="utf-8") == \
        final_exit_table(cfg, final) + "\n"
    assert model.get_compile_config()["loss_weights"] == pytest.approx(exit_loss_weights(cfg))


def test_save_load_round_trip_gives_identical_predictions(tiny_run, tmp_path):
    run = Run.load(tiny_run)
    texts = pd.read_parquet(tiny_run / "validation.parquet")["comments"].tolist()
    ds = text_dataset(texts, run.preprocessor, 32)
    before = run.model.predict(ds, verbose=0)
    run.model.save(tmp_path / "again.keras")
    after = keras.saving.load_model(tmp_path / "again.keras").predict(ds, verbose=0)
    assert set(before) == set(after) == set(TINY_OUTPUTS)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    exits = predict_exits(run.model, texts, batch_size=7)  # another batch size, same numbers
    assert exits["hate"].shape == (len(texts), len(TINY_EXITS), 3)
    for k, name in enumerate(run.config.exit_names("hate")):  # exits shallow to deep
        np.testing.assert_allclose(exits["hate"][:, k], before[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exits["bias"][:, 0], before["bias_ic1"], rtol=1e-5, atol=1e-6)
    empty = predict_exits(run.model, [])
    assert empty["bias"].shape == (0, len(TINY_EXITS), 3) and empty["bias"].dtype == np.float32


def test_finished_run_is_not_overwritten(tiny_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    tc = TrainConfig.from_dict(json.loads((run_dir / "train_config.json").read_text()))
    state = json.loads((run_dir / "run.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(FileExistsError, match="holds a finished run; choose a new --out or pass "
                                              "--overwrite"):
        train(tc, run_dir, state["model_kwargs"])
    # overwrite=True with broken data: the error comes first, the old run survives.
    bad = TrainConfig.from_dict({**tc.to_dict(), "data": str(tmp_path / "missing.tsv")})
    with pytest.raises(DataError, match="missing.tsv: file not found"):
        train(bad, run_dir, state["model_kwargs"], overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_refuses_foreign_or_changed_directories(tmp_path, real_tsv):
    tc = small_tc(real_tsv)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds no run \(no run.json\); choose a new --out"):
        train(tc, foreign, SMALL_MODEL)
    # --overwrite replaces runs only: a folder of other files survives it.
    with pytest.raises(FileExistsError, match="holds no run"):
        train(tc, foreign, SMALL_MODEL, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps(
        {"status": "training", "train_config": {**tc.to_dict(), "epochs": 5},
         "model_kwargs": SMALL_MODEL}))
    with pytest.raises(InvalidValueError) as info:
        train(tc, unfinished, SMALL_MODEL)
    assert str(info.value) == (f"{unfinished} holds an unfinished run with other settings; "
                               "resume it with the same command, or pass --overwrite to start "
                               "again")
    # A run begun before 0.10 stored no `ngram_hashes`: it had one, so two is another setting.
    (unfinished / "run.json").write_text(json.dumps(
        {"status": "training", "train_config": tc.to_dict(), "model_kwargs": SMALL_MODEL}))
    with pytest.raises(InvalidValueError, match="holds an unfinished run with other settings"):
        train(tc, unfinished, {**SMALL_MODEL, "ngram_hashes": 2})


def test_a_run_left_unfinished_by_0_12_resumes_with_the_same_command(tmp_path, real_tsv):
    """0.12 stored `wide_weight` 0.5 (its default) and neither `linear_ngrams` nor `linear_c`;
    the same command under 0.13 gives None and 0: the same settings. With a linear branch it
    is another run."""
    from resic_tf.training import _check_resume
    tc = small_tc(real_tsv)
    (tmp_path / "run.json").write_text(json.dumps(
        {"status": "training",
         "train_config": {k: v for k, v in tc.to_dict().items() if k != "linear_c"},
         "model_kwargs": {**SMALL_MODEL, "wide_weight": 0.5}}))
    now = {**SMALL_MODEL, "wide_weight": None, "linear_ngrams": 0}
    assert _check_resume(tmp_path, tc, now, overwrite=False) is True
    with pytest.raises(InvalidValueError, match="other settings"):
        _check_resume(tmp_path, tc, {**now, "linear_ngrams": 1000}, overwrite=False)


def test_a_run_left_unfinished_by_0_13_says_how_to_resume_under_0_14(tmp_path, real_tsv):
    """0.13's default recipe had no linear branch and no wide stage; 0.14's has both, so the
    same command line asks for another run: the error names the two flags that resume it, and
    with them it resumes."""
    import dataclasses

    from resic_tf.training import _check_resume
    old_tc = small_tc(real_tsv)
    (tmp_path / "run.json").write_text(json.dumps(
        {"status": "training",
         "train_config": {k: v for k, v in old_tc.to_dict().items() if k != "linear_mix"},
         "model_kwargs": {**SMALL_MODEL, "wide_weight": None, "linear_ngrams": 0}}))
    now = {**SMALL_MODEL, "wide_weight": None, "linear_ngrams": 1_000_000}
    with pytest.raises(InvalidValueError) as info:
        _check_resume(tmp_path, dataclasses.replace(old_tc, wide_epochs=25), now, overwrite=False)
    assert str(info.value) == (
        f"{tmp_path} holds an unfinished run begun before 0.14, whose default recipe had no "
        "linear branch and no wide stage; resume it with the same command plus --linear-ngrams 0 "
        "--wide-epochs 0, or pass --overwrite to start again")
    assert _check_resume(tmp_path, old_tc, {**now, "linear_ngrams": 0}, overwrite=False) is True
    # another change beside the recipe's: the general message
    with pytest.raises(InvalidValueError, match="other settings"):
        _check_resume(tmp_path, dataclasses.replace(old_tc, wide_epochs=25, epochs=9), now,
                      overwrite=False)


def test_bad_data_leaves_no_run_directory(tmp_path, real_tsv):
    out = tmp_path / "never"
    with pytest.raises(DataError, match=r"column 'nope': missing column\(s\) \['nope'\]"):
        train(small_tc(real_tsv, label_cols=("bias", "nope")), out, SMALL_MODEL)
    with pytest.raises(ValueError, match="`filters` needs one value per stage"):
        train(small_tc(real_tsv), out, {**SMALL_MODEL, "filters": [4, 4, 4]})
    assert not out.exists()  # a corrected command is not blocked by a half-made run


# ---------------------------------------------------------------------------------------------
# Runs that train (small model, ~100 real rows)
# ---------------------------------------------------------------------------------------------

@pytest.mark.large
def test_resume_after_a_crash(tmp_path, demo_dir, monkeypatch):
    data = write_real_rows(demo_dir, tmp_path / "rows.tsv", 100, start=300)
    out = tmp_path / "run"
    tc = small_tc(data, epochs=2, select="last")
    import resic_tf.training as training
    real_backup = training.AtomicBackupAndRestore
    begun: list[int] = []

    class CrashingBackupAndRestore(real_backup):  # `train` looks it up in resic_tf.training
        crash_at: int | None = 1

        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
            if epoch == self.crash_at:  # after epoch 1 finished and was backed up
                raise RuntimeError("simulated crash")
            super().on_epoch_begin(epoch, logs)

    monkeypatch.setattr(training, "AtomicBackupAndRestore", CrashingBackupAndRestore)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tc, out, SMALL_MODEL, verbose=0)
    assert begun == [0, 1]
    assert json.loads((out / "run.json").read_text())["status"] == "training"
    assert (out / "backup").is_dir()
    outputs = ["bias_ic1", "bias_lc", "hate_ic1", "hate_lc"]
    first = csv_rows(out)
    assert sorted(first) == [(1, o) for o in outputs]

    CrashingBackupAndRestore.crash_at = None
    begun.clear()
    # A run begun by 0.11 stored no `ema` (a setting added later): it resumes as its default.
    state = json.loads((out / "run.json").read_text())
    del state["train_config"]["ema"]
    (out / "run.json").write_text(json.dumps(state))
    # The crashed run stored SMALL_MODEL, as a version without the later settings would; the
    # same settings spelled out in full (as `resic train` passes them now) resume it.
    summary = train(tc, out, {**SMALL_MODEL, "ngram_hashes": 1, "ngram_pooling": "mean"},
                    verbose=0)
    assert begun == [1]  # training went on with epoch 2, not from scratch
    assert summary["status"] == "finished"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out / "backup").exists()
    rows = csv_rows(out)  # each (epoch, output) exactly once
    assert sorted(rows) == sorted((e, o) for e in (1, 2) for o in outputs)
    assert {k: rows[k] for k in first} == first  # epoch 1 rows kept as written before the crash
    scalars = read_scalars(out / "tensorboard" / "exits")  # two event files, one per process
    assert len(list((out / "tensorboard" / "exits").iterdir())) == 2
    assert set(scalars) == {f"{m}/{o}" for m in ("macro_f1", "accuracy") for o in outputs}
    for tag, points in scalars.items():
        assert sorted(step for step, _ in points) == [0, 1], tag
    # The saved (last) model carries the optimizer: its step count covers both epochs, so the
    # resumed run started from the restored weights and optimizer, not from a fresh model.
    steps_per_epoch = math.ceil(summary["train_rows"] / tc.batch_size)
    model = keras.saving.load_model(out / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * steps_per_epoch
    assert json.loads((out / "model.keras.best.json").read_text())["epoch"] == 2


@pytest.mark.large
def test_same_seed_gives_identical_metrics(tmp_path, demo_dir):
    data = write_real_rows(demo_dir, tmp_path / "rows.tsv", 100, start=400)
    tc = small_tc(data)
    a = train(tc, tmp_path / "a", SMALL_MODEL, verbose=0)
    b = train(tc, tmp_path / "b", SMALL_MODEL, verbose=0)
    text_a = (tmp_path / "a" / "metrics.csv").read_text()
    assert text_a == (tmp_path / "b" / "metrics.csv").read_text()
    assert len(text_a.splitlines()) == 1 + 4
    assert a["final_val_scores"] == b["final_val_scores"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "validation.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "validation.parquet"))


def test_training_with_a_separate_validation_file(tmp_path):
    from conftest import write_rows
    train_file = write_rows(tmp_path / "train.tsv", 80)
    val_file = write_rows(tmp_path / "val.tsv", 30, start=80)
    summary = train(small_tc(train_file, val_data=str(val_file)), tmp_path / "run", SMALL_MODEL,
                    verbose=0)
    assert summary["status"] == "finished"
    assert (summary["train_rows"], summary["val_rows"]) == (80, 30)
    val = pd.read_parquet(tmp_path / "run" / "validation.parquet")
    expected = load_labelled_texts(val_file, "comments", ["bias", "hate"])
    assert val["comments"].tolist() == expected.texts
    assert val["hate"].tolist() == expected.labels["hate"]
    # classes come from the training file alone
    config = ResICConfig.load(tmp_path / "run" / "config.json")
    train_rows = load_labelled_texts(train_file, "comments", ["bias", "hate"])
    assert list(config.tasks["hate"]) == sorted(set(train_rows.labels["hate"]))
