"""Matplotlib figures on the Agg canvas (no pyplot: no GUI and no global backend switch)."""
from __future__ import annotations

import io
from pathlib import Path

from resic_tf.io import atomic_path


def new_figure(width: float, height: float):
    """A constrained-layout figure of `width` x `height` inches at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig, path: Path) -> Path:
    """Write the figure as PNG atomically; returns `path`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
