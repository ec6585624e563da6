"""Early-exit policies: when a row may stop at an exit, per task, and their calibration to an
accuracy budget on validation rows.

A policy decides, for each task, the first exit (0-based, shallow to deep, the LC last) at which
a row stops; the row leaves the backbone when every task has stopped, and every policy falls back
to the LC when nothing fires.

    length      the paper's gate: the exit chosen for the text's length bucket (`gate.json`)
    confidence  the first exit whose top probability reaches the threshold (SDN)
    entropy     the first exit whose entropy / log(classes) is at or below it (DeeBERT, FastBERT)
    patience    the first exit at which the predicted class has stayed the same for `t`
                consecutive exits (PABEE; `t` = 0 stops at the first exit)
    hybrid      confidence, with one threshold per length bucket (the paper's idea and SDN's)

`policy_exits` applies a policy to all-exit probabilities in numpy; the served graph
(`resic_tf.export`) makes the same decisions with TensorFlow ops while it runs, so its outputs
equal `policy_exits` applied to the `all_exits` signature row by row. `calibrate_policy`
chooses thresholds on validation rows so that each task's score stays within `budget` points of
its LC's while the fewest FLOPs (`resic_tf.flops.policy_flops`) are spent.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from resic_tf.config import ResICConfig
from resic_tf.flops import full_flops, policy_flops, reach_flops
from resic_tf.gate import DEFAULT_MIN_SUPPORT, LengthGate, bucket_of, num_buckets
from resic_tf.io import atomic_write_text, json_safe, load_json_as
from resic_tf.metrics import METRICS, accuracy, macro_f1, score
from resic_tf.validation import InvalidValueError, check_choice, check_scalar

POLICIES = ("length", "confidence", "entropy", "patience", "hybrid")
# Policies that decide from an exit's probabilities (the length gate knows its exit in advance).
DYNAMIC = ("confidence", "entropy", "patience", "hybrid")
DEFAULT_BUDGET = 0.5


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """A calibrated policy: `thresholds[task]` holds one value (confidence, entropy, patience)
    or one per length bucket (hybrid: confidence thresholds; length: exit indices).

    `calibration` keeps the figures that chose it (validation scores, mean exit, FLOPs), for
    `policy.json` readers and `export.json`.
    """

    name: str
    exits: Mapping[str, Sequence[str]]
    thresholds: Mapping[str, Sequence[float]]
    bucket_width: int = 10
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_choice(self.name, "name", POLICIES)
        check_scalar(self.bucket_width, "bucket_width", int, min_val=1)
        for task, values in self.thresholds.items():
            bucketed = self.name in ("length", "hybrid")
            if not bucketed and len(values) != 1:
                raise InvalidValueError(f"policy {self.name!r} takes one threshold per task. "
                                        f"Received: {task}={list(values)}")
            if bucketed and len(values) < 1:
                raise InvalidValueError(f"policy {self.name!r} takes one value per length "
                                        f"bucket. Received: {task}=[]")

    def check(self, config: ResICConfig) -> None:
        """Refuse a policy made for another model: tasks, exits and buckets must match."""
        if list(self.exits) != list(config.tasks):
            raise InvalidValueError(f"the {self.name} policy is for tasks {list(self.exits)}, "
                                    f"the model has {list(config.tasks)}; re-run `resic "
                                    f"calibrate --policy {self.name}`")
        for task in config.tasks:
            if list(self.exits[task]) != config.exit_names(task):
                raise InvalidValueError(f"the {self.name} policy's exits for {task!r} do not match "
                                        f"the model's; re-run `resic calibrate --policy "
                                        f"{self.name}`")
            if self.name in ("length", "hybrid") and len(self.thresholds[task]) != \
                    num_buckets(config.max_len, self.bucket_width):
                raise InvalidValueError(f"the {self.name} policy has {len(self.thresholds[task])} "
                                        f"buckets for {task!r}; max_len {config.max_len} needs "
                                        f"{num_buckets(config.max_len, self.bucket_width)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bucket_width": self.bucket_width,
                "exits": {t: list(e) for t, e in self.exits.items()},
                "thresholds": {t: [float(v) for v in vs] for t, vs in self.thresholds.items()},
                "calibration": json_safe(dict(self.calibration), 6)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExitPolicy":
        return cls(d["name"], {t: list(e) for t, e in d["exits"].items()},
                   {t: [float(v) for v in vs] for t, vs in d["thresholds"].items()},
                   int(d.get("bucket_width", 10)), d.get("calibration", {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExitPolicy":
        return load_json_as(path, cls.from_dict, "policy", "`resic calibrate --policy ...`")

    @classmethod
    def from_gate(cls, gate: LengthGate) -> "ExitPolicy":
        """The paper's length gate as a policy (its exits per bucket)."""
        return cls("length", {t: list(e) for t, e in gate.exits.items()},
                   {t: [float(c) for c in gate.choice[t]] for t in gate.exits},
                   gate.bucket_width, {"source": "gate.json"})


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the last axis divided by log(classes): 0 (one-hot) to 1 (uniform), float32 as
    the served graph computes it."""
    p = np.asarray(probs, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, np.float32(1))), np.float32(0))
    return (-plogp.sum(-1) / np.float32(np.log(p.shape[-1]))).astype(np.float32)


def patience_counts(probs: np.ndarray) -> np.ndarray:
    """`(n, exits)`: how many exits in a row, ending at each exit, repeated the previous exit's
    predicted class (0 at the first exit and after any change)."""
    pred = np.asarray(probs).argmax(-1)
    counts = np.zeros(pred.shape, np.int64)
    for e in range(1, pred.shape[1]):
        counts[:, e] = np.where(pred[:, e] == pred[:, e - 1], counts[:, e - 1] + 1, 0)
    return counts


def fires(name: str, probs: np.ndarray, threshold) -> np.ndarray:
    """`(n, exits)` bool: where the policy would stop a row of one task (the LC always fires).

    `threshold`: a scalar, or one per row (`(n,)`, hybrid). Not for `length` (it needs no
    probabilities: see `policy_exits`).
    """
    probs = np.asarray(probs, np.float32)
    t = np.asarray(threshold, np.float64)
    t = t[:, None] if t.ndim == 1 else t
    if name in ("confidence", "hybrid"):
        fired = probs.max(-1) >= t
    elif name == "entropy":
        fired = normalised_entropy(probs) <= t
    elif name == "patience":
        fired = patience_counts(probs) >= t
    else:
        raise InvalidValueError(f"fires() takes a policy that reads probabilities "
                                f"{DYNAMIC}. Received: name={name!r}")
    fired = fired.copy()
    fired[:, -1] = True
    return fired


def policy_exits(policy: ExitPolicy, probs: Mapping[str, np.ndarray],
                 lengths) -> dict[str, np.ndarray]:
    """Task -> `(n,)` 0-based exit at which each row stops under `policy`."""
    lengths = np.asarray(lengths)
    out = {}
    for task, values in policy.thresholds.items():
        p = np.asarray(probs[task])
        table = np.asarray(values, np.float64)
        if policy.name == "length":
            out[task] = table.astype(np.int64)[bucket_of(lengths, policy.bucket_width,
                                                         len(table))]
            continue
        t = table[bucket_of(lengths, policy.bucket_width, len(table))] \
            if policy.name == "hybrid" else table[0]
        out[task] = np.argmax(fires(policy.name, p, t), axis=1).astype(np.int64)
    return out


def apply_policy(policy: ExitPolicy, probs: Mapping[str, np.ndarray], lengths
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Apply `policy`: (task -> probabilities `(n, classes)` at its exit, task -> 0-based exit
    `(n,)`, blocks run per row `(n,)`: one more than the deepest exit over the tasks)."""
    exits = policy_exits(policy, probs, lengths)
    chosen = {t: np.take_along_axis(np.asarray(probs[t]), e[:, None, None], axis=1)[:, 0]
              for t, e in exits.items()}
    blocks = np.max(np.stack(list(exits.values())), axis=0) + 1
    return chosen, exits, blocks


