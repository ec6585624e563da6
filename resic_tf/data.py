"""Reading labelled text tables (CSV, TSV, JSON Lines, Parquet) in chunks, with precise errors.

Every user mistake raises `DataError` naming the file, the row and the column, in one line.
Rows are numbered from 1 over data rows (the header is not a row); for text files the line
number is given too. The reader streams: `iter_labelled_chunks` holds one chunk of rows at a
time, so files larger than memory can be scanned; `load_labelled_texts` joins the chunks.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from resic_tf.validation import UserError, check_scalar

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_CHUNK_ROWS = 65536
# Python's csv module refuses fields over 128 KiB by default; a 1 MB review is still a text.
_FIELD_LIMIT = 1 << 30
_INTEGRAL = re.compile(r"[+-]?\d+\.0*")


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
    """Texts with their labels (as strings) for each task, in file order; `first_row` is the
    file row of the first text (a chunk of a larger file starts later)."""

    texts: list[str]
    labels: dict[str, list[str]]
    source: str = "<memory>"
    first_row: int = 1

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


class _Lines:
    """The decoded lines of a text file (split at "\\n" only, terminators kept), with the line
    number and the lines of the record being read, so a bad byte names its row and column."""

    def __init__(self, path: Path, f, sep: str | None, plain: bool = False):
        self.path, self.f, self.sep, self.plain = path, f, sep, plain
        self.line = 0       # lines read so far
        self.rows = 0       # data rows finished so far
        self.pending = []   # lines of the record being read
        self.offset = 0     # bytes read before the current line
        self.header: list[str] | None = None

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            self.line += 1
            if self.line == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise DataError(self.path, "the file is UTF-16 (it starts with a UTF-16 byte "
                                    "order mark); save it as UTF-8")
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw, self.offset = raw[3:], 3
            if self.line == 1 and b"\x00" in raw:
                raise DataError(self.path, "the file looks like UTF-16 (NUL bytes in line 1); "
                                "save it as UTF-8", line=1)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad_byte(raw, e.start, f"invalid UTF-8 byte 0x{raw[e.start]:02x}",
                               "save the file as UTF-8")
            if "\x00" in text:
                self._bad_byte(raw, raw.index(b"\x00"), "NUL byte (0x00)",
                               "a text file holds none; remove it")
            self.offset += len(raw)
            self.pending.append(text)
            yield text

    def _bad_byte(self, raw: bytes, bad: int, what: str, fix: str):
        message = f"{what} at byte offset {self.offset + bad}; {fix}"
        column = None
        if self.sep is not None and self.header is not None:
            # The record holding the bad byte, up to it, with a sentinel so it parses as partial.
            prefix = "".join(self.pending) + raw[:bad].decode("utf-8") + "\ue000"
            fields = next(csv.reader([prefix], delimiter=self.sep, quoting=_quoting(self.sep)), [])
            field = max(len(fields) - 1, 0)
            column = self.header[field] if field < len(self.header) else f"#{field + 1}"
        row = None if self.plain or (self.header is None and self.sep is not None) \
            else self.rows + 1
        raise DataError(self.path, message, row=row, column=column, line=self.line)


def iter_text_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file of one text per line (split at "\\n" only: a text may hold
    U+2028 and other characters that `str.splitlines()` splits at; the "\\r" of CRLF and a
    leading BOM dropped), read one at a time. Bad bytes, NUL bytes and UTF-16 name their line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    n = 0
    with open(path, "rb") as f:
        lines = _Lines(path, f, None, plain=True)
        for text in lines:
            lines.pending = []
            n += 1
            yield text[:-1].rstrip("\r") if text.endswith("\n") else text.rstrip("\r")
    if n == 0:
        raise DataError(path, "the file is empty")


def _quoting(sep: str) -> int:
    return csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE


@contextmanager
def _field_limit():
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, _FIELD_LIMIT))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _delimited_rows(path: Path, fmt: str, wanted: Sequence[str]):
    """(line, [values of `wanted`]) of every data row of a CSV or TSV file."""
    sep = "," if fmt == "csv" else "\t"
    with open(path, "rb") as f, _field_limit():
        lines = _Lines(path, f, sep)
        reader = csv.reader(lines, delimiter=sep, quoting=_quoting(sep))
        try:
            for record in reader:
                start = lines.line - len(lines.pending) + 1
                lines.pending = []
                if not record or record == [""]:
                    continue  # blank line
                if lines.header is None:
                    if not any(name.strip() for name in record):
                        continue  # blank lines before the header
                    header = lines.header = record
                    seen = set()
                    for name in header:
                        if name in seen:
                            raise DataError(path, "duplicate column name in the header",
                                            column=name, line=start)
                        seen.add(name)
                    _check_columns(path, wanted, header)
                    index = [header.index(c) for c in wanted]
                    n = len(header)
                    continue
                lines.rows += 1
                if len(record) != n:
                    if len(record) > n and not any(v.strip() for v in record[n:]):
                        record = record[:n]  # trailing separators: nothing is lost
                    else:
                        raise DataError(path, f"expected {n} fields (as the header), got "
                                        f"{len(record)}", row=lines.rows, line=start)
                yield start, [record[i] for i in index]
        except csv.Error as e:
            raise DataError(path, f"cannot parse: {e}", row=lines.rows + 1 if lines.header
                            else None, line=lines.line) from None
    if lines.header is None:
        raise DataError(path, "the file is empty")


def _jsonl_rows(path: Path, wanted: Sequence[str]):
    """(line, [values of `wanted`]) of every JSON object line; a key missing on a line is None."""
    with open(path, "rb") as f:
        lines = _Lines(path, f, None)
        rows, checked = 0, False
        for text in lines:
            lines.pending = []
            line = text.rstrip("\r\n")
            if not line.strip():
                continue
            rows += 1
            lines.rows = rows
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg}, character {e.colno})",
                                row=rows, line=lines.line) from None
            if not isinstance(rec, dict):
                raise DataError(path, "each line must be a JSON object", row=rows,
                                line=lines.line)
            if not checked:  # the first object's keys stand for the file's columns
                _check_columns(path, wanted, list(rec))
                checked = True
            for key in wanted:
                value = rec.get(key)
                if isinstance(value, str):
                    try:  # a "\ud800" escape decodes to a string that no UTF-8 encoder accepts
                        value.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise DataError(path, f"invalid Unicode: unpaired surrogate "
                                        f"{value[e.start]!r} at character {e.start + 1}",
                                        row=rows, column=str(key), line=lines.line) from None
            yield lines.line, [rec.get(key) for key in wanted]
    if lines.line == 0 or not checked and not rows:
        raise DataError(path, "the file is empty")


def _parquet_rows(path: Path, wanted: Sequence[str], chunk_rows: int):
    """(None, [values of `wanted`]) of every row of a Parquet file, read a record batch at a time."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(path, f"cannot read Parquet: {e}") from None
    _check_columns(path, wanted, names)
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=list(wanted)):
            columns = [batch.column(c).to_pylist() for c in wanted]
            yield from ((None, list(values)) for values in zip(*columns))
    except Exception as e:  # noqa: BLE001 - a corrupt page: ArrowInvalid, OSError, ...
        raise DataError(path, f"cannot read Parquet: {e}") from None


