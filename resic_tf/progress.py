"""Progress of long passes over rows: Keras's progress bar on a terminal, a plain line in logs.

Reading a large file, building the vocabulary, calibration, evaluation, analysis and prediction
each count their rows through one `Progress`, so a user watching a terminal sees a bar and a log
file gets a line every `every` seconds (and one at the end of a pass that printed any), never a
wall of carriage returns; a short pass prints nothing.
"""
from __future__ import annotations

import sys
import time

import keras


class Progress:
    """Counts rows of one pass (`what`, e.g. "reading train.tsv") and reports them.

    Args:
        what: what the pass does, the start of every line.
        total: rows expected, when known (a bar with an end); None shows a count.
        every: seconds between plain lines when the output is not a terminal.
        enabled: False reports nothing (tests, library calls); "lines" only plain lines, never a
            bar (`--quiet`).
        stream: where plain lines go (default stderr, so piped predictions stay clean).
    """

    def __init__(self, what: str, total: int | None = None, every: float = 30.0,
                 enabled: bool | str = True, stream=None):
        self.what, self.total, self.every, self.enabled = what, total, every, bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._lines = 0
        self._start = self._last = time.perf_counter()
        # Keras's bar writes to stdout: draw it only where stdout is a terminal.
        tty = enabled is True and stream is None and sys.stdout.isatty()
        self._bar = keras.utils.Progbar(total, unit_name="rows") if tty else None
        if self._bar is not None:
            print(what, flush=True)

    def update(self, rows: int) -> None:
        """Count `rows` more rows done."""
        self.done += rows
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self.done)
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._line()

    def close(self) -> None:
        """The final line (plain output) or the bar's end (terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self.done, finalize=True)
        elif self._lines:  # a pass too short for a periodic line says nothing
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        self._lines += 1
        seconds = max(time.perf_counter() - self._start, 1e-9)
        of = f" of {self.total:,}" if self.total else ""
        state = "done" if final else "..."
        print(f"{self.what}: {self.done:,}{of} rows, {self.done / seconds:,.0f} rows/s, "
              f"{seconds:.0f} s {state}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
