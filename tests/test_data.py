"""Reading labelled tables, the character vocabulary and one-line data errors (the
preprocessor that encodes texts is tested in test_preprocessor.py)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from resic_tf.data import (DataError, LabelledTexts, encode_labels, load_labelled_texts,
                           sorted_labels, split_train_val)
from resic_tf.vocabulary import CharVocabulary, char_lengths, text_lengths

TEXTS = ["정말 재밌어요", "hello 😀 world", "", "mixed 한글 and emoji 👍🏽!", "쉼표, 그리고 \"따옴표\""]
LEVEL = [2, 10, 2, 1, 10]  # integer labels
HATE = ["none", "hate", "offensive", "none", "hate"]


def write_all_formats(tmp_path):
    """The same table as CSV, TSV, JSON Lines and Parquet (integers stay integers where typed)."""
    frame = pd.DataFrame({"text": TEXTS, "level": LEVEL, "hate": HATE})
    paths = {fmt: tmp_path / f"table.{fmt}" for fmt in ("csv", "tsv", "jsonl", "parquet")}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], index=False, sep="\t", quoting=csv.QUOTE_NONE)
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                      for r in frame.to_dict("records")), encoding="utf-8")
    frame.to_parquet(paths["parquet"], index=False)
    return paths


def test_all_formats_read_the_same(tmp_path):
    paths = write_all_formats(tmp_path)
    assert '"쉼표, 그리고 ""따옴표"""' in paths["csv"].read_text(encoding="utf-8")  # quoted CSV
    loaded = {fmt: load_labelled_texts(p, "text", ["level", "hate"]) for fmt, p in paths.items()}
    for fmt, data in loaded.items():
        assert data.texts == TEXTS, fmt  # empty text allowed, kept as ""
        assert data.labels == {"level": ["2", "10", "2", "1", "10"], "hate": HATE}, fmt
        assert data.source == str(paths[fmt])
        assert len(data) == 5


def test_integer_labels_sort_numerically():
    assert sorted_labels(["2", "10", "1", "2"]) == ["1", "2", "10"]
    assert sorted_labels(["-1", "0", "-10"]) == ["-10", "-1", "0"]
    # Any non-integer: plain text order.
    assert sorted_labels(["b", "a", "10", "2"]) == ["10", "2", "a", "b"]
    assert sorted_labels(["none", "hate", "offensive"]) == ["hate", "none", "offensive"]


def test_encode_labels_uses_sorted_class_ids(tmp_path):
    data = load_labelled_texts(write_all_formats(tmp_path)["tsv"], "text", ["level", "hate"])
    tasks = {col: sorted_labels(data.labels[col]) for col in ("level", "hate")}
    assert tasks == {"level": ["1", "2", "10"], "hate": ["hate", "none", "offensive"]}
    ids = encode_labels(data, tasks)
    np.testing.assert_array_equal(ids["level"], [1, 2, 1, 0, 2])
    np.testing.assert_array_equal(ids["hate"], [1, 0, 2, 1, 0])


def test_jsonl_skips_blank_lines_and_missing_text_is_empty(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "y": 1}\n\n{"y": 0}\n{"text": null, "y": 1}\n', encoding="utf-8")
    data = load_labelled_texts(path, "text", "y")
    assert data.texts == ["a", "", ""]
    assert data.labels == {"y": ["1", "0", "1"]}


def test_split_train_val_is_stratified_disjoint_and_seeded():
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 1  # "c" cannot spare a row for validation
    data = LabelledTexts([f"t{i}" for i in range(31)], {"y": labels})
    train, val = split_train_val(data, 0.2, seed=3)
    assert sorted(train.texts + val.texts) == sorted(data.texts)
    assert not set(train.texts) & set(val.texts)
    assert sorted(val.labels["y"]) == ["a"] * 4 + ["b"] * 2  # 20% of each class
    assert split_train_val(data, 0.2, seed=3)[1].texts == val.texts
    assert split_train_val(data, 0.2, seed=4)[1].texts != val.texts
    with pytest.raises(ValueError, match=r"^`val_split` must be in \(0, 1\). Received: "
                                         r"val_split=1.0$"):
        split_train_val(data, 1.0, seed=3)


# ---------------------------------------------------------------------------------------------
# Vocabulary and character lengths
# ---------------------------------------------------------------------------------------------

def test_vocabulary_build_orders_by_frequency_then_code_point():
    # counts: b 2, a 1, 한 1, 😀 1 -> b first; ties by code point a (U+61) < 한 (U+D55C) < 😀
    assert CharVocabulary.build(["ab", "b", "한😀"]).chars == ["b", "a", "한", "😀"]
    assert CharVocabulary.build(["ab", "b", "한😀"], min_freq=2).chars == ["b"]
    vocab = CharVocabulary.build(["ab", "b", "한😀"], max_size=4)  # 2 ids are pad + OOV
    assert vocab.chars == ["b", "a"] and vocab.size == 4
    with pytest.raises(ValueError, match="`min_freq` must be >= 1. Received: min_freq=0"):
        CharVocabulary.build(["a"], min_freq=0)


