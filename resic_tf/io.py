"""Atomic file writes: a crash never leaves a half-written checkpoint, table or export."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from resic_tf.validation import InvalidValueError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; readers such as TF Serving need more
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`, renamed onto `path` (which must not exist) at the end."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
