"""The `resic analyze` report: predictions table, statistics, figures and Markdown.

`analyze_run(RUN_DIR, FILE, DIR)` predicts every exit of a trained run on a labelled FILE once,
writes one row per input to `DIR/predictions.parquet`, and computes every number of
`DIR/report.md` from that table alone (plus the class counts in `config.json`). The report has
five sections, each with a PNG figure in DIR that is also logged to TensorBoard as an image
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
5. `early_exit.png` -- macro-F1 against the share of full-depth FLOPs: the confidence, entropy
   and patience thresholds swept (`early_exit_sweep.csv`, the curve SDN and FastBERT publish)
   and every calibrated policy (the gate and `policies/*.json`) as a point, with its table.

Definitions (also in the report): with `C[n, e]` = "exit e is right on input n" and the LC the
last exit, *overthinking* (Kaya's destructive effect) is the share of inputs with some IC right
and the LC wrong: `mean(any(C[:, :-1], 1) & ~C[:, -1])`; the *lost-later share* of exit e is
`sum(C[:, e] & ~C[:, -1]) / sum(C[:, e])` (NaN if exit e is never right). The *error share* of
exit e in bucket b is `sum(~C[:, e] & (bucket == b)) / sum(~C[:, e])`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resic_tf.config import ResICConfig
from resic_tf.evaluation import (exit_scores, policy_scores, policy_scores_markdown, run_policies,
                                 scores_markdown)
from resic_tf.figures import new_figure, save_png
from resic_tf.io import ParquetAppender, atomic_path, atomic_write_text, json_safe
from resic_tf.markdown import fmt, markdown_table
from resic_tf.policies import sweep
from resic_tf.run import GATE_FILE, TENSORBOARD_DIR, Run, predict_file
from resic_tf.statistics import _share, analysis_from_frame, predictions_frame
from resic_tf.tensorboard import ANALYSIS_DIR, write_images
from resic_tf.validation import InvalidValueError

FIGURES = ("exit_scores", "overthinking", "error_by_length", "bucket_f1", "early_exit")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return markdown_table(header, rows).split("\n")


def plot_exit_scores(result: Mapping[str, Any], path: Path) -> Path:
    """Accuracy (solid) and macro-F1 (dashed) per exit, one colour per task."""
    names = result["exits"]
    fig = new_figure(max(5.0, 0.6 * len(names) + 2), 3.6)
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
    return save_png(fig, path)


def plot_overthinking(result: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: per IC and task, the share of its right answers the LC gets wrong."""
    ics = result["exits"][:-1]
    tasks = result["tasks"]
    fig = new_figure(max(5.0, 0.7 * len(ics) + 2), 3.6)
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
    return save_png(fig, path)


def plot_error_by_length(result: Mapping[str, Any], path: Path) -> Path:
    """Per task: each exit's share of its errors per length bucket, and the share of inputs."""
    from matplotlib import colormaps

    names, labels = result["exits"], result["bucket_labels"]
    tasks = result["tasks"]
    fig = new_figure(max(6.0, 0.45 * len(labels) + 2), 3.2 * len(tasks))
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
    return save_png(fig, path)


def plot_bucket_f1(result: Mapping[str, Any], path: Path) -> Path:
    """Per task a heatmap of macro-F1 by length bucket x exit; box = best here, dot = gate."""
    from matplotlib.patches import Rectangle

    names, labels = result["exits"], result["bucket_labels"]
    tasks = result["tasks"]
    fig = new_figure(max(6.0, (0.55 * len(names) + 1.5) * len(tasks)), 0.35 * len(labels) + 2)
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
    return save_png(fig, path)