@pytest.mark.parametrize("chars, match", [
    (["a", "bc"], r"single characters. Received: \['bc'\]"),
    (["a", ""], r"single characters. Received: \[''\]"),
    (["a", "a"], "distinct"),
])
def test_vocabulary_rejects_bad_entries(chars, match):
    with pytest.raises(ValueError, match=match):
        CharVocabulary(chars)


def test_vocabulary_save_load_keeps_control_characters(tmp_path):
    vocab = CharVocabulary(["\n", "\t", " ", "한", "😀", '"'])
    vocab.save(tmp_path / "vocab.json")
    assert CharVocabulary.load(tmp_path / "vocab.json").chars == vocab.chars
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))["chars"][3] == "한"


def test_text_lengths_equal_python_len():
    texts = ["정말 재밌어요", "😀👍🏽", "", "a\u0301", "👨‍👩‍👧", "mixed 한글 and emoji 🎉", "x" * 300]
    np.testing.assert_array_equal(text_lengths(texts), [len(t) for t in texts])
    np.testing.assert_array_equal(text_lengths(texts, batch_size=2), [len(t) for t in texts])
    assert text_lengths([]).shape == (0,)
    # the in-graph length the preprocessor and the served model use
    lengths = char_lengths(tf.constant(texts))
    assert lengths.dtype == tf.int32
    np.testing.assert_array_equal(lengths, [len(t) for t in texts])
    # invalid UTF-8 bytes count as one U+FFFD each
    np.testing.assert_array_equal(char_lengths(tf.constant([b"a\xffb", b"\xff\xfe"])), [3, 2])


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming file, row and column
# ---------------------------------------------------------------------------------------------

def data_error(path, text_col="text", label_cols=("hate",)) -> DataError:
    with pytest.raises(DataError) as info:
        load_labelled_texts(path, text_col, list(label_cols))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return info.value


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_missing_column(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    err = data_error(path, label_cols=("hate", "bias"))
    assert err.column == "bias"
    assert f"{path}, column 'bias': missing column(s) ['bias']; the file has columns " \
           "['text', 'level', 'hate']" == str(err)


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", b"", "the file is empty"),
    ("blank.csv", b"\n \n", "the file is empty"),
    ("empty.jsonl", b"", "the file is empty"),
    ("header.tsv", b"text\thate\n", "the file has a header but no data rows"),
    ("header.csv", b"text,hate\n", "the file has a header but no data rows"),
])
def test_empty_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert str(data_error(path)) == f"{path}: {message}"


def test_empty_parquet(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str), "hate": pd.Series([], dtype=str)}) \
        .to_parquet(path)
    assert str(data_error(path)) == f"{path}: the file has a header but no data rows"


def test_missing_file_and_unknown_type(tmp_path):
    assert str(data_error(tmp_path / "nope.tsv")) == f"{tmp_path / 'nope.tsv'}: file not found"
    path = tmp_path / "table.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"table.xlsx: unknown file type '.xlsx'; use one of"):
        load_labelled_texts(path, "text", ["y"])


@pytest.mark.parametrize("fmt, sep", [("tsv", "\t"), ("csv", ",")])
@pytest.mark.parametrize("column", ["text", "hate"])
def test_non_utf8_names_row_and_column(tmp_path, fmt, sep, column):
    rows = [["first row", "none"], ["second, quoted" if fmt == "csv" else "second", "hate"],
            ["third", "none"]]
    cell = 0 if column == "text" else 1
    lines = [sep.join(["text", "hate"]).encode()]
    for i, row in enumerate(rows, start=1):
        cells = [(f'"{c}"' if "," in c else c).encode() for c in row]
        if i == 3:
            cells[cell] = cells[cell][:2] + b"\xff" + cells[cell][2:]  # Latin-1 byte in row 3
        lines.append(sep.encode().join(cells))
    path = tmp_path / f"latin.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    err = data_error(path)
    assert (err.row, err.column, err.line) == (3, column, 4)
    assert str(err).startswith(
        f"{path}, row 3 (line 4), column '{column}': invalid UTF-8 byte 0xff")


def test_non_utf8_in_csv_after_multiline_quoted_text(tmp_path):
    # Row 2's text spans two lines, so row 3 starts on line 5; the quoted comma is no separator.
    path = tmp_path / "multi.csv"
    path.write_bytes(b'text,hate\none,none\n"two,\nlines",hate\n"th,ree",n\xe9ne\n')
    err = data_error(path)
    assert (err.row, err.column, err.line) == (3, "hate", 5)


