"""Per-exit evaluation tables (the paper's Tables 1, 4 and 5): every exit, the best single exit
(`max`, an oracle on the data scored) and the length gate, as a DataFrame, CSV and Markdown."""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from resic_tf.config import ResICConfig, exit_label
from resic_tf.gate import LengthGate, gated_predictions
from resic_tf.io import atomic_write_text
from resic_tf.markdown import fmt, markdown_table
from resic_tf.metrics import accuracy, best_index, macro_f1
from resic_tf.run import TENSORBOARD_DIR, Run, predict_file
from resic_tf.tensorboard import evaluation_dir, write_text


def exit_scores(config: ResICConfig, probs: Mapping[str, np.ndarray],
                labels: Mapping[str, np.ndarray], lengths=None,
                gate: LengthGate | None = None) -> pd.DataFrame:
    """One row per task and row name (`ic1`..`icN`, `lc`, `max`, and `gate` when a gate is given),
    columns task, exit, accuracy, macro_f1. `max` is the best single exit on this data by
    macro-F1 (ties to the shallower), named in column `best_exit`."""
    rows = []
    for task, classes in config.tasks.items():
        y = np.asarray(labels[task]).reshape(-1)
        pred = np.asarray(probs[task]).argmax(-1)
        task_rows = []
        for e in range(config.num_exits):
            name = exit_label(e, config.num_exits)
            task_rows.append({"task": task, "exit": name, "accuracy": accuracy(y, pred[:, e]),
                              "macro_f1": macro_f1(y, pred[:, e], len(classes)), "best_exit": ""})
        best = best_index([r["macro_f1"] for r in task_rows])
        task_rows.append({**task_rows[best], "exit": "max", "best_exit": task_rows[best]["exit"]})
        if gate is not None:
            gp, _ = gated_predictions(gate, task, probs[task], lengths)
            gp = gp.argmax(-1)
            task_rows.append({"task": task, "exit": "gate", "accuracy": accuracy(y, gp),
                              "macro_f1": macro_f1(y, gp, len(classes)), "best_exit": ""})
        rows += task_rows
    return pd.DataFrame(rows, columns=["task", "exit", "accuracy", "macro_f1", "best_exit"])


def scores_markdown(table: pd.DataFrame) -> str:
    """Markdown: one section per task, rows = exits, columns accuracy and macro-F1."""
    out = []
    for task, t in table.groupby("task", sort=False):
        rows = [[f"max ({r.best_exit})" if r.exit == "max" else r.exit, fmt(r.accuracy),
                 fmt(r.macro_f1)] for r in t.itertuples()]
        out += [f"### {task}", "", markdown_table(["exit", "accuracy", "macro-F1"], rows), ""]
    return "\n".join(out)


def evaluate_run(run: Run, data: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 batch_size: int = 256) -> pd.DataFrame:
    """Score every exit, `max` and (if the run has a gate) the gate on `data`; write
    `evaluation.csv` and `evaluation.md` into `out_dir` (default: `RUN_DIR/eval_<data stem>`)."""
    p = predict_file(run, data, batch_size)
    if run.gate is not None:
        run.gate.check(run.config)
    table = exit_scores(run.config, p.probs, p.labels, p.lengths, run.gate)
    out = Path(out_dir) if out_dir else run.file(f"eval_{Path(data).stem}")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")
    atomic_write_text(out / "evaluation.csv", buf.getvalue())
    header = (f"# Evaluation of {run.path} on {data} ({len(p.rows)} rows)\n\n"
              + ("" if run.gate else "No gate.json: run `resic calibrate` for the gated row.\n\n"))
    markdown = scores_markdown(table)
    atomic_write_text(out / "evaluation.md", header + markdown)
    if run.path is not None:
        name = Path(data).stem
        write_text(run.file(TENSORBOARD_DIR) / evaluation_dir(name),
                   {f"evaluation/{name}": header + markdown})
        run.record_scores({f"{name}/{r.task}_{r.exit}_{m}": getattr(r, m)
                           for r in table.itertuples() if r.exit in ("lc", "gate")
                           for m in ("accuracy", "macro_f1")})
    return table