def plot_early_exit(config: ResICConfig, curves: Sequence[Mapping[str, Any]],
                    points: pd.DataFrame, path: Path) -> Path:
    """Macro-F1 against the share of full-depth FLOPs per task: one line per policy as its
    threshold sweeps (`resic_tf.policies.sweep`), the calibrated policies as marked points."""
    tasks = list(config.tasks)
    fig = new_figure(5.0 * len(tasks), 3.8)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    curves = pd.DataFrame(list(curves))
    for ax, task in zip(axes, tasks):
        for name, c in curves[curves["task"] == task].groupby("policy", sort=False):
            c = c.sort_values("flops_share")
            ax.plot(100 * c["flops_share"], 100 * c["macro_f1"], marker=".", label=f"{name} sweep")
        for r in points[points["task"] == task].itertuples():
            ax.scatter([100 * (1 - r.saved)], [100 * r.macro_f1], marker="*", s=120, zorder=3,
                       label=f"{r.policy} (calibrated)")
        lc = points[points["task"] == task]["lc_macro_f1"]
        if len(lc):
            ax.axhline(100 * lc.iloc[0], color="grey", linestyle="--", linewidth=1, label="LC")
        ax.set_title(task)
        ax.set_xlabel("FLOPs per row, % of full depth")
        ax.set_ylabel("macro-F1 (%)")
        ax.legend(fontsize=7)
    return save_png(fig, path)