def test_non_utf8_in_jsonl_names_row(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "a", "hate": "none"}\n\n{"text": "b", "hate": "none"}\n'
                     b'{"text": "c\xff", "hate": "none"}\n')
    err = data_error(path)
    assert (err.row, err.line) == (3, 4)
    assert str(err).startswith(f"{path}, row 3 (line 4): invalid UTF-8 byte 0xff")


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_missing_label_names_row_and_column(tmp_path, fmt):
    frame = pd.DataFrame({"text": ["a", "", "c"], "hate": ["none", "hate", None]})
    path = tmp_path / f"missing.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")),
                        encoding="utf-8")
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False, sep="," if fmt == "csv" else "\t")
    err = data_error(path)
    line = {"csv": " (line 4)", "tsv": " (line 4)", "jsonl": " (line 3)"}.get(fmt, "")
    assert str(err) == f"{path}, row 3{line}, column 'hate': missing label"


def test_whitespace_label_is_missing(tmp_path):
    path = tmp_path / "blank.tsv"
    path.write_text("text\thate\na\t  \n", encoding="utf-8")
    assert str(data_error(path)) == f"{path}, row 1 (line 2), column 'hate': missing label"


def test_non_string_text_in_jsonl(tmp_path):
    path = tmp_path / "num.jsonl"
    path.write_text('{"text": "a", "hate": "x"}\n{"text": 5, "hate": "x"}\n', encoding="utf-8")
    assert str(data_error(path)) == \
        f"{path}, row 2 (line 2), column 'text': text must be a string, got int 5"


def test_unpaired_surrogate_escape_in_jsonl(tmp_path):
    # Valid JSON and valid UTF-8 bytes, but "\ud800" decodes to text no encoder accepts.
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "ok", "hate": "x"}\n{"text": "bad \\ud800 x", "hate": "x"}\n',
                    encoding="utf-8")
    assert str(data_error(path)) == (f"{path}, row 2 (line 2), column 'text': invalid Unicode: "
                                     "unpaired surrogate '\\ud800' at character 5")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "hate": "x"}\n{"text": "b", \n', encoding="utf-8")
    assert str(data_error(path)).startswith(f"{path}, row 2 (line 2): invalid JSON")


def test_label_unseen_in_training(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("text\thate\na\tnone\nb\tspam\n", encoding="utf-8")
    data = load_labelled_texts(path, "text", ["hate"])
    with pytest.raises(DataError) as info:
        encode_labels(data, {"hate": ["hate", "none", "offensive"]})
    assert str(info.value) == (f"{path}, row 2 (line 3), column 'hate': label 'spam' was not seen "
                               "in training; known labels are ['hate', 'none', 'offensive']")
    with pytest.raises(DataError, match=r"column 'bias': no label column for task 'bias'"):
        encode_labels(data, {"bias": ["a", "b"]})


def test_line_numbers_follow_blank_lines_and_multiline_fields(tmp_path):
    # line 1 header, line 2 blank, lines 3-4 one quoted record (row 1), line 5 row 2 with no
    # label, line 6 blank, line 7 row 3.
    path = tmp_path / "lines.csv"
    path.write_text('text,label\n\n"multi\nline",a\nok,\n\nx,b\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_labelled_texts(path, "text", ["label"])
    assert str(e.value) == f"{path}, row 2 (line 5), column 'label': missing label"


def test_rows_must_have_the_headers_field_count(tmp_path):
    # A trailing tab on every row adds only empty fields: accepted, columns do not shift.
    ok = tmp_path / "trailing.tsv"
    ok.write_text("text\ty\tz\nhello\tpos\tneg\t\nbye\tneg\tpos\t\n", encoding="utf-8")
    rows = load_labelled_texts(ok, "text", ["y", "z"])
    assert rows.texts == ["hello", "bye"] and rows.labels == {"y": ["pos", "neg"],
                                                              "z": ["neg", "pos"]}
    bad = tmp_path / "extra.tsv"
    bad.write_text("text\ty\nhello\tpos\nbye\tneg\tsurprise\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_labelled_texts(bad, "text", ["y"])
    assert str(e.value) == f"{bad}, row 2 (line 3): expected 2 fields (as the header), got 3"
    short = tmp_path / "short.csv"
    short.write_text("text,y\nhello,pos\nbye\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): expected 2 fields"):
        load_labelled_texts(short, "text", ["y"])


def test_duplicate_header_and_bom_only_files(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("text,y,y\nhello,a,b\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_labelled_texts(dup, "text", ["y"])
    assert str(e.value) == f"{dup}, line 1, column 'y': duplicate column name in the header"
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError) as e:
        load_labelled_texts(bom, "text", ["y"])
    assert str(e.value) == f"{bom}: the file is empty"


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "sep.jsonl"
    texts = ["a\u2028b", "c\x85d\x0be"]
    path.write_text("\n".join(json.dumps({"text": t, "y": "p"}, ensure_ascii=False)
                              for t in texts) + "\n", encoding="utf-8")
    assert load_labelled_texts(path, "text", ["y"]).texts == texts


def test_list_labels_are_refused(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a", "y": "p"}\n{"text": "b", "y": ["p", "q"]}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_labelled_texts(path, "text", ["y"])
    assert str(e.value).startswith(f"{path}, row 2 (line 2), column 'y': a label must be one string")
