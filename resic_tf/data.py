"""Reading labelled text tables (CSV, TSV, JSON Lines, Parquet) with precise errors.

Every user mistake raises `DataError` naming the file, the row and the column, in one line.
Rows are numbered from 1 over data rows (the header is not a row); for text files the line
number is given too.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from resic_tf.validation import InvalidValueError, UserError, check_scalar

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}


class DataError(UserError, ValueError):
    """A problem in the user's data file, located by file, row and column."""

    def __init__(self, path, message: str, row: int | None = None, column: str | None = None,
                 line: int | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(": ".join([", ".join(where), message]))
        self.path, self.row, self.column, self.line = str(path), row, column, line


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with their labels (as strings) for each task, in file order."""

    texts: list[str]
    labels: dict[str, list[str]]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> "LabelledTexts":
        index = np.asarray(index, dtype=np.int64)
        return LabelledTexts([self.texts[i] for i in index],
                             {t: [v[i] for i in index] for t, v in self.labels.items()},
                             self.source)

    def to_frame(self, text_col: str = "text") -> pd.DataFrame:
        return pd.DataFrame({text_col: self.texts, **self.labels})


def file_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(path, f"unknown file type {suffix!r}; use one of {sorted(FORMATS)}")
    return FORMATS[suffix]


def _check_utf8(path: Path, raw: bytes, sep: str | None) -> None:
    try:
        raw.decode("utf-8")
        return
    except UnicodeDecodeError as e:
        bad = e.start
    line_no = raw.count(b"\n", 0, bad) + 1
    column = None
    row = sum(1 for line in raw[:bad].split(b"\n")[:-1] if line.strip()) + 1  # JSONL skips blanks
    if sep is not None:
        # Parse records, not lines: a quoted CSV field may hold the separator or a line break.
        # The sentinel makes the record holding the bad byte the last, partial one.
        quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
        prefix = raw[:bad].decode("utf-8").lstrip("\ufeff") + "\ue000"
        records = list(csv.reader(io.StringIO(prefix), delimiter=sep, quoting=quoting))
        row = sum(1 for r in records[1:] if r)  # pandas skips blank lines
        header = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff")
        names = next(csv.reader([header.rstrip("\r")], delimiter=sep, quoting=quoting), [])
        field = len(records[-1]) - 1
        column = names[field] if field < len(names) else f"#{field + 1}"
    raise DataError(path, f"invalid UTF-8 byte 0x{raw[bad]:02x} at byte offset {bad}; "
                    "save the file as UTF-8", row=row if row >= 1 else None, column=column,
                    line=line_no)


def _csv_records(text: str, fmt: str):
    """(starting line, fields) of every non-blank record, header first; quoted fields may span
    lines (CSV only: TSV is read without quoting)."""
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t",
                        quoting=quoting)
    end = 0
    for record in reader:
        start, end = end + 1, reader.line_num
        if record and record != [""]:
            yield start, record


def _read_delimited(path: Path, text: str, fmt: str) -> pd.DataFrame:
    records = _csv_records(text, fmt)
    try:
        _, header = next(records)
    except StopIteration:
        raise DataError(path, "the file is empty") from None
    except csv.Error as e:
        raise DataError(path, f"cannot parse the header: {e}", line=1) from None
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(path, "duplicate column name in the header", column=name, line=1)
        seen.add(name)
    rows, lines = [], []
    try:
        for line, record in records:
            if len(record) > len(header) and not any(f.strip() for f in record[len(header):]):
                record = record[:len(header)]  # trailing separators: nothing is lost
            if len(record) != len(header):
                raise DataError(path, f"expected {len(header)} fields (as the header), got "
                                f"{len(record)}", row=len(rows) + 1, line=line)
            rows.append(record)
            lines.append(line)
    except csv.Error as e:
        raise DataError(path, f"cannot parse: {e}", row=len(rows) + 1) from None
    df = pd.DataFrame(rows, columns=header, dtype=object)
    df.attrs["lines"] = lines
    return df


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table; text files are read as strings exactly as written (no NA guessing).

    CSV and TSV rows must have as many fields as the header (empty trailing fields are
    dropped); `df.attrs["lines"]` holds each row's starting line for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    fmt = file_format(path)
    if fmt in ("csv", "tsv", "jsonl"):
        raw = path.read_bytes()
        _check_utf8(path, raw, {"csv": ",", "tsv": "\t"}.get(fmt))
        text = raw.decode("utf-8").lstrip("\ufeff")
        if not text.strip():
            raise DataError(path, "the file is empty")
    if fmt in ("csv", "tsv"):
        df = _read_delimited(path, text, fmt)
    elif fmt == "jsonl":
        records = []
        # Split on "\n" only: JSON strings may hold U+2028 and other characters that
        # str.splitlines() also treats as line breaks.
        for line_no, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg}, character {e.colno})",
                                row=len(records) + 1, line=line_no) from None
            if not isinstance(rec, dict):
                raise DataError(path, "each line must be a JSON object", row=len(records) + 1,
                                line=line_no)
            for key, value in rec.items():
                if isinstance(value, str):
                    try:  # a "\ud800" escape decodes to a string that no UTF-8 encoder accepts
                        value.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise DataError(path, f"invalid Unicode: unpaired surrogate "
                                        f"{value[e.start]!r} at character {e.start + 1}",
                                        row=len(records) + 1, column=str(key),
                                        line=line_no) from None
            records.append(rec)
        df = pd.DataFrame.from_records(records)
    else:
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(path, f"cannot read Parquet: {e}") from None
    if len(df) == 0:
        raise DataError(path, "the file has a header but no data rows")
    return df


def _line_of(path, fmt: str, row: int) -> int | None:
    """The line where data row `row` (1-based) starts; only called on the error path."""
    if fmt not in ("csv", "tsv"):
        return None
    text = Path(path).read_text(encoding="utf-8-sig")
    for i, (line, _) in enumerate(_csv_records(text, fmt)):
        if i == row:
            return line
    return None


def _as_label(value) -> str | None:
    """Labels are kept as strings; integral numbers lose a trailing '.0' that NaN-aware readers add."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def load_labelled_texts(path: str | os.PathLike, text_col: str,
                        label_cols: Sequence[str]) -> LabelledTexts:
    """Read `path` and return its texts and labels, validating every cell.

    Empty or missing texts become "" (allowed); a missing label is an error.
    """
    if isinstance(label_cols, str):
        label_cols = [label_cols]
    df = read_table(path)
    row_lines = df.attrs.get("lines")
    line_of = lambda i: row_lines[i - 1] if row_lines else None  # noqa: E731
    wanted = [text_col, *label_cols]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; the file has columns "
                        f"{[str(c) for c in df.columns]}", column=missing[0])
    texts = []
    for i, value in enumerate(df[text_col].tolist(), start=1):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            value = ""
        elif not isinstance(value, str):
            raise DataError(path, f"text must be a string, got {type(value).__name__} {value!r}",
                            row=i, column=text_col, line=line_of(i))
        texts.append(value)
    labels = {}
    for col in label_cols:
        values = []
        for i, value in enumerate(df[col].tolist(), start=1):
            if isinstance(value, (list, dict, tuple, np.ndarray)):
                raise DataError(path, f"a label must be one string or number, got "
                                f"{type(value).__name__} {value!r}", row=i, column=col,
                                line=line_of(i))
            label = _as_label(value)
            if label is None:
                raise DataError(path, "missing label", row=i, column=col, line=line_of(i))
            values.append(label)
        labels[col] = values
    return LabelledTexts(texts, labels, str(path))