def _check_columns(path, wanted: Sequence[str], names: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; the file has columns "
                        f"{[str(c) for c in names]}", column=missing[0])


def _as_label(value) -> str | None:
    """Labels are kept as strings; integral numbers lose a trailing '.0' (so `1` and `1.0` are
    one class, whether the reader gave a number or the text "1.0")."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    if "." in text and _INTEGRAL.fullmatch(text):
        return str(int(float(text)))
    return text or None


def _rows(path: Path, fmt: str, wanted: Sequence[str], chunk_rows: int):
    if fmt in ("csv", "tsv"):
        return _delimited_rows(path, fmt, wanted)
    if fmt == "jsonl":
        return _jsonl_rows(path, wanted)
    return _parquet_rows(path, wanted, chunk_rows)


def iter_labelled_chunks(path: str | os.PathLike, text_col: str, label_cols: Sequence[str],
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[LabelledTexts]:
    """Read `path` a chunk of at most `chunk_rows` rows at a time, validating every cell.

    Empty or missing texts become "" (allowed); a missing label is an error. Only one chunk is
    held in memory, so a file of any size can be scanned (training, prediction, evaluation).
    """
    if isinstance(label_cols, str):
        label_cols = [label_cols]
    label_cols = list(label_cols)
    check_scalar(chunk_rows, "chunk_rows", int, min_val=1)
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    fmt = file_format(path)
    texts, labels, first, row = [], [[] for _ in label_cols], 1, 0
    for line, values in _rows(path, fmt, [text_col, *label_cols], chunk_rows):
        row += 1
        text = values[0]
        if not isinstance(text, str):
            if text is None or (isinstance(text, float) and np.isnan(text)):
                text = ""
            else:
                raise DataError(path, f"text must be a string, got {type(text).__name__} "
                                f"{text!r}", row=row, column=text_col, line=line)
        texts.append(text)
        for col, out, value in zip(label_cols, labels, values[1:]):
            if isinstance(value, (list, dict, tuple, np.ndarray)):
                raise DataError(path, f"a label must be one string or number, got "
                                f"{type(value).__name__} {value!r}", row=row, column=col,
                                line=line)
            label = _as_label(value)
            if label is None:
                raise DataError(path, "missing label", row=row, column=col, line=line)
            out.append(label)
        if len(texts) == chunk_rows:
            yield LabelledTexts(texts, dict(zip(label_cols, labels)), str(path), first)
            texts, labels, first = [], [[] for _ in label_cols], row + 1
    if row == 0:
        raise DataError(path, "the file has a header but no data rows")
    if texts:
        yield LabelledTexts(texts, dict(zip(label_cols, labels)), str(path), first)


def load_labelled_texts(path: str | os.PathLike, text_col: str,
                        label_cols: Sequence[str], progress: bool | str = False) -> LabelledTexts:
    """Read all of `path` (see `iter_labelled_chunks`) and return its texts and labels;
    `progress` reports the rows read (`resic_tf.progress`)."""
    from resic_tf.progress import Progress
    if isinstance(label_cols, str):
        label_cols = [label_cols]
    texts, labels = [], {c: [] for c in label_cols}
    with Progress(f"reading {path}", enabled=progress) as bar:
        for chunk in iter_labelled_chunks(path, text_col, label_cols):
            texts += chunk.texts
            for c in label_cols:
                labels[c] += chunk.labels[c]
            bar.update(len(chunk))
    return LabelledTexts(texts, labels, str(path))


def _line_of(path, row: int) -> int | None:
    """The line where data row `row` (1-based) of a CSV or TSV file starts; error path only."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS or file_format(path) not in ("csv", "tsv"):
        return None
    for i, (line, _) in enumerate(_delimited_rows(path, file_format(path), []), start=1):
        if i == row:
            return line
    return None


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
    for task, classes in tasks.items():
        if task not in data.labels:
            raise DataError(data.source, f"no label column for task {task!r}; the model was "
                            f"trained on tasks {list(tasks)}", column=task)
        index = {c: i for i, c in enumerate(classes)}
        ids = np.empty(len(data), dtype=np.int64)
        for i, label in enumerate(data.labels[task]):
            if label not in index:
                raise DataError(data.source, f"label {label!r} was not seen in training; known "
                                f"labels are {list(classes)}", row=data.first_row + i, column=task,
                                line=_line_of(data.source, data.first_row + i))
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
        raise DataError(data.source, f"val_split={val_split} of {n} rows leaves an empty train "
                        "or validation set")
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return data.subset(train_idx), data.subset(val_idx)
