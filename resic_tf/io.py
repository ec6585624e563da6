"""Atomic file writes: a crash never leaves a half-written checkpoint, table or export."""
from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from resic_tf.validation import InvalidValueError

# Why a write fails that the user fixes: no permission, a read-only file system, a full disk or
# quota. Reported in one line (`resic_tf.cli`), never as a traceback.
WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


class CannotWriteError(OSError):
    """Writing `filename` (the file or directory being replaced, not its temporary twin) failed
    with one of `WRITE_ERRNOS`; what was there before is unchanged."""


@contextmanager
def _reported_as(path: Path) -> Iterator[None]:
    """Re-raise a write failure of `WRITE_ERRNOS` as a `CannotWriteError` naming `path`."""
    try:
        yield
    except CannotWriteError as e:
        if e.filename == str(path):
            raise
        raise CannotWriteError(e.errno, e.strerror, str(path)) from e
    except Exception as e:  # noqa: BLE001 - only write failures are re-raised as such
        code = _write_errno(e)
        if code is None:
            raise
        raise CannotWriteError(code, os.strerror(code), str(path)) from e


def _write_errno(e: BaseException) -> int | None:
    """The `WRITE_ERRNOS` code of a failed write: an OSError's errno, or, for writers that raise
    their own types (TensorFlow's file system: `tf.errors.OpError`; h5py), the code whose
    message (`os.strerror`) their text carries."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno if e.errno in WRITE_ERRNOS else None
    text = str(e)
    return next((code for code in sorted(WRITE_ERRNOS) if os.strerror(code) in text), None)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failure for lack of permission or space raises `CannotWriteError` naming `path`."""
    path = Path(path)
    with _reported_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix,
                                   dir=path.parent)
        os.close(fd)
        # mkstemp makes 0600; readers such as TF Serving need more
        with _moved_into_place(Path(tmp), path, 0o666, os.replace, Path.unlink) as tmp:
            yield tmp


@contextmanager
def _moved_into_place(tmp: Path, path: Path, mode: int, move, remove) -> Iterator[Path]:
    """Yield `tmp` (given `mode` less the umask); `move` it onto `path` if the block succeeds,
    else `remove` it."""
    try:
        os.chmod(tmp, mode & ~_umask())
        yield tmp
        move(tmp, path)
    finally:
        if tmp.exists():
            remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) at once: readers see the old or the new file, whole."""
    with atomic_path(path) as tmp:
        _write(tmp, text.encode("utf-8"))


def _write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to the disk (so the rename after it is durable)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`, renamed onto `path` (which must not exist) at
    the end.

    The temporary name is hidden (`.NAME.tmp.PID@HOST.xxxxxxxx`: TF Serving loads only
    integer-named versions) and names this process: the temporary directories of this machine's
    processes that died (killed mid-write) are removed here first. A failure for lack of
    permission or space raises `CannotWriteError` naming `path`."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    with _reported_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.{os.getpid()}@{_host()}.",
                                    dir=path.parent))
        with _moved_into_place(tmp, path, 0o777, os.rename,
                               lambda p: shutil.rmtree(p, ignore_errors=True)) as tmp:
            yield tmp


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the `atomic_directory` temporaries in `directory` whose process, on this machine,
    is gone; returns them. Those of live processes (another export under way) and of other
    machines (a shared disk) are left alone."""
    stale = []
    for entry in Path(directory).glob(".*.tmp.*@*"):
        m = _TEMPORARY.match(entry.name)
        if m and m["host"] == _host() and entry.is_dir() and not _process_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry)
    return stale


_TEMPORARY = re.compile(r"^\..+\.tmp\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[^.]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie, killed but not yet reaped by its
    parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def json_safe(obj, digits: int | None = None):
    """`obj` with numpy numbers made Python ones and NaN made None (JSON has no NaN), floats
    rounded to `digits` when given; dicts and lists recursively, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, digits) for v in obj]
    if isinstance(obj, numbers.Integral) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        obj = float(obj)
        return None if math.isnan(obj) else (obj if digits is None else round(obj, digits))
    return obj


def read_json(path: str | os.PathLike):
    """A JSON file's content; a truncated or corrupt file raises one line naming it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                                f"{e.colno}); the file is truncated or corrupt") from None


def load_json_as(path: str | os.PathLike, from_dict, what: str, fix: str):
    """`from_dict(read_json(path))`; a file of the wrong shape raises one line naming it, what it
    should have been and the command that writes it (`fix`)."""
    d = read_json(path)
    try:
        return from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidValueError(f"{path}: not a {what} file ({type(e).__name__}: {e}); "
                                f"re-run {fix}") from None


class ParquetAppender:
    """Data frames appended to one Parquet file, a row group each, so a large result is written
    a chunk at a time (write to an `atomic_path`, so a crash leaves no half file)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.writer, self.rows = Path(path), None, 0

    def add(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        if len(frame) == 0:
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)
        self.rows += len(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