def policy_summary(config: ResICConfig, policy: ExitPolicy, probs: Mapping[str, np.ndarray],
                   labels: Mapping[str, np.ndarray], lengths) -> dict[str, Any]:
    """Scores and cost of `policy` on labelled rows: per task accuracy, macro-F1, the LC's and the
    mean exit (1-based); overall mean blocks run, mean FLOPs per row, full-depth FLOPs and the
    share saved."""
    chosen, exits, blocks = apply_policy(policy, probs, lengths)
    cost = policy_flops(config, lengths, exits)
    full = full_flops(config, lengths).astype(np.float64)
    tasks = {}
    for task, classes in config.tasks.items():
        y = np.asarray(labels[task]).reshape(-1)
        pred = chosen[task].argmax(-1)
        lc = np.asarray(probs[task])[:, -1].argmax(-1)
        tasks[task] = {"accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred, len(classes)),
                       "lc_accuracy": accuracy(y, lc), "lc_macro_f1": macro_f1(y, lc, len(classes)),
                       "mean_exit": float(exits[task].mean() + 1) if len(y) else float("nan")}
    n = len(blocks)
    return {"rows": n, "tasks": tasks,
            "mean_blocks_run": float(blocks.mean()) if n else float("nan"),
            "mean_flops": float(cost.mean()) if n else float("nan"),
            "full_flops": float(full.mean()) if n else float("nan"),
            "saved": float(1 - cost.sum() / full.sum()) if n else float("nan")}