def log_figures(paths: Mapping[str, Path], log_dir: str | os.PathLike, step: int = 0,
                description: str | None = None, texts: Mapping[str, str] | None = None) -> None:
    """Write each PNG as a TensorBoard image, tag `analysis/<name>` (and `texts` as text
    summaries), into `log_dir`, replacing what an earlier analysis wrote there."""
    write_images(log_dir, {f"analysis/{name}": Path(path).read_bytes()
                           for name, path in paths.items()}, texts, description, step)


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
    md += _table(["task", "LC accuracy", "overthinking", "wasteful", "oracle accuracy"],
                    [[task, fmt(o["lc_accuracy"]),
                      f"{fmt(o['overthinking'], True)} ({o['overthinking_count']}/{o['n']})",
                      f"{fmt(o['wasteful'], True)} ({o['wasteful_count']}/{o['n']})",
                      fmt(o["oracle_accuracy"])]
                     for task, o in ((t, v["overthinking"]) for t, v in tasks.items())])
    md += ["", "Lost later, per internal classifier (right at the exit / of those, wrong at "
           "the LC / share):", ""]
    md += _table(["exit", *tasks],
                    [[e] + [f"{t['overthinking']['correct'][i]} / "
                            f"{t['overthinking']['lost_at_lc'][i]} / "
                            f"{fmt(t['overthinking']['lost_share'][i], True)}"
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
        md += _table(["exit", "errors", *labels],
                        [["inputs", str(result["rows"]),
                          *[fmt(v, True) for v in _share(support, support.sum())]]]
                        + [[e, str(t["errors"][i]), *[fmt(v, True) for v in t["error_share"][i]]]
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
                         "n/a" if best is None else f"{best} ({fmt(f1[names.index(best)])})",
                         fmt(f1[-1]), f"{gate_e} ({fmt(f1[names.index(gate_e)])})"])
        md += _table(["length", "inputs", "best exit (macro-F1)", "LC macro-F1",
                         "gate exit (macro-F1)"], rows)
        md += [""]
    md += ["![macro-F1 by length bucket and exit](bucket_f1.png)", "",
           "Heatmap: macro-F1 per bucket (row) and exit (column); red box = best exit of the "
           "bucket here, orange dot = the gate's choice; empty buckets are blank.", ""]

    md += ["## 4. Length gate", "", "Chosen exit per length bucket:", ""]
    md += _table(["length", *tasks], [[lab, *[t["gate_choice"][b] for t in tasks.values()]]
                                         for b, lab in enumerate(labels)])
    md += ["", "Gated result beside the LC and the best single exit (`max` chooses its exit on "
           "this data, an oracle; the gate does not):", ""]
    head = ["row"] + [f"{task} {m}" for task in tasks for m in ("accuracy", "macro-F1")]
    rows = []
    for row in ("lc", "max", "gate"):
        cells = [row]
        for task, t in tasks.items():
            r = t[row]
            cells += [fmt(r["accuracy"]), fmt(r["macro_f1"])
                      + (f" ({r['exit']})" if row == "max" else "")]
        rows.append(cells)
    md += _table(head, rows)
    md += ["", "Inputs routed to each exit by the gate: "
           + "; ".join(f"{task}: " + ", ".join(f"{e} {c}" for e, c in t["gate_usage"].items()
                                               if c)
                       for task, t in tasks.items()) + ".", ""]
    return "\n".join(md)


def analyze_run(run: Run, data: str | os.PathLike, out_dir: str | os.PathLike,
                batch_size: int = 256, progress: bool = False) -> Path:
    """Write the analysis of a run on a labelled file into `out_dir`; returns `report.md`'s path.

    Predicts every exit once, writes `predictions.parquet`, computes all numbers from it
    (`analysis_from_frame`, also saved as `analysis.json`, NaN as null), draws the four figures
    (also logged to `RUN_DIR/tensorboard/analysis/`) and writes `report.md`. Uses
    the run's gate; when it has none, calibrates one on the run's own validation rows
    (`Run.calibrate`, which writes `RUN_DIR/gate.json`), never on `data`.
    """
    run_dir, out = run.path, Path(out_dir)
    config = run.config
    gate_path = run.file(GATE_FILE)
    if run.gate is not None:
        gate = run.gate
        source = gate.details.get("_source") or "unknown data"
        gate_note = f"Gate: `{gate_path}` (calibrated on {source})."
    else:
        gate = run.calibrate(batch_size=batch_size)
        gate_note = (f"Gate: no `gate.json` was found, so one was calibrated now on the run's own "
                     f"validation rows (`{gate.details.get('_source')}`, metric {gate.metric}, "
                     f"min_support {gate.min_support}) and saved as `{gate_path}`.")
    gate.check(config)

    out.mkdir(parents=True, exist_ok=True)
    # predictions.parquet is written a chunk at a time; the analysis keeps every column but the
    # texts, so a large file's texts never sit in memory together.
    frames = []
    with atomic_path(out / "predictions.parquet") as tmp:
        writer = ParquetAppender(tmp)

        def add(rows, labels, probs, lengths):
            frame = predictions_frame(config, rows.texts, lengths, labels, probs, gate)
            writer.add(frame)
            frames.append(frame.drop(columns="text"))

        try:
            p = predict_file(run, data, batch_size, on_chunk=add, progress=progress)
        finally:
            writer.close()
        if p.size == 0:
            raise InvalidValueError(f"`data` has no rows to analyze. Received: data={str(data)!r}")
    frame = pd.concat(frames, ignore_index=True)
    labels, probs, lengths = p.labels, p.probs, p.lengths
    result = analysis_from_frame(config, frame, gate)
    result.update({"run_dir": str(run_dir), "data": str(data), "gate_source": gate_note})
    atomic_write_text(out / "analysis.json",
                      json.dumps(json_safe(result), ensure_ascii=False, indent=2) + "\n")

    figures = {"exit_scores": plot_exit_scores(result, out / "exit_scores.png"),
               "overthinking": plot_overthinking(result, out / "overthinking.png"),
               "error_by_length": plot_error_by_length(result, out / "error_by_length.png"),
               "bucket_f1": plot_bucket_f1(result, out / "bucket_f1.png")}
    policies = run_policies(run)
    points = policy_scores(config, policies, probs, labels, lengths)
    curves = [row for name in ("confidence", "entropy", "patience")
              for row in sweep(config, name, probs, labels, lengths)]
    figures["early_exit"] = plot_early_exit(config, curves, points, out / "early_exit.png")
    with atomic_path(out / "early_exit_sweep.csv") as tmp:
        pd.DataFrame(curves).to_csv(tmp, index=False, float_format="%.6f")
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
              f"{run.file(TENSORBOARD_DIR)}`, Images tab, tags `analysis/*`)."]
    report = out / "report.md"
    text = report_markdown(config, result, table, header)
    text += "\n".join([
        "", "## 5. Early exit: macro-F1 against compute", "",
        "Each calibrated policy (thresholds chosen on validation rows, `resic calibrate "
        "--policy`) on this data; FLOPs are counted per row at its own length "
        "(`resic_tf.flops.policy_flops`), the share saved against running every block.", "",
        policy_scores_markdown(points) if len(points) else "No calibrated policy.", "",
        "![macro-F1 against FLOPs](early_exit.png)", "",
        "Lines: one threshold for every task, swept (`early_exit_sweep.csv`); stars: the "
        "calibrated policies; dashed: the LC.", ""])
    atomic_write_text(report, text)
    log_figures(figures, run.file(TENSORBOARD_DIR) / ANALYSIS_DIR,
                description=f"resic analyze on {data}", texts={"analysis/report": text})
    return report
