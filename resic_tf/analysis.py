"""Per-exit evaluation tables (the paper's Tables 1, 4 and 5) and inspection reports."""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate, gated_predictions
from resic_tf.io import atomic_write_text
from resic_tf.metrics import accuracy, macro_f1


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
            name = f"ic{e + 1}" if e < config.num_ics else "lc"
            task_rows.append({"task": task, "exit": name, "accuracy": accuracy(y, pred[:, e]),
                              "macro_f1": macro_f1(y, pred[:, e], len(classes)), "best_exit": ""})
        best = int(np.argmax([r["macro_f1"] for r in task_rows]))
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
        out += [f"### {task}", "", "| exit | accuracy | macro-F1 |", "|---|---|---|"]
        for r in t.itertuples():
            label = f"max ({r.best_exit})" if r.exit == "max" else r.exit
            out.append(f"| {label} | {r.accuracy:.4f} | {r.macro_f1:.4f} |")
        out.append("")
    return "\n".join(out)


def evaluate_run(run_dir: str | os.PathLike, data: str | os.PathLike,
                 out_dir: str | os.PathLike | None = None, batch_size: int = 256) -> pd.DataFrame:
    """Score every exit, `max` and (if `gate.json` exists) the gate on `data`; write
    `evaluation.csv` and `evaluation.md` into `out_dir` (default: `RUN_DIR/eval_<data stem>`)."""
    from resic_tf.data import encode_labels, load_labelled_texts
    from resic_tf.training import load_run, predict_exits
    from resic_tf.vocabulary import text_lengths

    run = load_run(run_dir)
    tc = run.train_config
    rows = load_labelled_texts(data, tc.text_col, tc.label_cols)
    labels = encode_labels(rows, run.config.tasks)
    probs = predict_exits(run, rows.texts, batch_size)
    gate_path = Path(run_dir) / "gate.json"
    gate = LengthGate.load(gate_path) if gate_path.exists() else None
    table = exit_scores(run.config, probs, labels, text_lengths(rows.texts), gate)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval_{Path(data).stem}"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")
    atomic_write_text(out / "evaluation.csv", buf.getvalue())
    header = (f"# Evaluation of {run_dir} on {data} ({len(rows)} rows)\n\n"
              + ("" if gate else "No gate.json: run `resic calibrate` for the gated row.\n\n"))
    atomic_write_text(out / "evaluation.md", header + scores_markdown(table))
    return table
