"""Bad inputs (issue 11, docs/RELIABILITY.md): every row of the table is backed here or by the
test that the table names.

Reader cases go through `load_labelled_texts` (training, calibration and evaluation all read with
it, so its one-line `DataError` is what each command prints after "resic CMD: error: "); one CLI
call per entry point checks the single stderr line and exit code 2; the served signature is
called with bad batches on ONE export made from a copy of the session's `tiny_run`.
"""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import dev_texts
from resic_tf.cli import main
from resic_tf.data import DataError, encode_labels, load_labelled_texts


def one_line(capsys, code: int, command: str) -> str:
    """The single stderr line of a failed command, without its 'resic CMD: error: ' prefix."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    prefix = f"resic {command}: error: "
    assert captured.err.startswith(prefix), captured.err
    return captured.err[len(prefix):-1]


def read_error(path: Path, text_col: str = "text", label_cols=("y",)) -> DataError:
    with pytest.raises(DataError) as info:
        load_labelled_texts(path, text_col, list(label_cols))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return info.value


# ---------------------------------------------------------------------------------------------
# The reader: files that are read, and what comes out
# ---------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
ONE_MB = "x" * 1_000_000
ODD_TEXTS = ["   ", " \u3000 ", "😀👍🏽🎉", "\u0301\u0302\u0303", "مرحبا بالعالم", "שלום עולם",
             "a\u0301"]


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


@pytest.mark.parametrize("name, raw, texts, labels", [
    # a UTF-8 byte-order mark is dropped: the first column keeps its name
    ("bom.tsv", BOM + b"text\ty\nhello\tpos\n", ["hello"], ["pos"]),
    ("bom.csv", BOM + b"text,y\nhello,pos\n", ["hello"], ["pos"]),
    ("bom.jsonl", BOM + jsonl({"text": "hello", "y": "pos"}), ["hello"], ["pos"]),
    # CRLF line ends are line ends: no "\r" in a text or label
    ("crlf.tsv", b"text\ty\r\na\tpos\r\nb\tneg\r\n", ["a", "b"], ["pos", "neg"]),
    ("crlf.csv", b'text,y\r\n"two\r\nlines",pos\r\nb,neg\r\n', ["two\r\nlines", "b"],
     ["pos", "neg"]),
    ("crlf.jsonl", b'{"text": "a", "y": "pos"}\r\n{"text": "b", "y": "neg"}\r\n', ["a", "b"],
     ["pos", "neg"]),
    # labels lose surrounding spaces (texts keep theirs)
    ("spaces.tsv", b"text\ty\n a \t pos \nb\tpos\t\n", [" a ", "b"], ["pos", "pos"]),
    ("spaces.csv", b'text,y\n a ," pos"\nb,pos\n', [" a ", "b"], ["pos", "pos"]),
    ("spaces.jsonl", jsonl({"text": " a ", "y": " pos "}, {"text": "b", "y": "pos"}),
     [" a ", "b"], ["pos", "pos"]),
    # whitespace-only, emoji, combining marks and right-to-left texts are kept exactly
    ("odd.tsv", ("text\ty\n" + "".join(f"{t}\tpos\n" for t in ODD_TEXTS)).encode(),
     ODD_TEXTS, ["pos"] * len(ODD_TEXTS)),
    ("odd.jsonl", jsonl(*({"text": t, "y": "pos"} for t in ODD_TEXTS)), ODD_TEXTS,
     ["pos"] * len(ODD_TEXTS)),
    # NFD Korean is kept as written; the model composes conjoining jamo (see serving below)
    ("nfd.tsv", f"text\ty\n{unicodedata.normalize('NFD', '정말 재밌어요')}\tpos\n".encode(),
     [unicodedata.normalize("NFD", "정말 재밌어요")], ["pos"]),
    # TSV has no quoting: a quote is a character
    ("quote.tsv", b'text\ty\n"half\tpos\n', ['"half'], ["pos"]),
    # a 1 MB line: read whole (the model keeps the first max_len characters)
    ("big.jsonl", jsonl({"text": ONE_MB, "y": "pos"}, {"text": "b", "y": "neg"}), [ONE_MB, "b"],
     ["pos", "neg"]),
    ("big.tsv", f"text\ty\n{ONE_MB}\tpos\nb\tneg\n".encode(), [ONE_MB, "b"], ["pos", "neg"]),
    ("big.csv", f"text,y\n{ONE_MB},pos\nb,neg\n".encode(), [ONE_MB, "b"], ["pos", "neg"]),
    # `1` and `1.0` are one class, in every format
    ("numbers.jsonl", b'{"text": "a", "y": 1}\n{"text": "b", "y": 1.0}\n', ["a", "b"],
     ["1", "1"]),
    ("numbers.tsv", b"text\ty\na\t1\nb\t1.0\nc\t0\n", ["a", "b", "c"], ["1", "1", "0"]),
    ("numbers.csv", b"text,y\na,1\nb,1.0\nc,0.00\n", ["a", "b", "c"], ["1", "1", "0"]),
    ("strings.jsonl", b'{"text": "a", "y": 1}\n{"text": "b", "y": "1.0"}\n', ["a", "b"],
     ["1", "1"]),
])
def test_files_that_are_read(tmp_path, name, raw, texts, labels):
    path = tmp_path / name
    path.write_bytes(raw)
    data = load_labelled_texts(path, "text", ["y"])
    assert data.texts == texts
    assert data.labels == {"y": labels}


def test_labels_with_spaces_in_parquet_and_a_single_class_at_evaluation(tmp_path):
    import pandas as pd

    path = tmp_path / "spaces.parquet"
    pd.DataFrame({"text": ["a", "b"], "y": [" pos", "pos "]}).to_parquet(path)
    data = load_labelled_texts(path, "text", ["y"])
    assert data.labels == {"y": ["pos", "pos"]}
    # one class in a calibration or evaluation file is fine: it is one of the run's classes
    # (training refuses it: test_cli_train.py::test_label_column_with_one_class)
    assert encode_labels(data, {"y": ["neg", "pos"]})["y"].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------
# The reader: one-line errors naming file, row, column
# ---------------------------------------------------------------------------------------------

def _utf16_message(path: Path, err: DataError) -> None:
    message = str(err)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert "UTF-16" in message and "UTF-8" in message, message


@pytest.mark.parametrize("name, raw, expected", [
    # renamed columns: the file's own names are listed, spaces visible
    ("renamed.tsv", b"Text\ty\na\tpos\n",
     "{path}, column 'text': missing column(s) ['text']; the file has columns ['Text', 'y']"),
    ("spaced.csv", b"text ,y\na,pos\n",
     "{path}, column 'text': missing column(s) ['text']; the file has columns ['text ', 'y']"),
    ("renamed.jsonl", b'{"body": "a", "y": "pos"}\n',
     "{path}, column 'text': missing column(s) ['text']; the file has columns ['body', 'y']"),
    # zero rows left after reading: blank lines are no rows
    ("blank_rows.tsv", b"text\ty\n\n\n",
     "{path}: the file has a header but no data rows"),
    ("blank_rows.csv", b"text,y\r\n\r\n\r\n",
     "{path}: the file has a header but no data rows"),
    ("blank_lines.jsonl", b"\n \n\r\n", "{path}: the file is empty"),
    # a raw NUL byte: refused where it is, in every text format
    ("nul.jsonl", b'{"text": "a", "y": "pos"}\n{"text": "b\x00", "y": "pos"}\n',
     "{path}, row 2 (line 2): NUL byte (0x00) at byte offset 37; a text file holds none; "
     "remove it"),
])
def test_read_errors(tmp_path, name, raw, expected):
    path = tmp_path / name
    path.write_bytes(raw)
    assert str(read_error(path)) == expected.format(path=path)


def _no_bom(name, encoding, word):
    return pytest.param(name, encoding, word)


@pytest.mark.parametrize("name, encoding, word", [
    ("utf16.tsv", "utf-16", "hello"), ("utf16.csv", "utf-16", "한국어"),
    ("utf16.jsonl", "utf-16", "hello"),
    # no byte order mark: Korean makes invalid UTF-8 in line 1, which is named as UTF-16 ...
    ("utf16le_ko.jsonl", "utf-16-le", "한국어"),
    # ... but ASCII in UTF-16 is valid UTF-8 with NUL bytes
    _no_bom("utf16le.tsv", "utf-16-le", "hello"), _no_bom("utf16be.csv", "utf-16-be", "hello"),
    _no_bom("utf16le.jsonl", "utf-16-le", "hello"),
])
def test_utf16_file_is_named_as_utf16(tmp_path, name, encoding, word):
    sep = {"tsv": "\t", "csv": ","}.get(name.rsplit(".", 1)[1])
    text = f"text{sep}y\n{word}{sep}pos\n" if sep else f'{{"text": "{word}", "y": "pos"}}\n'
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    _utf16_message(path, read_error(path))


@pytest.mark.parametrize("name, raw", [("nul.tsv", b"text\ty\nok\tpos\nb\x00d\tpos\n"),
                                       ("nul.csv", b'text,y\nok,pos\n"b\x00d",pos\n')])
def test_nul_byte_names_row_column_and_line(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    err = read_error(path)
    assert (err.row, err.column, err.line) == (2, "text", 3)
    assert str(err).startswith(f"{path}, row 2 (line 3), column 'text': NUL byte"), str(err)


def test_split_leaving_no_rows_names_the_file(tmp_path):
    from resic_tf.data import split_train_val
    path = tmp_path / "two.tsv"
    path.write_bytes(b"text\ty\na\tpos\nb\tneg\n")
    with pytest.raises(ValueError) as info:  # one row per class: none can go to validation
        split_train_val(load_labelled_texts(path, "text", ["y"]), 0.1, seed=1)
    assert str(info.value) == (f"{path}: val_split=0.1 of 2 rows leaves an empty train or "
                               "validation set")


# ---------------------------------------------------------------------------------------------
# One CLI call per entry point: one stderr line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

def test_train_on_a_header_only_file(tmp_path, capsys):
    data = tmp_path / "header.tsv"
    data.write_bytes(b"comments\tbias\thate\n")
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--text-col", "comments", "--label-cols",
                 "bias,hate", "--out", str(out), "--quiet"])
    assert one_line(capsys, code, "train") == f"{data}: the file has a header but no data rows"
    assert not out.exists()


@pytest.fixture(scope="module")
def calibrated(tiny_run, tmp_path_factory) -> Path:
    """A copy of tiny_run with its gate (never modify it; copy it again to break it)."""
    from resic_tf.run import Run
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    shutil.copytree(tiny_run, run_dir)
    Run.load(run_dir).calibrate(min_support=2)
    return run_dir


def test_calibrate_with_an_unseen_label_keeps_the_gate(calibrated, tmp_path, capsys):
    data = tmp_path / "val.tsv"
    data.write_bytes("comments\tbias\thate\n좋아요\tnone\tnone\n싫어요\tnone\tspam\n".encode())
    gate = (calibrated / "gate.json").read_bytes()
    code = main(["calibrate", str(calibrated), "--data", str(data)])
    assert one_line(capsys, code, "calibrate") == (
        f"{data}, row 2 (line 3), column 'hate': label 'spam' was not seen in training; known "
        "labels are ['hate', 'none', 'offensive']")
    assert (calibrated / "gate.json").read_bytes() == gate
    assert not [p for p in calibrated.iterdir() if p.name.startswith(".")]  # no temp file


def test_evaluate_with_invalid_utf8_writes_nothing(calibrated, tmp_path, capsys):
    data = tmp_path / "test.csv"
    data.write_bytes(b"comments,bias,hate\nok,none,none\n\"caf\xe9, bar\",none,none\n")
    out = tmp_path / "eval"
    code = main(["evaluate", str(calibrated), "--data", str(data), "--out", str(out)])
    assert one_line(capsys, code, "evaluate") == (
        f"{data}, row 2 (line 3), column 'comments': invalid UTF-8 byte 0xe9 at byte offset 36; "
        "save the file as UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("command", ["calibrate", "evaluate"])
def test_truncated_model_is_one_line(calibrated, tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    shutil.copytree(calibrated, run_dir)
    model = run_dir / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    data = tmp_path / "data.tsv"
    data.write_bytes(b"comments\tbias\thate\na\tnone\tnone\n")
    message = one_line(capsys, main([command, str(run_dir), "--data", str(data)]), command)
    assert message.startswith(f"{model}: cannot load the model (")
    assert message.endswith("); the file is truncated or from another program")


def test_calibrate_replaces_a_truncated_gate(calibrated, tmp_path, capsys):
    from resic_tf.gate import LengthGate
    run_dir = tmp_path / "run"
    shutil.copytree(calibrated, run_dir)
    gate = run_dir / "gate.json"
    gate.write_bytes(gate.read_bytes()[:100])
    assert main(["calibrate", str(run_dir), "--min-support", "2"]) == 0, capsys.readouterr().err
    assert LengthGate.load(gate) == LengthGate.load(calibrated / "gate.json")


# ---------------------------------------------------------------------------------------------
# The exported SavedModel: `resic predict --file` and `serving_default`
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory) -> Path:
    from resic_tf.export import export_run
    return export_run(calibrated, tmp_path_factory.mktemp("reliability_sm") / "tiny", version=1)


@pytest.fixture(scope="module")
def serve(exported):
    import tensorflow as tf
    return tf.saved_model.load(str(exported)).signatures["serving_default"]


def test_predict_empty_file(exported, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code = main(["predict", str(exported), "--file", str(empty)])
    assert one_line(capsys, code, "predict") == f"{empty}: the file is empty"


def test_predict_file_lines(exported, tmp_path, capsys):
    """CRLF ends lines; a blank line is an empty text; a 1 MB line is one text (cut to max_len
    by the model); invalid UTF-8 is refused naming the line (test_export.py)."""
    path = tmp_path / "texts.txt"
    path.write_bytes(b"hello\r\n\r\n   \n" + b"x" * 1_000_000 + b"\n")
    assert main(["predict", str(exported), "--file", str(path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["length"] for r in lines] == [5, 0, 3, 1_000_000]
    assert lines[0]["text"] == "hello" and lines[2]["text"] == "   "


@pytest.mark.parametrize("encoding", [
    "utf-16",
    "utf-16-le",
])
def test_predict_utf16_file(exported, tmp_path, capsys, encoding):
    path = tmp_path / "texts.txt"
    path.write_bytes("hello\n정말 재밌어요\n".encode(encoding))
    message = one_line(capsys, main(["predict", str(exported), "--file", str(path)]), "predict")
    _utf16_message(path, message)


def test_predict_nul_byte(exported, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_bytes(b"hello\nb\x00d\n")
    message = one_line(capsys, main(["predict", str(exported), "--file", str(path)]), "predict")
    assert message.startswith(f"{path}, line 2: NUL byte"), message


def test_predict_utf8_bom(exported, tmp_path, capsys):
    path = tmp_path / "texts.txt"
    path.write_bytes(BOM + b"hello\r\nworld\r\n")
    assert main(["predict", str(exported), "--file", str(path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["text"], r["length"]) for r in lines] == [("hello", 5), ("world", 5)]


def _call(serve, texts):
    import tensorflow as tf
    out = serve(text=tf.constant(texts, tf.string, shape=[len(texts)]))
    return {k: v.numpy() for k, v in out.items()}


def _assert_valid(out, n: int, tasks) -> None:
    assert out["length"].shape == (n,)
    for task, classes in tasks.items():
        p = out[f"{task}_probabilities"]
        assert p.shape == (n, len(classes)) and np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
        assert out[f"{task}_label"].shape == (n,)


@pytest.fixture(scope="module")
def config(exported):
    from resic_tf.config import ResICConfig
    return ResICConfig.load(exported / "config.json")


def test_serving_empty_batch(serve, config):
    out = _call(serve, [])
    _assert_valid(out, 0, config.tasks)
    assert out["bias_exit"].shape == (0,) and out["blocks_run"].shape == (0,)


def test_serving_10000_rows(serve, config):
    texts = (dev_texts(400) * 25)[:10_000]
    out = _call(serve, texts)
    _assert_valid(out, 10_000, config.tasks)
    assert out["length"].tolist() == [len(t) for t in texts]
    small = _call(serve, texts[:40])  # rows do not depend on the batch they come in
    for key, value in small.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(out[key][:40], value, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(out[key][:40], value, err_msg=key)


def test_serving_a_100000_character_string_is_cut_to_max_len(serve, config):
    long = "가나다 ab😀!" * 12_500
    assert len(long) == 100_000
    out = _call(serve, [long, long[:config.max_len]])
    _assert_valid(out, 2, config.tasks)
    assert out["length"].tolist() == [100_000, config.max_len]  # the true length, for the gate
    for task in config.tasks:  # same (last, open-ended) bucket, same first max_len characters
        np.testing.assert_allclose(out[f"{task}_probabilities"][0],
                                   out[f"{task}_probabilities"][1], rtol=1e-5, atol=1e-6)
        assert out[f"{task}_exit"][0] == out[f"{task}_exit"][1]


def test_serving_non_utf8_bytes_are_replacement_characters(serve, config):
    out = _call(serve, [b"caf\xe9 \xff\xfe ok", "caf\ufffd \ufffd\ufffd ok".encode(), b"\x80"])
    _assert_valid(out, 3, config.tasks)
    assert out["length"].tolist() == [10, 10, 1]  # one character per invalid byte
    for key in out:  # the same ids: the same answer (probabilities to float rounding, as a
        # batch's rows may take different vector paths)
        if out[key].dtype.kind == "f":
            np.testing.assert_allclose(out[key][0], out[key][1], rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(out[key][0], out[key][1], err_msg=key)


def test_serving_odd_texts(serve, config):
    texts = ["", *ODD_TEXTS, "a\x00b"]  # a NUL is a character like any other here
    out = _call(serve, texts)
    _assert_valid(out, len(texts), config.tasks)
    # code points, as Python counts them: emoji modifiers and combining marks count
    assert out["length"].tolist() == [len(t) for t in texts]


def test_serving_nfd_korean_equals_nfc(serve, config):
    nfc = [t for t in dev_texts(60) if any("가" <= c <= "힣" for c in t)][:30]
    nfd = [unicodedata.normalize("NFD", t) for t in nfc]
    assert all(a != b for a, b in zip(nfc, nfd)) and len(nfc) == 30
    a, b = _call(serve, nfc), _call(serve, nfd)
    assert a["length"].tolist() == [len(t) for t in nfc]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
