"""The `resic` command line as a whole: help without TensorFlow, help text for every option,
one-line user errors vs. tracebacks for bugs (`--debug`), and `--quiet` training output."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import resic_tf.cli as cli
from conftest import write_rows
from resic_tf.cli import build_parser, main

SUBCOMMANDS = ["train", "calibrate", "evaluate", "export", "predict", "analyze", "baselines",
               "demo"]

NO_TF = r'''
import sys
from resic_tf.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("tensorflow", "keras", "pandas", "matplotlib") if m in sys.modules)
assert not heavy, f"imported {heavy}"
print("EXIT", code)
'''


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["calibrate", "--help"],
                                  ["export", "--help"]])
def test_help_does_not_import_tensorflow(argv):
    proc = subprocess.run([sys.executable, "-c", NO_TF, *argv], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith("EXIT 0")
    usage = "usage: resic " + ("" if argv == ["--help"] else argv[0])
    assert proc.stdout.startswith(usage)
    if argv == ["--help"]:
        for name in SUBCOMMANDS:
            assert name in proc.stdout
        assert "--debug" in proc.stdout


def test_package_import_is_lazy():
    code = ("import sys, resic_tf\n"
            "assert 'tensorflow' not in sys.modules\n"
            "cfg = resic_tf.ResICConfig(tasks={'t': ['a', 'b']}, vocab_size=5, filters=(4, 4), "
            "blocks=(1, 1))\n"
            "assert 'tensorflow' not in sys.modules, 'config needs no TF'\n"
            "assert dir(resic_tf) == sorted(resic_tf.__all__)\n"
            "try:\n    resic_tf.nope\nexcept AttributeError as e:\n    print(e)\n"
            "from resic_tf import ResICClassifier\n"
            "assert 'tensorflow' in sys.modules\n"
            "print(ResICClassifier.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["module 'resic_tf' has no attribute 'nope'",
                                        "resic_tf.model"]


def test_console_script_help():
    script = Path(sys.executable).parent / "resic"
    proc = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: resic train")
    assert "--quiet" in proc.stdout and "--loss-weighting" in proc.stdout


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    sub = _subparsers(parser)
    assert list(sub.choices) == SUBCOMMANDS
    # the subcommands' one-line help in `resic --help`
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(SUBCOMMANDS)
    checked = 0
    for name, text in helps.items():
        assert isinstance(text, str) and text.strip(), name
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            assert action.help and action.help != argparse.SUPPRESS, action.dest
    for name, subparser in sub.choices.items():
        assert subparser.description and subparser.description.strip(), name
        for action in subparser._actions:
            what = f"resic {name} {'/'.join(action.option_strings) or action.dest}"
            assert isinstance(action.help, str), what
            assert action.help.strip() and action.help != argparse.SUPPRESS, what
            checked += 1
        subparser.format_help()  # every %(default)s in a help string expands
    assert checked >= 40
    train = {a.dest: a for a in sub.choices["train"]._actions}
    assert "(default 0.1)" in train["val_split"].help % {"default": train["val_split"].default}


# ---------------------------------------------------------------------------------------------
# User errors: one line; --debug: the traceback too; bugs: always the traceback
# ---------------------------------------------------------------------------------------------

def test_user_error_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nope"
    expected = (f"resic calibrate: error: {missing} is not a finished run directory: "
                "config.json is missing")
    assert main(["calibrate", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == expected + "\n" and captured.out == ""

    assert main(["--debug", "calibrate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert "resic_tf.run.RunDirectoryError: " in err and 'run.py", line ' in err
    assert err.rstrip("\n").splitlines()[-1] == expected


def test_debug_must_come_before_the_subcommand(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(tmp_path), "--debug"])
    assert info.value.code == 2
    assert "unrecognized arguments: --debug" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("internal bug"),
                                   KeyError("bias_lc"), ImportError("no module named x")])
@pytest.mark.parametrize("debug", [False, True])
def test_internal_errors_propagate_with_their_traceback(monkeypatch, capsys, tmp_path, error,
                                                         debug):
    def broken(args):
        raise error

    monkeypatch.setattr(cli, "run_calibrate", broken)  # build_parser reads it at call time
    with pytest.raises(type(error)) as info:
        main((["--debug"] if debug else []) + ["calibrate", str(tmp_path)])
    assert info.value is error
    assert "error:" not in capsys.readouterr().err  # not turned into a one-line message


@pytest.mark.parametrize("error", [FileNotFoundError("x.tsv"), FileExistsError("out exists"),
                                   PermissionError("denied"), IsADirectoryError("a dir"),
                                   NotADirectoryError("not a dir")])
def test_file_errors_are_user_errors(monkeypatch, capsys, tmp_path, error):
    def failing(args):
        raise error

    monkeypatch.setattr(cli, "run_evaluate", failing)
    assert main(["evaluate", str(tmp_path), "--data", "x.tsv"]) == 2
    assert capsys.readouterr().err == f"resic evaluate: error: {error}\n"


# ---------------------------------------------------------------------------------------------
# --quiet: the epoch summaries stay, Keras's progress bar goes
# ---------------------------------------------------------------------------------------------

SUMMARY = re.compile(
    r"epoch 1/1 \| loss \d+\.\d{4} \| val_loss \d+\.\d{4} \| "
    r"bias: LC macro-F1 \d\.\d{4}, best bias_(ic1|lc) \d\.\d{4} \| "
    r"hate: LC macro-F1 \d\.\d{4}, best hate_(ic1|lc) \d\.\d{4} \| \d+ s$", re.MULTILINE)


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_training_keeps_the_epoch_summary_and_drops_the_progress_bar(
        tmp_path, capsys, monkeypatch, quiet):
    data = write_rows(tmp_path / "rows.tsv", 80, start=500)
    # a terminal: Keras draws its progress bar there unless --quiet
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    argv = ["train", "--data", str(data), "--text-col", "comments", "--label-cols", "bias,hate",
            "--filters", "4,4", "--blocks", "1,1", "--max-len", "32", "--embedding-dim", "4",
            "--epochs", "1", "--batch-size", "16", "--val-split", "0.25",
            "--out", str(tmp_path / "run")]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    out = capsys.readouterr().out
    assert len(SUMMARY.findall(out)) == 1, out[-3000:]
    progress = "━" in out or "/step" in out
    assert progress is (not quiet)
    # the default recipe's wide stage and linear branch each say what they did in one line
    assert re.search(r"^Wide stage: 25 epochs by SGD, loss \d+\.\d{4} -> \d+\.\d{4}", out, re.M)
    assert re.search(r"^Linear branch: \d+ of \d+ n-grams in \d+ texts", out, re.M)
    if quiet:  # nothing but those, the summary line and the final report
        lines = [line for line in out.splitlines()
                 if not line.startswith(("Wide stage: ", "Linear branch: "))]
        assert SUMMARY.fullmatch(lines[0]) and "\r" not in out and "\b" not in out
        assert lines[1:3] == ["", lines[2]] and lines[2].startswith("Trained ")
    assert "| lc |" in out  # the final table is printed either way