def _candidates(values: np.ndarray, never: float, n: int = 200) -> np.ndarray:
    """Thresholds between consecutive distinct quantiles of `values` (never equal to a value
    seen, so float rounding cannot flip a decision), and `never`, which fires nowhere."""
    v = np.unique(np.quantile(values.astype(np.float64), np.linspace(0, 1, n + 1)))
    mids = (v[:-1] + v[1:]) / 2 if len(v) > 1 else v
    return np.concatenate([[v[0] - 1e-6], mids, [never]])


def calibrate_policy(config: ResICConfig, name: str, probs: Mapping[str, np.ndarray],
                     labels: Mapping[str, np.ndarray], lengths, budget: float = DEFAULT_BUDGET,
                     metric: str = "macro_f1", bucket_width: int = 10,
                     min_support: int = DEFAULT_MIN_SUPPORT,
                     gate: LengthGate | None = None) -> ExitPolicy:
    """Choose `name`'s thresholds on validation rows (never the test rows).

    For each task: among the candidate thresholds whose `metric` stays within `budget` points
    (0.5 = half a point of macro-F1) of the LC's, the one with the lowest mean cost of the blocks
    up to the task's exit; ties go to the better score. `hybrid` starts from the calibrated
    confidence threshold and lowers, bucket by bucket (buckets with at least `min_support`
    rows, largest first), each bucket's threshold as far as the whole task's score stays within
    the budget. `length` is the gate (`gate`, chosen by `resic_tf.gate.calibrate`; the budget
    does not apply).
    """
    check_choice(name, "policy", POLICIES)
    check_choice(metric, "metric", METRICS)
    budget = check_scalar(budget, "budget", (int, float), min_val=0)
    lengths = np.asarray(lengths)
    if name == "length":
        if gate is None:
            raise InvalidValueError("the length policy is the gate: run `resic calibrate` "
                                    "(without --policy) first")
        policy = ExitPolicy.from_gate(gate)
    else:
        cost = reach_flops(config, lengths)
        thresholds = {}
        for task, classes in config.tasks.items():
            p = np.asarray(probs[task], np.float32)
            y = np.asarray(labels[task]).reshape(-1)
            if len(y) == 0:
                raise ValueError("calibration data is empty")
            thresholds[task] = _task_thresholds(name, config, p, y, len(classes), lengths, cost,
                                                budget, metric, bucket_width, min_support)
        policy = ExitPolicy(name, {t: config.exit_names(t) for t in config.tasks}, thresholds,
                            bucket_width)
    summary = policy_summary(config, policy, probs, labels, lengths)
    return dataclasses.replace(policy, calibration={
        "budget_points": float(budget), "metric": metric, "validation": summary,
        **({} if name == "length" else {"min_support": min_support})})


