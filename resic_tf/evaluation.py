"""Per-exit evaluation tables (the paper's Tables 1, 4 and 5): every exit, the best single exit
(`max`, an oracle on the data scored) and the length gate, as a DataFrame, CSV and Markdown;
and every calibrated early-exit policy's score and cost."""
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
from resic_tf.flops import full_flops, policy_flops
from resic_tf.metrics import best_index, confusion_matrix, macro_f1_from_cm
from resic_tf.policies import ExitPolicy, apply_policy
from resic_tf.run import TENSORBOARD_DIR, Run, predict_file
from resic_tf.tensorboard import evaluation_dir, write_text


class ScoreTally:
    """What the evaluation tables need of labelled rows, added a chunk at a time: a confusion
    matrix per task and exit (and the gate, and each policy), and each policy's cost sums. A file
    of any size is scored in the memory of one chunk's probabilities.

    `exit_table()` is `exit_scores`' table and `policy_table()` is `policy_scores`'.
    """

    def __init__(self, config: ResICConfig, gate: LengthGate | None = None,
                 policies: Mapping[str, ExitPolicy] | None = None):
        self.config, self.gate, self.policies = config, gate, dict(policies or {})
        k = {t: len(c) for t, c in config.tasks.items()}
        self.exit_cm = {t: np.zeros((config.num_exits, k[t], k[t]), np.int64) for t in k}
        self.gate_cm = {t: np.zeros((k[t], k[t]), np.int64) for t in k}
        self.policy_cm = {(p, t): np.zeros((k[t], k[t]), np.int64) for p in self.policies
                          for t in k}
        self.sums = {p: {"rows": 0, "blocks": 0.0, "flops": 0.0, "full": 0.0,
                         "exits": dict.fromkeys(k, 0.0)} for p in self.policies}

    def add(self, probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
            lengths=None) -> None:
        """Count one chunk of rows (every exit's probabilities, labels, raw lengths)."""
        for task, classes in self.config.tasks.items():
            y = np.asarray(labels[task]).reshape(-1)
            pred = np.asarray(probs[task]).argmax(-1)
            for e in range(self.config.num_exits):
                self.exit_cm[task][e] += confusion_matrix(y, pred[:, e], len(classes))
            if self.gate is not None:
                gp = gated_predictions(self.gate, task, probs[task], lengths)[0].argmax(-1)
                self.gate_cm[task] += confusion_matrix(y, gp, len(classes))
        if not self.policies:
            return
        full = float(full_flops(self.config, lengths).sum())
        for name, policy in self.policies.items():
            chosen, exits, blocks = apply_policy(policy, probs, lengths)
            sums = self.sums[name]
            sums["rows"] += len(blocks)
            sums["blocks"] += float(np.sum(blocks))
            sums["flops"] += float(np.sum(policy_flops(self.config, lengths, exits)))
            sums["full"] += full
            for task, classes in self.config.tasks.items():
                y = np.asarray(labels[task]).reshape(-1)
                self.policy_cm[name, task] += confusion_matrix(y, chosen[task].argmax(-1),
                                                               len(classes))
                sums["exits"][task] += float(np.sum(exits[task] + 1))

    def exit_table(self) -> pd.DataFrame:
        rows = []
        for task in self.config.tasks:
            task_rows = [{"task": task, "exit": exit_label(e, self.config.num_exits),
                          "accuracy": _accuracy(cm), "macro_f1": macro_f1_from_cm(cm),
                          "best_exit": ""} for e, cm in enumerate(self.exit_cm[task])]
            best = best_index([r["macro_f1"] for r in task_rows])
            task_rows.append({**task_rows[best], "exit": "max",
                              "best_exit": task_rows[best]["exit"]})
            if self.gate is not None:
                cm = self.gate_cm[task]
                task_rows.append({"task": task, "exit": "gate", "accuracy": _accuracy(cm),
                                  "macro_f1": macro_f1_from_cm(cm), "best_exit": ""})
            rows += task_rows
        return pd.DataFrame(rows, columns=["task", "exit", "accuracy", "macro_f1", "best_exit"])

    def policy_table(self) -> pd.DataFrame:
        rows = []
        for name, sums in self.sums.items():
            n = sums["rows"]
            mean = (lambda v: v / n) if n else (lambda v: float("nan"))  # noqa: E731
            for task in self.config.tasks:
                cm = self.policy_cm[name, task]
                rows.append({"policy": name, "task": task, "accuracy": _accuracy(cm),
                             "macro_f1": macro_f1_from_cm(cm),
                             "lc_macro_f1": macro_f1_from_cm(self.exit_cm[task][-1]),
                             "mean_exit": mean(sums["exits"][task]),
                             "mean_blocks_run": mean(sums["blocks"]),
                             "mean_mflops": mean(sums["flops"]) / 1e6,
                             "full_mflops": mean(sums["full"]) / 1e6,
                             "saved": 1 - sums["flops"] / sums["full"] if n else float("nan")})
        return pd.DataFrame(rows, columns=POLICY_COLUMNS)