def sorted_labels(values: Sequence[str]) -> list[str]:
    """The label vocabulary: distinct labels sorted numerically if all are integers, else as text."""
    distinct = set(values)
    try:
        return sorted(distinct, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(distinct)


def encode_labels(data: LabelledTexts, tasks: dict[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Map each task's labels to class ids; a label unseen in training names its row and column."""
    out = {}
    fmt = file_format(data.source) if data.source != "<memory>" else "memory"
    for task, classes in tasks.items():
        if task not in data.labels:
            raise DataError(data.source, f"no label column for task {task!r}; the model was "
                            f"trained on tasks {list(tasks)}", column=task)
        index = {c: i for i, c in enumerate(classes)}
        ids = np.empty(len(data), dtype=np.int64)
        for i, label in enumerate(data.labels[task]):
            if label not in index:
                raise DataError(data.source, f"label {label!r} was not seen in training; known "
                                f"labels are {list(classes)}", row=i + 1, column=task,
                                line=_line_of(data.source, fmt, i + 1))
            ids[i] = index[label]
        out[task] = ids
    return out


def split_train_val(data: LabelledTexts, val_split: float, seed: int,
                    stratify_task: str | None = None) -> tuple[LabelledTexts, LabelledTexts]:
    """Random (stratified by the first task's label, when every class can spare a row) split."""
    check_scalar(val_split, "val_split", float, min_val=0, max_val=1, include_boundaries="neither")
    n = len(data)
    rng = np.random.default_rng(seed)
    if stratify_task is None:
        stratify_task = next(iter(data.labels))
    labels = np.asarray(data.labels[stratify_task])
    val_idx = []
    for cls in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == cls)
        rng.shuffle(rows)
        k = int(round(len(rows) * val_split))
        if len(rows) >= 2:
            val_idx.extend(rows[:max(k, 1)].tolist())
    val_idx = np.sort(np.asarray(val_idx, dtype=np.int64))
    if len(val_idx) == 0 or len(val_idx) == n:
        raise InvalidValueError(f"val_split={val_split} of {n} rows leaves an empty train or "
                                "validation set")
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return data.subset(train_idx), data.subset(val_idx)