def _task_thresholds(name, config, p, y, n_classes, lengths, cost, budget, metric,
                     bucket_width, min_support) -> list[float]:
    target = score(y, p[:, -1].argmax(-1), n_classes, metric) - budget / 100
    pred = p.argmax(-1)
    rows = np.arange(len(y))

    def evaluate(fired):
        e = np.argmax(fired, axis=1)
        return score(y, pred[rows, e], n_classes, metric), float(cost[rows, e].mean()), e

    base = "confidence" if name == "hybrid" else name
    if base == "patience":
        grid = np.arange(config.num_exits + 1, dtype=np.float64)
    elif base == "confidence":
        grid = _candidates(p.max(-1), never=2.0)
    else:
        grid = _candidates(normalised_entropy(p), never=-1.0)[::-1]
    best = None
    for t in grid:
        s, c, _ = evaluate(fires(base, p, t))
        if s >= target - 1e-12 and (best is None or (c, -s) < (best[1], -best[2])):
            best = (t, c, s)
    if best is None:  # never firing is the LC itself, which always meets the target
        best = (grid[-1], 0.0, 0.0)
    if name != "hybrid":
        return [float(best[0])]
    n_b = num_buckets(config.max_len, bucket_width)
    buckets = bucket_of(lengths, bucket_width, n_b)
    table = np.full(n_b, best[0], np.float64)
    order = sorted(range(n_b), key=lambda b: -int((buckets == b).sum()))
    for b in order:
        if (buckets == b).sum() < min_support:
            continue
        for t in grid:  # lowest first: the cheapest that keeps the whole task within budget
            if t >= table[b]:
                break
            trial = table.copy()
            trial[b] = t
            s, _, _ = evaluate(fires("hybrid", p, trial[buckets]))
            if s >= target - 1e-12:
                table[b] = t
                break
    return [float(v) for v in table]


def sweep(config: ResICConfig, name: str, probs: Mapping[str, np.ndarray],
          labels: Mapping[str, np.ndarray], lengths, points: int = 24) -> list[dict[str, Any]]:
    """Accuracy and macro-F1 against cost as one threshold sweeps (every task the same
    threshold; `patience` every `t`): the accuracy-versus-FLOPs curve SDN and FastBERT publish.
    Rows: policy, threshold, task, accuracy, macro_f1, mean_exit, flops_share."""
    check_choice(name, "policy", ("confidence", "entropy", "patience"))
    lengths = np.asarray(lengths)
    if name == "patience":
        grid = np.arange(config.num_exits, dtype=np.float64)
    elif name == "confidence":
        grid = np.concatenate([np.linspace(0, 0.9, points // 2, endpoint=False),
                               1 - np.logspace(-1, -4, points - points // 2)])
    else:
        grid = np.concatenate([np.logspace(-4, -1, points // 2), np.linspace(0.1, 1, points
                                                                           - points // 2)])
    out = []
    for t in grid:
        policy = ExitPolicy(name, {k: config.exit_names(k) for k in config.tasks},
                            {k: [float(t)] for k in config.tasks})
        s = policy_summary(config, policy, probs, labels, lengths)
        for task, r in s["tasks"].items():
            out.append({"policy": name, "threshold": float(t), "task": task,
                        "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                        "mean_exit": r["mean_exit"], "flops_share": 1 - s["saved"]})
    return out


def policy_markdown(policy: ExitPolicy) -> str:
    """The policy and its calibration figures as Markdown: per task the threshold(s), LC and
    policy macro-F1 and mean exit on the calibration rows; then mean blocks and FLOPs saved."""
    from resic_tf.markdown import fmt, markdown_table
    v = policy.calibration.get("validation", {})
    rows = []
    for task, values in policy.thresholds.items():
        r = v.get("tasks", {}).get(task, {})
        shown = ", ".join(f"{x:g}" for x in values) if len(values) <= 4 else \
            f"{len(values)} buckets: {min(values):g} .. {max(values):g}"
        rows.append([task, shown, fmt(r.get("lc_macro_f1", float("nan"))),
                     fmt(r.get("macro_f1", float("nan"))), f"{r.get('mean_exit', float('nan')):.2f}"])
    table = markdown_table([f"task ({policy.name})", "threshold", "LC macro-F1",
                            "policy macro-F1", "mean exit"], rows)
    if not v:
        return table
    return (table + f"\n\n{v['rows']} rows; mean blocks run {v['mean_blocks_run']:.2f}; "
            f"FLOPs {v['mean_flops'] / 1e6:.2f}M of {v['full_flops'] / 1e6:.2f}M per row "
            f"({100 * v['saved']:.1f}% saved)")