def _accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def exit_scores(config: ResICConfig, probs: Mapping[str, np.ndarray],
                labels: Mapping[str, np.ndarray], lengths=None,
                gate: LengthGate | None = None) -> pd.DataFrame:
    """One row per task and row name (`ic1`..`icN`, `lc`, `max`, and `gate` when a gate is given),
    columns task, exit, accuracy, macro_f1. `max` is the best single exit on this data by
    macro-F1 (ties to the shallower), named in column `best_exit`."""
    tally = ScoreTally(config, gate)
    tally.add(probs, labels, lengths)
    return tally.exit_table()


def scores_markdown(table: pd.DataFrame) -> str:
    """Markdown: one section per task, rows = exits, columns accuracy and macro-F1."""
    out = []
    for task, t in table.groupby("task", sort=False):
        rows = [[f"max ({r.best_exit})" if r.exit == "max" else r.exit, fmt(r.accuracy),
                 fmt(r.macro_f1)] for r in t.itertuples()]
        out += [f"### {task}", "", markdown_table(["exit", "accuracy", "macro-F1"], rows), ""]
    return "\n".join(out)


POLICY_COLUMNS = ["policy", "task", "accuracy", "macro_f1", "lc_macro_f1", "mean_exit",
                  "mean_blocks_run", "mean_mflops", "full_mflops", "saved"]


def policy_scores(config: ResICConfig, policies: Mapping[str, ExitPolicy],
                  probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                  lengths) -> pd.DataFrame:
    """One row per early-exit policy and task: accuracy, macro-F1 (and the LC's), mean exit
    (1-based), mean blocks run, mean and full-depth MFLOPs per row and the share saved (FLOPs
    at each row's own length, `resic_tf.flops.policy_flops`)."""
    tally = ScoreTally(config, policies=policies)
    tally.add(probs, labels, lengths)
    return tally.policy_table()


def policy_scores_markdown(table: pd.DataFrame) -> str:
    """The policy table as Markdown (macro-F1 change against the LC in points)."""
    rows = [[r.policy, r.task, fmt(r.accuracy), fmt(r.macro_f1),
             f"{100 * (r.macro_f1 - r.lc_macro_f1):+.1f}", f"{r.mean_exit:.2f}",
             f"{r.mean_blocks_run:.2f}", f"{r.mean_mflops:.2f} / {r.full_mflops:.2f}",
             fmt(r.saved, pct=True)] for r in table.itertuples()]
    return markdown_table(["policy", "task", "accuracy", "macro-F1", "vs LC (points)",
                           "mean exit", "mean blocks", "MFLOPs per row / full", "saved"], rows)


def run_policies(run: Run) -> dict[str, ExitPolicy]:
    """The run's calibrated policies: the gate (as `length`) and every `policies/*.json`."""
    found = {"length": run.policy("length")} if run.gate is not None else {}
    return {**found, **{name: run.policy(name) for name in run.policies}}


def evaluate_run(run: Run, data: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 batch_size: int = 256, progress: bool = False) -> pd.DataFrame:
    """Score every exit, `max` and (if the run has a gate) the gate on `data`; write
    `evaluation.csv` and `evaluation.md` into `out_dir` (default: `RUN_DIR/eval_<data stem>`)."""
    if run.gate is not None:
        run.gate.check(run.config)
    policies = run_policies(run)
    # Scored chunk by chunk: only confusion matrices and sums outlive a chunk.
    tally = ScoreTally(run.config, run.gate, policies)
    p = predict_file(run, data, batch_size, progress=progress, keep=False,
                     on_chunk=lambda rows, labels, probs, lengths: tally.add(probs, labels,
                                                                              lengths))
    table = tally.exit_table()
    out = Path(out_dir) if out_dir else run.file(f"eval_{Path(data).stem}")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")
    atomic_write_text(out / "evaluation.csv", buf.getvalue())
    header = (f"# Evaluation of {run.path} on {data} ({p.size} rows)\n\n"
              + ("" if run.gate else "No gate.json: run `resic calibrate` for the gated row.\n\n"))
    markdown = scores_markdown(table)
    if policies:
        ptable = tally.policy_table()
        buf = io.StringIO()
        ptable.to_csv(buf, index=False, float_format="%.6f")
        atomic_write_text(out / "policies.csv", buf.getvalue())
        markdown += ("\n## Early-exit policies (calibrated on validation rows)\n\n"
                     + policy_scores_markdown(ptable) + "\n")
    elif (out / "policies.csv").exists():
        (out / "policies.csv").unlink()  # from an earlier evaluation; no policy now
    atomic_write_text(out / "evaluation.md", header + markdown)
    if run.path is not None:
        name = Path(data).stem
        write_text(run.file(TENSORBOARD_DIR) / evaluation_dir(name),
                   {f"evaluation/{name}": header + markdown})
        scores = {f"{name}/{r.task}_{r.exit}_{m}": getattr(r, m)
                  for r in table.itertuples() if r.exit in ("lc", "gate")
                  for m in ("accuracy", "macro_f1")}
        if policies:
            scores.update({f"{name}/{r.task}_policy_{r.policy}_macro_f1": r.macro_f1
                           for r in ptable.itertuples() if r.policy != "length"})  # = gate
            scores.update({f"{name}/policy_{r.policy}_saved": r.saved
                           for r in ptable.itertuples()})
        run.record_scores(scores)
    return table
