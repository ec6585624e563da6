"""resic_tf.run: the run directory's files, `Run.save` / `Run.load`, one-line errors for missing,
truncated or foreign files, and runs written by resic_tf 0.1 (tests/data/run_v0_1)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import dev_texts, keras_gated, write_rows
from resic_tf.cli import main
from resic_tf.config import ResICConfig, TrainConfig
from resic_tf.gate import LengthGate
from resic_tf.metrics import accuracy, macro_f1
from resic_tf.model import ResICClassifier
from resic_tf.preprocessor import ResICPreprocessor
from resic_tf.run import (CONFIG_FILE, GATE_FILE, MODEL_FILE, REQUIRED_FILES, TRAIN_CONFIG_FILE,
                          VALIDATION_FILE, VOCAB_FILE, Run, RunDirectoryError, predict_exits)
from resic_tf.validation import InvalidValueError, UserError

OLD_RUN = Path(__file__).resolve().parent / "data" / "run_v0_1"
EDGE_TEXTS = ["정말 재밌어요 ㅋㅋㅋ", "What a great show", "😀😀 👍🏽 최고", "", "가" * 500]


def copy_run(source: Path, dest: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*without) if without else None)
    return dest


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------

def test_required_files():
    assert REQUIRED_FILES == (CONFIG_FILE, TRAIN_CONFIG_FILE, VOCAB_FILE, MODEL_FILE) == \
        ("config.json", "train_config.json", "vocab.json", "model.keras")


def test_save_load_round_trip(tiny_run, tmp_path):
    source = copy_run(tiny_run, tmp_path / "source", without=("gate.json",))
    run = Run.load(source)
    assert run.path == source and run.gate is None
    assert isinstance(run.model, ResICClassifier)
    gate = run.calibrate(min_support=2)
    assert run.gate is gate and LengthGate.load(source / GATE_FILE) == gate

    run.save(tmp_path / "again")
    assert run.path == tmp_path / "again"
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(
        [CONFIG_FILE, TRAIN_CONFIG_FILE, VOCAB_FILE, VALIDATION_FILE, GATE_FILE, MODEL_FILE])
    again = Run.load(tmp_path / "again")
    assert again.config == run.config == ResICConfig.load(tiny_run / CONFIG_FILE)
    assert again.train_config == run.train_config == TrainConfig.load(tiny_run / TRAIN_CONFIG_FILE)
    assert again.vocabulary.chars == run.vocabulary.chars
    assert again.validation.texts == run.validation.texts
    assert again.validation.labels == run.validation.labels
    assert len(again.validation) == 60
    assert again.gate == gate and again.gate.to_dict() == gate.to_dict()
    assert again.gate.details["_source"] == str(source / VALIDATION_FILE)
    texts = run.validation.texts + EDGE_TEXTS
    before, after = predict_exits(run.model, texts), predict_exits(again.model, texts)
    for task in run.config.tasks:
        np.testing.assert_allclose(after[task], before[task], rtol=0, atol=1e-6)
    assert again.preprocessor.chars == run.vocabulary.chars


def test_save_without_model_writes_the_small_files(tiny_run, tmp_path):
    run = Run.load(tiny_run)
    run.save(tmp_path / "small", model=False)
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == sorted(
        [CONFIG_FILE, TRAIN_CONFIG_FILE, VOCAB_FILE, VALIDATION_FILE])
    with pytest.raises(RunDirectoryError, match="model.keras is missing"):
        Run.load(tmp_path / "small")


def test_in_memory_run_has_no_files(tiny_run):
    loaded = Run.load(tiny_run)
    run = Run(loaded.config, loaded.train_config, loaded.vocabulary, loaded.model,
              loaded.validation)
    with pytest.raises(InvalidValueError) as info:
        run.file(GATE_FILE)
    assert str(info.value) == "This run has no directory yet; call `run.save(directory)`"
    gate = run.calibrate(min_support=2)  # in memory: on its own rows, nothing is written
    assert run.gate is gate and gate.details["_source"] == "validation rows (in memory)"
    assert not (tiny_run / GATE_FILE).exists()
    # the gate of the run's own validation rows
    from resic_tf.data import encode_labels
    from resic_tf.gate import calibrate
    from resic_tf.vocabulary import text_lengths
    rows = loaded.validation
    assert gate == calibrate(loaded.config, predict_exits(loaded.model, rows.texts),
                             encode_labels(rows, loaded.config.tasks), text_lengths(rows.texts),
                             10, "macro_f1", 2)
    # without a model the preprocessor comes from the vocabulary
    bare = Run(loaded.config, loaded.train_config, loaded.vocabulary)
    assert isinstance(bare.preprocessor, ResICPreprocessor)
    assert bare.preprocessor.chars == loaded.vocabulary.chars
    assert bare.preprocessor.max_len == loaded.config.max_len


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_load_names_the_missing_file(tiny_run, tmp_path, name, capsys):
    run_dir = copy_run(tiny_run, tmp_path / "partial")
    (run_dir / name).unlink()
    with pytest.raises(RunDirectoryError) as info:
        Run.load(run_dir)
    assert str(info.value) == f"{run_dir} is not a finished run directory: {name} is missing"
    assert isinstance(info.value, (FileNotFoundError)) and isinstance(info.value, UserError)
    assert isinstance(info.value, ValueError)
    # the CLI prints it as one line and exits 2
    assert main(["calibrate", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err == (f"resic calibrate: error: {run_dir} is not a finished run directory: "
                   f"{name} is missing\n")


def test_calibrate_without_validation_rows_needs_data(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run", without=(VALIDATION_FILE,))
    run = Run.load(run_dir)
    assert run.validation is None
    with pytest.raises(RunDirectoryError) as info:
        run.calibrate()
    assert str(info.value) == "validation.parquet is missing: pass validation data"
    data = write_rows(tmp_path / "dev30.tsv", 30, source="dev.tsv")
    gate = run.calibrate(data, min_support=1)
    assert gate.details["_source"] == str(data)
    assert sum(b["support"] for b in gate.to_dict()["tasks"]["hate"]["buckets"]) == 30


# ---------------------------------------------------------------------------------------------
# Truncated and foreign files: one line naming the file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, detail", [
    (GATE_FILE, '{\n  "bucket_width": 10,\n  "metric": "macro',
     "not valid JSON (Unterminated string starting at at line 3, column 13); the file is "
     "truncated or corrupt"),
    (CONFIG_FILE, '{"tasks": {"bias": ["gender", "none"',
     "not valid JSON (Expecting ',' delimiter at line 1, column 37); the file is truncated or "
     "corrupt"),
    (CONFIG_FILE, "", "not valid JSON (Expecting value at line 1, column 1); the file is "
                      "truncated or corrupt"),
    (TRAIN_CONFIG_FILE, "[1, 2]",
     None),  # valid JSON, not an object: the config says so
    (GATE_FILE, '{"bucket_width": 10}',
     "not a gate file (KeyError: 'tasks'); re-run `resic calibrate`"),
])
def test_truncated_or_foreign_json_raises_one_line(tiny_run, tmp_path, name, text, detail,
                                                   capsys):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / name).write_text(text, encoding="utf-8")
    with pytest.raises(InvalidValueError) as info:
        Run.load(run_dir)
    message = str(info.value)
    if detail is None:
        assert message == "A TrainConfig must be a JSON object of its fields. Received: list"
    else:
        assert message == f"{run_dir / name}: {detail}"
    assert "\n" not in message
    assert main(["export", str(run_dir), "--out", str(tmp_path / "sm")]) == 2
    assert capsys.readouterr().err == f"resic export: error: {message}\n"
    assert not (tmp_path / "sm").exists()


def test_truncated_model_file_raises_one_line(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    data = (run_dir / MODEL_FILE).read_bytes()
    (run_dir / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidValueError) as info:
        Run.load(run_dir)
    message = str(info.value)
    assert message.startswith(f"{run_dir / MODEL_FILE}: cannot load the model (")
    assert message.endswith("); the file is truncated or from another program")
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# A run written by resic_tf 0.1
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def old_run(tmp_path) -> Path:
    return copy_run(OLD_RUN, tmp_path / "run_v0_1")


def test_old_run_loads_and_reproduces_its_own_scores(old_run):
    run = Run.load(old_run)
    assert run.config == ResICConfig(
        tasks={"bias": ["gender", "none", "others"], "hate": ["hate", "none", "offensive"]},
        vocab_size=509, filters=(4, 4), blocks=(1, 1), max_len=32, embedding_dim=4,
        length_adaptive=False, ngram_buckets=0,  # 0.1 wrote neither: fixed-length, no wide
        wide_fusion="features")
    assert run.model.backbone.length_adaptive is False
    assert tuple(run.model.input.shape) == (None, 32)
    assert run.model.preprocessor.pad_to_max_len is True
    assert run.train_config.val_split == 0.25 and len(run.validation) == 30
    assert isinstance(run.model, ResICClassifier)
    # 0.1 saved the model without its preprocessor: it is attached from vocab.json
    assert isinstance(run.model.preprocessor, ResICPreprocessor)
    assert run.model.preprocessor.chars == run.vocabulary.chars
    assert run.model.preprocessor.max_len == 32 and len(run.vocabulary.chars) == 507
    assert run.gate is not None and run.gate.choice == LengthGate.load(OLD_RUN / GATE_FILE).choice

    # raw strings predict as the 0.1 encoder's ids did
    texts = run.validation.texts + EDGE_TEXTS
    from_strings = run.model.predict(texts, verbose=0)
    from_ids = run.model.predict(ResICPreprocessor(run.vocabulary.chars, 32, pad_to_max_len=True)(
        tf.constant(texts)), verbose=0)
    for name in from_ids:
        np.testing.assert_allclose(from_strings[name], from_ids[name], rtol=0, atol=1e-6)

    # the loaded weights and ids give the validation scores the 0.1 run wrote
    probs = predict_exits(run.model, run.validation.texts)
    with open(old_run / "metrics.csv", newline="", encoding="utf-8") as f:
        written = {r["output"]: r for r in csv.DictReader(f)}
    table = (old_run / "final_exits.md").read_text(encoding="utf-8").splitlines()[2:]
    final = {row.strip("| ").split(" | ")[0]: row.strip("| ").split(" | ")[1:] for row in table}
    for t, task in enumerate(("bias", "hate")):
        classes = list(run.config.tasks[task])
        y = np.array([classes.index(v) for v in run.validation.labels[task]])
        for e, exit_ in enumerate(("ic1", "lc")):
            pred = probs[task][:, e].argmax(-1)
            acc, f1 = accuracy(y, pred), macro_f1(y, pred, 3)
            assert acc == pytest.approx(float(written[f"{task}_{exit_}"]["accuracy"]), abs=1e-6)
            assert f1 == pytest.approx(float(written[f"{task}_{exit_}"]["macro_f1"]), abs=1e-6)
            assert final[exit_][2 * t: 2 * t + 2] == [f"{acc:.4f}", f"{f1:.4f}"]


def test_old_run_calibrates_to_its_own_gate_and_evaluates(old_run, tmp_path, capsys):
    old_gate = json.loads((OLD_RUN / GATE_FILE).read_text(encoding="utf-8"))
    run = Run.load(old_run)
    gate = run.calibrate()  # the 0.1 defaults: width 10, macro-F1, min_support 20
    new_gate = gate.to_dict()
    assert new_gate["calibration_data"] == str(old_run / VALIDATION_FILE)
    assert {k: v for k, v in new_gate.items() if k != "calibration_data"} == \
        {k: v for k, v in old_gate.items() if k != "calibration_data"}

    data = write_rows(tmp_path / "dev40.tsv", 40, source="dev.tsv")
    assert main(["evaluate", str(old_run), "--data", str(data), "--out",
                 str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    table = {(r["task"], r["exit"]): r for r in
             csv.DictReader(open(tmp_path / "eval" / "evaluation.csv", encoding="utf-8"))}
    from resic_tf.data import encode_labels, load_labelled_texts
    rows = load_labelled_texts(data, "comments", ["bias", "hate"])
    labels = encode_labels(rows, run.config.tasks)
    gated = keras_gated(run, rows.texts)
    probs = predict_exits(run.model, rows.texts)
    for task, classes in run.config.tasks.items():
        for e, exit_ in enumerate(("ic1", "lc")):
            pred = probs[task][:, e].argmax(-1)
            assert float(table[(task, exit_)]["macro_f1"]) == pytest.approx(
                macro_f1(labels[task], pred, 3), abs=1e-6)
        gate_pred = [list(classes).index(v) for v in gated[task][0]]
        assert float(table[(task, "gate")]["accuracy"]) == pytest.approx(
            accuracy(labels[task], gate_pred), abs=1e-6)


def test_old_run_exports_and_serves_the_keras_gated_labels(old_run, tmp_path):
    from resic_tf.export import export_run

    run = Run.load(old_run)
    run.calibrate(min_support=2)  # a gate that uses both exits of hate
    texts = EDGE_TEXTS + dev_texts(80)
    expected = keras_gated(run, texts)
    assert len(set(expected["hate"][1])) == 2
    path = export_run(run, tmp_path / "sm")
    assert path == tmp_path / "sm" / "1"
    served = tf.saved_model.load(str(path)).signatures["serving_default"](
        text=tf.constant(texts, tf.string))
    assert served["length"].numpy().tolist() == [len(t) for t in texts]
    for task, (labels, exits, probs) in expected.items():
        assert [v.decode("utf-8") for v in served[f"{task}_label"].numpy()] == labels
        assert served[f"{task}_exit"].numpy().tolist() == exits
        np.testing.assert_allclose(served[f"{task}_probabilities"].numpy(), probs,
                                   rtol=1e-4, atol=1e-5)
