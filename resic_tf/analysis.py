"""Per-exit evaluation tables (the paper's Tables 1, 4 and 5) and the `resic analyze` report.

`analyze_run(RUN_DIR, FILE, DIR)` predicts every exit of a trained run on a labelled FILE once,
writes one row per input to `DIR/predictions.parquet`, and computes every number of
`DIR/report.md` from that table alone (plus the class counts in `config.json`). The report has
four sections, each with a PNG figure in DIR that is also logged to TensorBoard as an image
under `RUN_DIR/tensorboard/analysis/` (tag `analysis/<figure name>`):

1. `exit_scores.png` -- accuracy (solid) and macro-F1 (dashed) of every exit, shallow to deep,
   one colour per task (the paper's Tables 1 and 4 as curves). A curve that peaks before the LC
   means a shallower exit beats the full network on this data.
2. `overthinking.png` -- for every internal classifier, the share of the inputs it gets right
   that the LC gets wrong ("lost later"). Kaya et al., "Shallow-Deep Networks: Understanding
   and Mitigating Network Overthinking", ICML 2019 (https://arxiv.org/abs/1810.07052).
3. `error_by_length.png` -- for every exit, how its errors spread over the character-length
   buckets (the paper's Figs. 2-3); the dashed black line is the share of all inputs per bucket,
   so an exit whose curve lies above it in a bucket errs disproportionately there.
   `bucket_f1.png` -- heatmap of macro-F1 per length bucket (rows) and exit (columns) per task;
   a box marks the best exit of each bucket on this data, a dot the gate's choice.
4. The gate table (chosen exit per bucket and task) and the gated result beside the LC and the
   best single exit (the paper's Table 5). `max` picks its exit on this very data (an oracle);
   the gate was chosen on validation data, never on FILE.

Definitions (also in the report): with `C[n, e]` = "exit e is right on input n" and the LC the
last exit, *overthinking* (Kaya's destructive effect) is the share of inputs with some IC right
and the LC wrong: `mean(any(C[:, :-1], 1) & ~C[:, -1])`; the *lost-later share* of exit e is
`sum(C[:, e] & ~C[:, -1]) / sum(C[:, e])` (NaN if exit e is never right). The *error share* of
exit e in bucket b is `sum(~C[:, e] & (bucket == b)) / sum(~C[:, e])`.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resic_tf.config import ResICConfig
from resic_tf.gate import LengthGate, bucket_of, gated_predictions
from resic_tf.io import atomic_path, atomic_write_text
from resic_tf.metrics import accuracy, macro_f1

FIGURES = ("exit_scores", "overthinking", "error_by_length", "bucket_f1")


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
    from resic_tf.training import load_run, predict_file

    run = load_run(run_dir)
    p = predict_file(run, data, batch_size)
    rows, labels, probs = p.rows, p.labels, p.probs
    gate_path = Path(run_dir) / "gate.json"
    gate = LengthGate.load(gate_path) if gate_path.exists() else None
    if gate is not None:
        gate.check(run.config)
    table = exit_scores(run.config, probs, labels, p.lengths, gate)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval_{Path(data).stem}"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6f")
    atomic_write_text(out / "evaluation.csv", buf.getvalue())
    header = (f"# Evaluation of {run_dir} on {data} ({len(rows)} rows)\n\n"
              + ("" if gate else "No gate.json: run `resic calibrate` for the gated row.\n\n"))
    atomic_write_text(out / "evaluation.md", header + scores_markdown(table))
    return table


# === Pure analysis functions (numpy in, numbers out) ===

def _check_preds(pred_matrix, y, min_exits: int = 1) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_matrix)
    y = np.asarray(y)
    if pred.ndim != 2 or pred.shape[1] < min_exits:
        raise ValueError(f"`pred_matrix` must be 2-D (samples, exits) with at least {min_exits} "
                         f"exit(s). Received: pred_matrix.shape={pred.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.shape[0] != pred.shape[0]:
        raise ValueError(f"`y` must be 1-D with one label per row of `pred_matrix`. Received: "
                         f"y.shape={y.shape}, pred_matrix.shape={pred.shape}")
    return pred.astype(np.int64), y.astype(np.int64)


def _check_buckets(buckets, n: int, n_buckets: int) -> np.ndarray:
    b = np.asarray(buckets).reshape(-1).astype(np.int64)
    if b.shape[0] != n:
        raise ValueError(f"`buckets` needs one bucket per sample ({n}). Received: {b.shape[0]}")
    if b.size and (b.min() < 0 or b.max() >= n_buckets):
        raise ValueError(f"`buckets` must lie in [0, {n_buckets}). Received: min={b.min()}, "
                         f"max={b.max()}")
    return b


def _share(num, den) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def overthinking(pred_matrix, y) -> dict[str, Any]:
    """Overthinking statistics of one task (Kaya et al., ICML 2019), the LC being the last exit.

    With `C[n, e] = pred_matrix[n, e] == y[n]`:

    - `overthinking` = mean over inputs of `any(C[n, :-1]) and not C[n, -1]`: the share of all
      inputs that SOME internal classifier gets right but the LC gets wrong (Kaya's destructive
      effect).
    - `wasteful` = mean of `any(C[n, :-1]) and C[n, -1]`: right at the LC, but an earlier IC was
      already right (Kaya's wasteful effect: the deeper blocks were not needed).
    - `oracle_accuracy` = mean of `any(C[n, :])`: accuracy if an oracle picked the exit.
    - per exit e: `correct[e] = sum(C[:, e])`, `lost_at_lc[e] = sum(C[:, e] & ~C[:, -1])` and
      `lost_share[e] = lost_at_lc[e] / correct[e]`: of the inputs exit e gets right, the share
      the LC gets wrong (NaN when exit e gets none right; 0 for the LC itself).

    Args:
        pred_matrix: int array `(n, exits)`, predicted class ids, exits shallow to deep.
        y: int array `(n,)`, true class ids.

    Returns:
        dict with `n`, `overthinking`, `overthinking_count`, `wasteful`, `wasteful_count`,
        `oracle_accuracy`, `lc_accuracy` (floats, NaN when n = 0) and per-exit lists `correct`,
        `lost_at_lc`, `lost_share`.

    Example: y = [0, 1, 1], pred_matrix = [[0, 1], [1, 0], [0, 0]] (one IC, then the LC):
    input 0 is right at the IC only, input 1 at the IC only, input 2 nowhere, so
    overthinking = 2/3, lost_share = [2/2, NaN] (the LC is never right).
    """
    pred, y = _check_preds(pred_matrix, y, min_exits=2)
    c = pred == y[:, None]
    earlier = c[:, :-1].any(axis=1)
    n = len(y)
    over = int((earlier & ~c[:, -1]).sum())
    waste = int((earlier & c[:, -1]).sum())
    correct = c.sum(axis=0)
    lost = (c & ~c[:, -1:]).sum(axis=0)
    return {
        "n": n,
        "overthinking_count": over, "overthinking": float(_share(over, n)),
        "wasteful_count": waste, "wasteful": float(_share(waste, n)),
        "oracle_accuracy": float(_share(c.any(axis=1).sum(), n)),
        "lc_accuracy": float(_share(c[:, -1].sum(), n)),
        "correct": [int(v) for v in correct],
        "lost_at_lc": [int(v) for v in lost],
        "lost_share": [float(v) for v in _share(lost, correct)],
    }


def error_share_by_bucket(pred_matrix, y, buckets, n_buckets: int) -> np.ndarray:
    """`share[e, b]`: of exit e's errors, the share whose input lies in length bucket b.

    Each row sums to 1; a row is all NaN when that exit makes no error.

    Example: y = [0, 0, 1], one exit predicting [1, 0, 0], buckets [0, 1, 1], 2 buckets: errors
    on inputs 0 (bucket 0) and 2 (bucket 1), so share = [[0.5, 0.5]].
    """
    pred, y = _check_preds(pred_matrix, y)
    b = _check_buckets(buckets, len(y), n_buckets)
    wrong = pred != y[:, None]
    counts = np.stack([np.bincount(b[wrong[:, e]], minlength=n_buckets)
                       for e in range(pred.shape[1])])
    return _share(counts, counts.sum(axis=1, keepdims=True))


def bucket_exit_f1(pred_matrix, y, buckets, n_buckets: int, num_classes: int) -> np.ndarray:
    """`f1[b, e]`: macro-F1 (`resic_tf.metrics.macro_f1`) of exit e on the inputs of bucket b;
    a row is NaN for an empty bucket."""
    pred, y = _check_preds(pred_matrix, y)
    b = _check_buckets(buckets, len(y), n_buckets)
    out = np.full((n_buckets, pred.shape[1]), np.nan)
    for k in range(n_buckets):
        rows = b == k
        if rows.any():
            out[k] = [macro_f1(y[rows], pred[rows, e], num_classes) for e in range(pred.shape[1])]
    return out


def best_exit_per_bucket(scores) -> np.ndarray:
    """Per row of `scores` `(buckets, exits)`, the 0-based best exit: the shallowest among equal
    scores, NaN never wins, -1 for an all-NaN row (an empty bucket)."""
    s = np.asarray(scores, dtype=np.float64)
    filled = np.where(np.isnan(s), -np.inf, s)
    best = filled.argmax(axis=1)
    return np.where(np.isnan(s).all(axis=1), -1, best)


def bucket_labels(bucket_width: int, n_buckets: int) -> list[str]:
    """`0-9`, `10-19`, ..., and `130+` for the open-ended last bucket (width 10)."""
    return [f"{k * bucket_width}+" if k == n_buckets - 1
            else f"{k * bucket_width}-{(k + 1) * bucket_width - 1}" for k in range(n_buckets)]


# === The predictions table ===

def short_exit_names(config: ResICConfig) -> list[str]:
    """`ic1` .. `icN`, `lc`: exit names without the task prefix."""
    return [f"ic{i}" for i in range(1, config.num_ics + 1)] + ["lc"]


def predictions_frame(config: ResICConfig, texts: Sequence[str], lengths,
                      labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                      gate: LengthGate) -> pd.DataFrame:
    """One row per input: `text`, `length`, `bucket` (the gate's buckets) and per task
    `{task}_true`, `{task}_{exit}_pred`, `{task}_{exit}_conf` (max probability) for every exit,
    `{task}_gate_exit` (short exit name) and `{task}_gate_pred`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cols: dict[str, Any] = {"text": list(texts), "length": lengths,
                            "bucket": bucket_of(lengths, gate.bucket_width, gate.num_buckets)}
    names = short_exit_names(config)
    for task in config.tasks:
        p = np.asarray(probs[task])
        pred, conf = p.argmax(-1), p.max(-1)
        cols[f"{task}_true"] = np.asarray(labels[task], dtype=np.int64).reshape(-1)
        for e, name in enumerate(names):
            cols[f"{task}_{name}_pred"] = pred[:, e].astype(np.int64)
            cols[f"{task}_{name}_conf"] = conf[:, e].astype(np.float32)
        idx = gate.exit_index(task, lengths)
        cols[f"{task}_gate_exit"] = np.asarray(names, dtype=object)[idx]
        cols[f"{task}_gate_pred"] = pred[np.arange(len(idx)), idx].astype(np.int64)
    return pd.DataFrame(cols)


def frame_pred_matrix(frame: pd.DataFrame, task: str, exits: Sequence[str]) -> np.ndarray:
    """`(n, exits)` predicted class ids of one task read back from a predictions frame."""
    return np.stack([frame[f"{task}_{e}_pred"].to_numpy(np.int64) for e in exits], axis=1)


def analysis_from_frame(config: ResICConfig, frame: pd.DataFrame,
                        gate: LengthGate) -> dict[str, Any]:
    """Every number of the report, computed from the predictions frame (and class counts) only."""
    names = short_exit_names(config)
    n_b, width = gate.num_buckets, gate.bucket_width
    buckets = frame["bucket"].to_numpy(np.int64)
    support = np.bincount(buckets, minlength=n_b)
    out: dict[str, Any] = {"rows": len(frame), "bucket_width": width, "num_buckets": n_b,
                           "bucket_labels": bucket_labels(width, n_b), "exits": names,
                           "bucket_support": support.tolist(), "tasks": {}}
    for task, classes in config.tasks.items():
        y = frame[f"{task}_true"].to_numpy(np.int64)
        pred = frame_pred_matrix(frame, task, names)
        gate_pred = frame[f"{task}_gate_pred"].to_numpy(np.int64)
        k = len(classes)
        exits = {e: {"accuracy": accuracy(y, pred[:, i]), "macro_f1": macro_f1(y, pred[:, i], k)}
                 for i, e in enumerate(names)}
        best = int(best_exit_per_bucket(np.array([[exits[e]["macro_f1"] for e in names]]))[0])
        f1 = bucket_exit_f1(pred, y, buckets, n_b, k)
        usage = frame[f"{task}_gate_exit"].value_counts()
        out["tasks"][task] = {
            "exits": exits,
            "lc": exits["lc"],
            "max": {**exits[names[best]], "exit": names[best]},
            "gate": {"accuracy": accuracy(y, gate_pred), "macro_f1": macro_f1(y, gate_pred, k)},
            "gate_choice": [names[c] for c in gate.choice[task]],
            "gate_usage": {e: int(usage.get(e, 0)) for e in names},
            "overthinking": overthinking(pred, y),
            "errors": [int(v) for v in (pred != y[:, None]).sum(axis=0)],
            "error_share": error_share_by_bucket(pred, y, buckets, n_b).tolist(),
            "bucket_f1": f1.tolist(),
            "bucket_best_exit": [names[i] if i >= 0 else None for i in best_exit_per_bucket(f1)],
        }
    return out


# === Figures (matplotlib's Agg canvas, no pyplot: no GUI and no global backend switch) ===

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_exit_scores(result: Mapping[str, Any], path: Path) -> Path:
    """Accuracy (solid) and macro-F1 (dashed) per exit, one colour per task."""
    names = result["exits"]
    fig = _figure(max(5.0, 0.6 * len(names) + 2), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for i, (task, t) in enumerate(result["tasks"].items()):
        color = f"C{i}"
        ax.plot(x, [t["exits"][e]["accuracy"] for e in names], "o-", color=color,
                label=f"{task} accuracy")
        ax.plot(x, [t["exits"][e]["macro_f1"] for e in names], "s--", color=color,
                label=f"{task} macro-F1")
    ax.set(xticks=x, xticklabels=names, xlabel="exit (shallow to deep)", ylabel="score",
           ylim=(0, 1), title="Per-exit accuracy and macro-F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def plot_overthinking(result: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: per IC and task, the share of its right answers the LC gets wrong."""
    ics = result["exits"][:-1]
    tasks = result["tasks"]
    fig = _figure(max(5.0, 0.7 * len(ics) + 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(tasks)
    x = np.arange(len(ics))
    for i, (task, t) in enumerate(tasks.items()):
        o = t["overthinking"]
        share = np.array(o["lost_share"][:-1], dtype=np.float64)  # NaN: no bar
        ax.bar(x + (i - (len(tasks) - 1) / 2) * width, share, width, color=f"C{i}",
               label=f"{task} (overthinking {o['overthinking']:.1%} of inputs)")
    ax.set(xticks=x, xticklabels=ics, xlabel="internal classifier",
           ylabel="share of its right answers\nthe LC gets wrong", ylim=(0, 1),
           title="Overthinking: right at an IC, wrong at the LC")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def plot_error_by_length(result: Mapping[str, Any], path: Path) -> Path:
    """Per task: each exit's share of its errors per length bucket, and the share of inputs."""
    from matplotlib import colormaps

    names, labels = result["exits"], result["bucket_labels"]
    tasks = result["tasks"]
    fig = _figure(max(6.0, 0.45 * len(labels) + 2), 3.2 * len(tasks))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    x = np.arange(len(labels))
    support = np.asarray(result["bucket_support"], dtype=np.float64)
    cmap = colormaps["viridis"]
    for ax, (task, t) in zip(axes, tasks.items()):
        share = np.asarray(t["error_share"], dtype=np.float64)
        for e, name in enumerate(names):
            ax.plot(x, share[e], "-", marker=".", color=cmap(e / max(1, len(names) - 1)),
                    label=name)
        ax.plot(x, _share(support, support.sum()), "k--", lw=2, label="all inputs")
        ax.set(xticks=x, ylabel="share of the exit's errors", title=f"{task}: errors by length")
        ax.set_xticklabels(labels, rotation=45, fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    axes[-1].set_xlabel("text length (characters)")
    return _save_png(fig, path)


def plot_bucket_f1(result: Mapping[str, Any], path: Path) -> Path:
    """Per task a heatmap of macro-F1 by length bucket x exit; box = best here, dot = gate."""
    from matplotlib.patches import Rectangle

    names, labels = result["exits"], result["bucket_labels"]
    tasks = result["tasks"]
    fig = _figure(max(6.0, (0.55 * len(names) + 1.5) * len(tasks)), 0.35 * len(labels) + 2)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, (task, t) in zip(axes, tasks.items()):
        f1 = np.asarray(t["bucket_f1"], dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(f1), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for b in range(f1.shape[0]):
            for e in range(f1.shape[1]):
                if not np.isnan(f1[b, e]):
                    ax.text(e, b, f"{f1[b, e]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if f1[b, e] < 0.5 else "black")
            best = t["bucket_best_exit"][b]
            if best is not None:
                ax.add_patch(Rectangle((names.index(best) - 0.5, b - 0.5), 1, 1, fill=False,
                                       edgecolor="red", lw=2))
            ax.plot(names.index(t["gate_choice"][b]), b + 0.3, "o", color="orange", ms=3)
        ax.set(xticks=np.arange(len(names)), yticks=np.arange(len(labels)),
               xlabel="exit", title=f"{task}: macro-F1 by length")
        ax.set_xticklabels(names, rotation=45, fontsize="small")
        ax.set_yticklabels(labels, fontsize="small")
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("length bucket (characters)")
    return _save_png(fig, path)


def log_figures(paths: Mapping[str, Path], log_dir: str | os.PathLike, step: int = 0,
                description: str | None = None) -> None:
    """Write each PNG as a TensorBoard image, tag `analysis/<name>`, into `log_dir`."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    try:
        with writer.as_default():
            for name, path in paths.items():
                image = tf.image.decode_png(Path(path).read_bytes(), channels=4)
                tf.summary.image(f"analysis/{name}", image[None], step=step,
                                 description=description)
        writer.flush()
    finally:
        writer.close()


# === The report ===

def _f(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def report_markdown(config: ResICConfig, result: Mapping[str, Any], table: pd.DataFrame,
                    header: Sequence[str]) -> str:
    """The report text; `table` is `exit_scores` with the gate, `header` the opening lines."""
    names, labels = result["exits"], result["bucket_labels"]
    tasks = result["tasks"]
    md = list(header)
    md += ["", "## 1. Per-exit accuracy and macro-F1", "",
           "Macro-F1 is the unweighted mean of per-class F1 over the classes present in the "
           "labels or the predictions (`resic_tf.metrics`).", "",
           scores_markdown(table[table["exit"].isin(names)]),
           "![per-exit accuracy and macro-F1](exit_scores.png)", ""]

    md += ["## 2. Overthinking", "",
           "With C[n, e] = 'exit e is right on input n' (Kaya et al., ICML 2019):", "",
           "- **overthinking**: share of all inputs that SOME internal classifier (ic1..icN) "
           "gets right but the LC gets wrong: mean(any(C[:, :-1]) and not C[:, lc]).",
           "- **wasteful**: share of all inputs that the LC gets right but some IC already got "
           "right.",
           "- **oracle accuracy**: share of inputs that at least one exit gets right.",
           "- **lost later** (per exit e): of the inputs exit e gets right, the share the LC "
           "gets wrong: sum(C[:, e] and not C[:, lc]) / sum(C[:, e]); the LC's own is 0.", ""]
    md += _md_table(["task", "LC accuracy", "overthinking", "wasteful", "oracle accuracy"],
                    [[task, _f(o["lc_accuracy"]),
                      f"{_f(o['overthinking'], True)} ({o['overthinking_count']}/{o['n']})",
                      f"{_f(o['wasteful'], True)} ({o['wasteful_count']}/{o['n']})",
                      _f(o["oracle_accuracy"])]
                     for task, o in ((t, v["overthinking"]) for t, v in tasks.items())])
    md += ["", "Lost later, per internal classifier (right at the exit / of those, wrong at "
           "the LC / share):", ""]
    md += _md_table(["exit", *tasks],
                    [[e] + [f"{t['overthinking']['correct'][i]} / "
                            f"{t['overthinking']['lost_at_lc'][i]} / "
                            f"{_f(t['overthinking']['lost_share'][i], True)}"
                            for t in tasks.values()]
                     for i, e in enumerate(names[:-1])])
    md += ["", "![overthinking](overthinking.png)", ""]

    md += ["## 3. Error by length", "",
           f"Length is the raw text's character count; buckets are {result['bucket_width']} "
           "characters wide (the gate's), the last one open-ended. **Error share**: of an "
           "exit's errors, the share whose input lies in the bucket (each row sums to 100%); "
           "the `inputs` row is the share of all inputs per bucket.", ""]
    support = np.asarray(result["bucket_support"])
    for task, t in tasks.items():
        md += [f"### {task}", ""]
        md += _md_table(["exit", "errors", *labels],
                        [["inputs", str(result["rows"]),
                          *[_f(v, True) for v in _share(support, support.sum())]]]
                        + [[e, str(t["errors"][i]), *[_f(v, True) for v in t["error_share"][i]]]
                           for i, e in enumerate(names)])
        md += [""]
    md += ["![error share by length](error_by_length.png)", "",
           "Macro-F1 per length bucket: the best exit on this data (ties to the shallower), the "
           "LC and the gate's exit (chosen on validation data).", ""]
    for task, t in tasks.items():
        md += [f"### {task}", ""]
        rows = []
        for b, lab in enumerate(labels):
            f1 = t["bucket_f1"][b]
            best = t["bucket_best_exit"][b]
            gate_e = t["gate_choice"][b]
            rows.append([lab, str(support[b]),
                         "n/a" if best is None else f"{best} ({_f(f1[names.index(best)])})",
                         _f(f1[-1]), f"{gate_e} ({_f(f1[names.index(gate_e)])})"])
        md += _md_table(["length", "inputs", "best exit (macro-F1)", "LC macro-F1",
                         "gate exit (macro-F1)"], rows)
        md += [""]
    md += ["![macro-F1 by length bucket and exit](bucket_f1.png)", "",
           "Heatmap: macro-F1 per bucket (row) and exit (column); red box = best exit of the "
           "bucket here, orange dot = the gate's choice; empty buckets are blank.", ""]

    md += ["## 4. Length gate", "", "Chosen exit per length bucket:", ""]
    md += _md_table(["length", *tasks], [[lab, *[t["gate_choice"][b] for t in tasks.values()]]
                                         for b, lab in enumerate(labels)])
    md += ["", "Gated result beside the LC and the best single exit (`max` chooses its exit on "
           "this data, an oracle; the gate does not):", ""]
    head = ["row"] + [f"{task} {m}" for task in tasks for m in ("accuracy", "macro-F1")]
    rows = []
    for row in ("lc", "max", "gate"):
        cells = [row]
        for task, t in tasks.items():
            r = t[row]
            cells += [_f(r["accuracy"]), _f(r["macro_f1"])
                      + (f" ({r['exit']})" if row == "max" else "")]
        rows.append(cells)
    md += _md_table(head, rows)
    md += ["", "Inputs routed to each exit by the gate: "
           + "; ".join(f"{task}: " + ", ".join(f"{e} {c}" for e, c in t["gate_usage"].items()
                                               if c)
                       for task, t in tasks.items()) + ".", ""]
    return "\n".join(md)


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def analyze_run(run_dir: str | os.PathLike, data: str | os.PathLike,
                out_dir: str | os.PathLike, batch_size: int = 256) -> Path:
    """Write the analysis of a run on a labelled file into `out_dir`; returns `report.md`'s path.

    Predicts every exit once, writes `predictions.parquet`, computes all numbers from it
    (`analysis_from_frame`, also saved as `analysis.json`, NaN as null), draws the four figures
    (also logged to `RUN_DIR/tensorboard/analysis/`) and writes `report.md`. Uses
    `RUN_DIR/gate.json`; when it is missing, calibrates one on the run's own validation rows
    (`gate.calibrate_run`, which writes `RUN_DIR/gate.json`), never on `data`.
    """
    from resic_tf.gate import calibrate_run
    from resic_tf.training import load_run, predict_file

    run_dir, out = Path(run_dir), Path(out_dir)
    run = load_run(run_dir)
    config = run.config
    p = predict_file(run, data, batch_size)
    if len(p.rows) == 0:
        raise ValueError(f"`data` has no rows to analyze. Received: data={str(data)!r}")
    rows, labels, probs, lengths = p.rows, p.labels, p.probs, p.lengths
    gate_path = run_dir / "gate.json"
    if gate_path.exists():
        gate = LengthGate.load(gate_path)
        source = gate.details.get("_source") or "unknown data"
        gate_note = f"Gate: `{gate_path}` (calibrated on {source})."
    else:
        gate = calibrate_run(run_dir, batch_size=batch_size)
        gate_note = (f"Gate: no `gate.json` was found, so one was calibrated now on the run's own "
                     f"validation rows (`{gate.details.get('_source')}`, metric {gate.metric}, "
                     f"min_support {gate.min_support}) and saved as `{gate_path}`.")
    gate.check(config)

    out.mkdir(parents=True, exist_ok=True)
    frame = predictions_frame(config, rows.texts, lengths, labels, probs, gate)
    with atomic_path(out / "predictions.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    result = analysis_from_frame(config, frame, gate)
    result.update({"run_dir": str(run_dir), "data": str(data), "gate_source": gate_note})
    atomic_write_text(out / "analysis.json",
                      json.dumps(_json_safe(result), ensure_ascii=False, indent=2) + "\n")

    figures = {"exit_scores": plot_exit_scores(result, out / "exit_scores.png"),
               "overthinking": plot_overthinking(result, out / "overthinking.png"),
               "error_by_length": plot_error_by_length(result, out / "error_by_length.png"),
               "bucket_f1": plot_bucket_f1(result, out / "bucket_f1.png")}
    log_figures(figures, run_dir / "tensorboard" / "analysis",
                description=f"resic analyze on {data}")

    table = exit_scores(config, probs, labels, lengths, gate)
    tasks = ", ".join(f"{t} ({len(c)} classes)" for t, c in config.tasks.items())
    header = [f"# Res-IC analysis of `{run_dir}` on `{data}`", "",
              f"{len(frame)} inputs; tasks {tasks}; {config.num_ics} internal classifiers + "
              "the LC per task.", "", gate_note, "",
              "Every number below is recomputable from `predictions.parquet` (one row per "
              "input: `text`, `length`, `bucket`, `{task}_true`, `{task}_{exit}_pred`, "
              "`{task}_{exit}_conf`, `{task}_gate_exit`, `{task}_gate_pred`) and the class "
              "counts in `config.json`; `analysis.json` holds them unrounded. Figures are also "
              "in TensorBoard (`tensorboard --logdir "
              f"{run_dir / 'tensorboard'}`, Images tab, tags `analysis/*`)."]
    report = out / "report.md"
    atomic_write_text(report, report_markdown(config, result, table, header))
    return report
