"""Markdown tables and number formatting for every table the package writes (one writer)."""
from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(value: float | None, pct: bool = False, digits: int = 4) -> str:
    """A score as text: 4 decimals, or a percentage with one; "n/a" for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are converted with `str`."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
