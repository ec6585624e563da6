"""`resic train` through `resic_tf.cli.main`: argument mapping, printed summary, user errors.

The real end-to-end run is the session's `tiny_run` (made by `main(["train", ...])` on 300 real
rows); every error case here fails before `model.fit`, so this file trains nothing itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from resic_tf.cli import main
from conftest import TINY_EXITS

BASE = ["--text-col", "comments", "--label-cols", "bias,hate", "--quiet"]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), *BASE, "--out", str(out), *extra]


def one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("resic train: error: ")
    return lines[0][len("resic train: error: "):]


def edited_copy(real_tsv: Path, path: Path, edit) -> Path:
    frame = pd.read_csv(real_tsv, sep="\t", dtype=str, keep_default_na=False)
    edit(frame)
    frame.to_csv(path, sep="\t", index=False)
    return path


# ---------------------------------------------------------------------------------------------
# The tiny run trained by the CLI
# ---------------------------------------------------------------------------------------------

def test_tiny_run_reflects_the_command_line(tiny_run, real_tsv):
    state = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))
    assert state["status"] == "finished"
    assert state["model_kwargs"] == {"arch": "resic18", "filters": [8, 8, 8, 8], "blocks": [1, 1, 1, 1],
                                     "max_len": 132, "embedding_dim": 64, "dropout": 0.2,
                                     "loss_weighting": "paper", "bn_momentum": 0.9,
                                     "length_adaptive": True, "ngram_buckets": None,
                                     "ngram_dim": None, "ngram_sizes": [1, 2, 3, 4],
                                     "ngram_rate": None, "ngram_hashes": 1,
                                     "ngram_pooling": "mean", "wide_fusion": "late",
                                     "wide_weight": None, "exit_pooling": "average",
                                     "nested_tasks": None, "jamo_embedding": False,
                                     "linear_ngrams": 0}
    # no --ngram-dim: the width the tasks call for (3 classes at most: 64) is what config.json
    # keeps; no --ngram-buckets or --ngram-rate: the table a corpus of fewer than 80,000 rows gets
    config = json.loads((tiny_run / "config.json").read_text(encoding="utf-8"))
    assert (config["ngram_dim"], config["ngram_buckets"], config["ngram_rate"]) == (64, 65536, 10.0)
    assert state["train_config"] == {
        "data": str(real_tsv), "text_col": "comments", "label_cols": ["bias", "hate"],
        "val_data": None, "val_split": 0.2, "epochs": 2, "batch_size": 32,
        "learning_rate": 0.003, "seed": 1, "min_char_freq": 1, "select": "best",
        "strategy": "auto", "batching": "auto", "optimizer": "adamw", "weight_decay": 0.01,
        "schedule": "cosine", "warmup": 0.05, "label_smoothing": 0.0, "class_weighting": "sqrt",
        "distillation": 0.0, "wide_loss": 0.0, "ema": 0.0, "wide_epochs": 0,
        "wide_learning_rate": 8.0, "linear_c": 10.0, "linear_mix": "auto", "stream": False,
        "shuffle_buffer": 65536, "steps_per_epoch": None}
    table = (tiny_run / "final_exits.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| exit | bias acc | bias macro-F1 | hate acc | hate macro-F1 |"
    assert [row.split(" | ")[0] for row in table[2:]] == \
        [f"| {e}" for e in TINY_EXITS]
    lc = table[-1].strip("| ").split(" | ")
    scores = state["final_val_scores"]
    assert lc[1:] == [f"{scores[f'{t}_lc'][m]:.4f}" for t in ("bias", "hate")
                      for m in ("accuracy", "macro_f1")]


def test_train_prints_summary_and_table(tiny_run, real_tsv, tmp_path, monkeypatch, capsys):
    """What `resic train` prints and how it maps flags; `train` is replaced by a tiny_run copy."""
    import resic_tf.training

    calls = []

    def fake_train(tc, out_dir, model_kwargs, overwrite=False, verbose="auto"):
        calls.append((tc, model_kwargs, overwrite, verbose))
        shutil.copytree(tiny_run, out_dir)
        return json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))

    monkeypatch.setattr(resic_tf.training, "train", fake_train)
    out = tmp_path / "printed"
    code = main(["train", "--data", str(real_tsv), "--val-split", "0.3", "--text-col", "comments",
                 "--label-cols", "bias, hate", "--arch", "resic34", "--filters", "4,8,8,16",
                 "--blocks", "1,1,1,1", "--max-len", "40", "--embedding-dim", "8",
                 "--dropout", "0.1", "--loss-weighting", "uniform", "--bn-momentum", "0.8",
                 "--epochs", "3",
                 "--batch-size", "16", "--learning-rate", "0.01", "--min-char-freq", "2",
                 "--seed", "5", "--select", "last", "--strategy", "default",
                 "--fixed-length", "--batching", "by_length", "--out", str(out),
                 "--overwrite", "--quiet"])
    assert code == 0
    [(tc, model_kwargs, overwrite, verbose)] = calls
    assert tc.to_dict() == {"data": str(real_tsv), "text_col": "comments",
                            "label_cols": ["bias", "hate"], "val_data": None, "val_split": 0.3,
                            "epochs": 3, "batch_size": 16, "learning_rate": 0.01, "seed": 5,
                            "min_char_freq": 2, "select": "last", "strategy": "default",
                            "batching": "by_length", "optimizer": "adamw",
                            "weight_decay": 0.01, "schedule": "cosine", "warmup": 0.05,
                            "label_smoothing": 0.0, "class_weighting": "sqrt",
                            "distillation": 0.0, "wide_loss": 0.0, "ema": 0.0,
                            "wide_epochs": 25, "wide_learning_rate": 8.0, "linear_c": 10.0,
                            "linear_mix": "auto", "stream": False,
                            "shuffle_buffer": 65536, "steps_per_epoch": None}
    assert model_kwargs == {"arch": "resic34", "filters": [4, 8, 8, 16], "blocks": [1, 1, 1, 1],
                            "max_len": 40, "embedding_dim": 8, "dropout": 0.1,
                            "loss_weighting": "uniform", "bn_momentum": 0.8,
                            "length_adaptive": False, "ngram_buckets": None, "ngram_dim": None,
                            "ngram_sizes": [1, 2, 3, 4], "ngram_rate": None, "ngram_hashes": 1,
                            "ngram_pooling": "mean", "wide_fusion": "late", "wide_weight": None,
                            "exit_pooling": "average", "nested_tasks": None,
                            "jamo_embedding": False, "linear_ngrams": 1_000_000}
    assert (overwrite, verbose) == (True, 0)
    printed = capsys.readouterr().out
    state = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))
    assert f"Trained {state['params']:,} parameters on {state['train_rows']} rows in " \
           f"{state['fit_seconds']} s; validation ({state['val_rows']} rows), per exit:" in printed
    assert (tiny_run / "final_exits.md").read_text(encoding="utf-8") in printed
    assert f"Model: {out / 'model.keras'}" in printed
    assert f"Per-epoch table: {out / 'metrics.csv'}" in printed
    assert f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}" in printed


@pytest.mark.parametrize("flags, linear, wide_epochs", [
    ([], 1_000_000, 25),  # the default recipe (0.14): linear branch and wide stage
    (["--recipe", "paper"], 0, 0),
    (["--wide-fusion", "features"], 0, 0),  # both need late fusion's wide branch
    (["--ngram-buckets", "0"], 0, 0),
    (["--linear-ngrams", "0"], 0, 25),
    (["--stream", "on"], 0, 25),  # its fit holds every row's TF-IDF: not in bounded memory
    (["--stream", "on", "--linear-ngrams", "300"], 300, 25),
    (["--recipe", "paper", "--wide-fusion", "late", "--ngram-buckets", "4096",
      "--linear-ngrams", "500", "--wide-epochs", "3"], 500, 3),
])
def test_the_recipe_gives_the_linear_branch_and_wide_stage_only_with_late_fusion(
        tiny_run, real_tsv, tmp_path, monkeypatch, flags, linear, wide_epochs):
    import resic_tf.training
    calls = []

    def fake_train(tc, out_dir, model_kwargs, **_):
        calls.append((tc, model_kwargs))
        shutil.copytree(tiny_run, out_dir)
        return json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))

    monkeypatch.setattr(resic_tf.training, "train", fake_train)
    assert main(train_args(real_tsv, tmp_path / "run", *flags)) == 0
    [(tc, kwargs)] = calls
    assert (kwargs["linear_ngrams"], tc.wide_epochs) == (linear, wide_epochs)


# ---------------------------------------------------------------------------------------------
# User mistakes: exit code 2, one line naming file / row / column, no traceback
# ---------------------------------------------------------------------------------------------

def test_missing_column(real_tsv, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(real_tsv), "--text-col", "comments", "--label-cols",
                 "bias,nope", "--out", str(out), "--quiet"])
    assert one_line_error(capsys, code) == (
        f"{real_tsv}, column 'nope': missing column(s) ['nope']; the file has columns "
        "['comments', 'contain_gender_bias', 'bias', 'hate']")
    assert not out.exists()  # the corrected command can run without --overwrite


def test_missing_text_column(real_tsv, tmp_path, capsys):
    code = main(["train", "--data", str(real_tsv), "--text-col", "text", "--label-cols", "hate",
                 "--out", str(tmp_path / "run")])
    assert one_line_error(capsys, code).startswith(
        f"{real_tsv}, column 'text': missing column(s) ['text']")


def test_label_column_with_a_missing_label(real_tsv, tmp_path, capsys):
    def blank_row_5(frame):
        frame.loc[4, "hate"] = ""

    data = edited_copy(real_tsv, tmp_path / "blank.tsv", blank_row_5)
    code = main(train_args(data, tmp_path / "run"))
    assert one_line_error(capsys, code) == f"{data}, row 5 (line 6), column 'hate': missing label"


def test_label_column_with_one_class(real_tsv, tmp_path, capsys):
    def constant(frame):
        frame["contain_gender_bias"] = "False"

    data = edited_copy(real_tsv, tmp_path / "constant.tsv", constant)
    code = main(["train", "--data", str(data), "--text-col", "comments", "--label-cols",
                 "hate,contain_gender_bias", "--out", str(tmp_path / "run")])
    assert one_line_error(capsys, code) == (
        f"{data}, column 'contain_gender_bias': label column needs at least 2 classes, "
        "found ['False']")


def test_validation_label_unseen_in_training(real_tsv, tmp_path, capsys):
    def spam_row_2(frame):
        frame.loc[1, "hate"] = "spam"

    dev = edited_copy(real_tsv, tmp_path / "dev.tsv", spam_row_2)
    code = main(["train", "--data", str(real_tsv), "--val-data", str(dev), *BASE,
                 "--out", str(tmp_path / "run")])
    assert one_line_error(capsys, code) == (
        f"{dev}, row 2 (line 3), column 'hate': label 'spam' was not seen in training; "
        "known labels are ['hate', 'none', 'offensive']")


def test_non_utf8_cell(real_tsv, tmp_path, capsys):
    lines = real_tsv.read_bytes().split(b"\n")
    text, rest = lines[3].split(b"\t", 1)  # data row 3 (line 4)
    lines[3] = text[:6] + b"\xff" + text[6:] + b"\t" + rest
    data = tmp_path / "latin.tsv"
    data.write_bytes(b"\n".join(lines))
    message = one_line_error(capsys, main(train_args(data, tmp_path / "run")))
    assert message.startswith(f"{data}, row 3 (line 4), column 'comments': invalid UTF-8 byte 0xff")


def test_missing_file(tmp_path, capsys):
    data = tmp_path / "nope.tsv"
    assert one_line_error(capsys, main(train_args(data, tmp_path / "run"))) == \
        f"{data}: file not found"


def test_finished_run_needs_overwrite(tiny_run, real_tsv, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    code = main(train_args(real_tsv, run_dir))
    assert one_line_error(capsys, code) == \
        f"{run_dir} holds a finished run; choose a new --out or pass --overwrite"
    assert (run_dir / "model.keras").read_bytes() == (tiny_run / "model.keras").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--filters", "8,8"], "`filters` needs one value per stage (4 for blocks=[2, 2, 2, 2]). "
                           "Received: filters=[8, 8]"),
    (["--epochs", "0"], "`epochs` must be >= 1. Received: epochs=0"),
    (["--dropout", "1.5"], "`dropout` must be in [0, 1). Received: dropout=1.5"),
])
def test_bad_settings(real_tsv, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert one_line_error(capsys, main(train_args(real_tsv, out, *extra))) == message
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--arch", "resic50"], "argument --arch: invalid choice: 'resic50' (choose from "),
    (["--filters", "8,x"], "argument --filters: expected comma-separated integers, got '8,x'"),
    (["--filters", "8,0,8,8"], "argument --filters: expected positive integers, got '8,0,8,8'"),
    (["--select", "worst"], "argument --select: invalid choice: 'worst'"),
])
def test_argparse_errors(real_tsv, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(train_args(real_tsv, tmp_path / "run", *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "--arch" in extra:  # valid choices are listed (quoting differs across Python versions)
        assert "resic18" in err.splitlines()[-1] and "resic34" in err.splitlines()[-1]
