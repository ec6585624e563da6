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

A late-fusion model (`ResICConfig.late_fusion`) has an exit 0 before the first block: its wide
classifier (`{task}_wide`, a bag of n-grams that needs neither the stem nor any block). Every
policy but `length` may stop there, with a threshold of its own per task
(`ExitPolicy.wide_thresholds`; on by default for such models): a row stops at exit 0 when the
wide classifier's top probability reaches it (`entropy`: its normalised entropy is at or below
it), whatever the policy does at the blocks' exits. The wide classifier is weaker than the
blocks' exits it is mixed into, so sharing their threshold would stop rows there that a deeper
exit gets right; calibration first chooses the blocks' thresholds, then lowers the wide one
while the budget holds. The exit returned for it is -1 (0 blocks run). Probabilities come as
`probs[task]` `(n, exits, classes)` and, for exit 0, `probs[wide_exit_name(task)]` `(n,
classes)` (what `resic_tf.run.predict_exits` returns for such a model).

`policy_exits` applies a policy to all-exit probabilities in numpy; the served graph
(`resic_tf.export`) makes the same decisions with TensorFlow ops while it runs, so its outputs
equal `policy_exits` applied to the `all_exits` signature row by row. `calibrate_policy`
chooses thresholds on validation rows so that each task's score stays within `budget` points of
its LC's while the fewest FLOPs (`resic_tf.flops.policy_flops`) are spent.

Validation sets are small (korean-hate-speech: 790 rows), and the cheapest of some 200 thresholds
that meets the budget there is the one whose luck is best: on held-out rows the policies so chosen
lost 0.4-2.5 points on average at a budget of 0.5 (docs/MEASURED.md). So by default
(`confidence` 0.9) a threshold must also meet the budget on a paired bootstrap of the validation
rows (`PairedBootstrap`): the rows are resampled with replacement (`resamples` times, seeded),
each resample scores the policy and the LC on the same rows, and the `1 - confidence` quantile
of the difference (the 10th-percentile-worst resample at 0.9) must stay within the budget. The
search comes down from the LC towards cheaper thresholds and stops at the first one that fails
(a fixed sequence, so a cheap threshold that passes only by luck after a dearer one failed is
never taken); the hybrid's per-bucket steps must besides leave the task no worse than before
them. `confidence=0` is the plain criterion (the point score alone, the cheapest that passes).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from resic_tf.config import ResICConfig, wide_exit_name
from resic_tf.flops import full_flops, policy_flops, reach_flops
from resic_tf.gate import DEFAULT_MIN_SUPPORT, LengthGate, bucket_of, num_buckets
from resic_tf.io import atomic_write_text, json_safe, load_json_as
from resic_tf.metrics import METRICS, accuracy, macro_f1, score
from resic_tf.validation import InvalidValueError, check_choice, check_scalar

POLICIES = ("length", "confidence", "entropy", "patience", "hybrid")
# Policies that decide from an exit's probabilities (the length gate knows its exit in advance).
DYNAMIC = ("confidence", "entropy", "patience", "hybrid")
DEFAULT_BUDGET = 0.5
# The bootstrap criterion's defaults (`calibrate_policy`; confidence 0 turns it off).
DEFAULT_CONFIDENCE = 0.9
DEFAULT_RESAMPLES = 500
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """A calibrated policy: `thresholds[task]` holds one value (confidence, entropy, patience)
    or one per length bucket (hybrid: confidence thresholds; length: exit indices).

    `calibration` keeps the figures that chose it (validation scores, mean exit, FLOPs), for
    `policy.json` readers and `export.json`. `wide_thresholds[task]`: the threshold at which
    rows stop at the wide classifier before the first block (exit -1; late-fusion models only,
    never the `length` policy; empty: no wide exit).
    """

    name: str
    exits: Mapping[str, Sequence[str]]
    thresholds: Mapping[str, Sequence[float]]
    bucket_width: int = 10
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    wide_thresholds: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_choice(self.name, "name", POLICIES)
        check_scalar(self.bucket_width, "bucket_width", int, min_val=1)
        if self.wide_thresholds and self.name == "length":
            raise InvalidValueError("the length policy (the gate) chooses among the blocks' "
                                    "exits only. Received: wide_thresholds="
                                    f"{dict(self.wide_thresholds)}")
        if self.wide_thresholds and set(self.wide_thresholds) != set(self.thresholds):
            raise InvalidValueError(f"wide_thresholds needs one value per task "
                                    f"{list(self.thresholds)}. Received: wide_thresholds="
                                    f"{dict(self.wide_thresholds)}")
        for task, values in self.thresholds.items():
            bucketed = self.name in ("length", "hybrid")
            if not bucketed and len(values) != 1:
                raise InvalidValueError(f"policy {self.name!r} takes one threshold per task. "
                                        f"Received: {task}={list(values)}")
            if bucketed and len(values) < 1:
                raise InvalidValueError(f"policy {self.name!r} takes one value per length "
                                        f"bucket. Received: {task}=[]")

    @property
    def wide_exit(self) -> bool:
        """True when rows may stop at the wide classifier (exit 0)."""
        return bool(self.wide_thresholds)

    def check(self, config: ResICConfig) -> None:
        """Refuse a policy made for another model: tasks, exits and buckets must match."""
        if self.wide_exit and not config.late_fusion:
            raise InvalidValueError(f"the {self.name} policy stops rows at the wide classifier, "
                                    f"which only a late-fusion model has (wide_fusion='late'); "
                                    f"re-run `resic calibrate --policy {self.name}`")
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
                "wide_thresholds": {t: float(v) for t, v in self.wide_thresholds.items()},
                "exits": {t: list(e) for t, e in self.exits.items()},
                "thresholds": {t: [float(v) for v in vs] for t, vs in self.thresholds.items()},
                "calibration": json_safe(dict(self.calibration), 6)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExitPolicy":
        return cls(d["name"], {t: list(e) for t, e in d["exits"].items()},
                   {t: [float(v) for v in vs] for t, vs in d["thresholds"].items()},
                   int(d.get("bucket_width", 10)), d.get("calibration", {}),
                   {t: float(v) for t, v in d.get("wide_thresholds", {}).items()})  # none before 0.8

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


def wide_probabilities(probs: Mapping[str, np.ndarray], task: str) -> np.ndarray:
    """`(n, classes)`: the wide classifier's probabilities for `task` (exit 0), with a clear
    error when `probs` lack them."""
    key = wide_exit_name(task)
    if key not in probs:
        raise InvalidValueError(f"a policy with the wide exit needs the wide classifier's "
                                f"probabilities ({key!r}); predict with "
                                f"`resic_tf.run.predict_exits` on a late-fusion model")
    return np.asarray(probs[key], np.float32)


def wide_statistic(name: str, probs: np.ndarray) -> np.ndarray:
    """`(n,)`: what the wide exit's threshold is compared with: the normalised entropy under
    `entropy`, else the top probability (`wide_fires`)."""
    return exit_statistic("entropy" if name == "entropy" else "confidence", probs)


def wide_fires(name: str, probs: np.ndarray, threshold: float) -> np.ndarray:
    """`(n,)` bool: the rows that stop at the wide exit (entropy at or below the threshold, or
    top probability at or above it)."""
    stat = wide_statistic(name, probs)
    return stat <= threshold if name == "entropy" else stat >= threshold


def has_wide_exit(config: ResICConfig, probs: Mapping[str, np.ndarray]) -> bool:
    """True when the model has exit 0 and `probs` hold its probabilities for every task."""
    return config.late_fusion and all(wide_exit_name(t) in probs for t in config.tasks)


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


def exit_statistic(name: str, probs: np.ndarray) -> np.ndarray:
    """`(n, exits)`: what `name`'s threshold is compared with at each exit (top probability,
    normalised entropy, or patience count)."""
    probs = np.asarray(probs, np.float32)
    if name in ("confidence", "hybrid"):
        return probs.max(-1)
    if name == "entropy":
        return normalised_entropy(probs)
    if name == "patience":
        return patience_counts(probs)
    raise InvalidValueError(f"exit_statistic() takes a policy that reads probabilities "
                            f"{DYNAMIC}. Received: name={name!r}")


def fires_on(name: str, statistic: np.ndarray, threshold) -> np.ndarray:
    """`fires` on a precomputed `exit_statistic(name, probs)`."""
    t = np.asarray(threshold, np.float64)
    t = t[:, None] if t.ndim == 1 else t
    fired = statistic <= t if name == "entropy" else statistic >= t
    fired[:, -1] = True
    return fired


def fires(name: str, probs: np.ndarray, threshold) -> np.ndarray:
    """`(n, exits)` bool: where the policy would stop a row of one task (the LC always fires).

    `threshold`: a scalar, or one per row (`(n,)`, hybrid). Not for `length` (it needs no
    probabilities: see `policy_exits`).
    """
    return fires_on(name, exit_statistic(name, probs), threshold)


def policy_exits(policy: ExitPolicy, probs: Mapping[str, np.ndarray],
                 lengths) -> dict[str, np.ndarray]:
    """Task -> `(n,)` 0-based exit at which each row stops under `policy` (-1: the wide
    classifier, when `policy.wide_exit`)."""
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
        if policy.wide_exit:
            stop = wide_fires(policy.name, wide_probabilities(probs, task),
                              policy.wide_thresholds[task])
            out[task] = np.where(stop, -1, out[task])
    return out


def apply_policy(policy: ExitPolicy, probs: Mapping[str, np.ndarray], lengths
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Apply `policy`: (task -> probabilities `(n, classes)` at its exit, task -> 0-based exit
    `(n,)` (-1: the wide exit), blocks run per row `(n,)`: one more than the deepest exit over
    the tasks, 0 when every task stopped at the wide classifier)."""
    exits = policy_exits(policy, probs, lengths)
    chosen = {}
    for t, e in exits.items():
        at = np.take_along_axis(np.asarray(probs[t]), np.maximum(e, 0)[:, None, None],
                                axis=1)[:, 0]
        chosen[t] = np.where((e < 0)[:, None], wide_probabilities(probs, t), at) \
            if policy.wide_exit else at
    blocks = np.max(np.stack(list(exits.values())), axis=0) + 1
    return chosen, exits, blocks


def policy_summary(config: ResICConfig, policy: ExitPolicy, probs: Mapping[str, np.ndarray],
                   labels: Mapping[str, np.ndarray], lengths) -> dict[str, Any]:
    """Scores and cost of `policy` on labelled rows: per task accuracy, macro-F1, the LC's and
    the mean exit (1-based; the wide exit counts 0); overall mean blocks run, mean FLOPs per
    row, full-depth FLOPs and the share saved."""
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


def bootstrap_counts(n: int, resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """`(n, resamples)` int32: how often each of `n` rows is drawn in each resample of `n` rows
    with replacement (a multinomial count matrix; column sums are `n`). Deterministic in
    `seed`; one `bincount` per resample, never a loop over rows."""
    rng = np.random.default_rng(seed)
    counts = np.empty((n, resamples), np.int32)
    for b in range(resamples):
        counts[:, b] = np.bincount(rng.integers(0, n, n), minlength=n)
    return counts


def _group(counts: np.ndarray, rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """`(k, resamples)`: per key, the summed resample counts of `rows` (keys in [0, k))."""
    out = np.zeros((k, counts.shape[1]), np.int64)
    if len(rows):
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        out[sorted_keys[starts]] = np.add.reduceat(counts[rows[order]], starts, axis=0)
    return out


def worst_quantile(differences: np.ndarray, confidence: float) -> float:
    """The `1 - confidence` quantile of bootstrap differences: what all but the worst `1 -
    confidence` of the resamples reach (the bootstrap criterion's one statistic)."""
    return float(np.quantile(differences, 1 - confidence))


class PairedBootstrap:
    """One task's validation rows resampled (`counts`, from `bootstrap_counts`): per resample the
    score of a prediction minus the LC's on the same resampled rows.

    Works on per-class sums (true positives, true and predicted counts, each `(classes,
    resamples)`), updated only over the rows whose prediction differs from the LC's, so one
    evaluation costs O(changed rows x resamples) whatever the number of classes.
    """

    def __init__(self, counts: np.ndarray, y, lc_pred, n_classes: int,
                 metric: str = "macro_f1"):
        self.counts, self.k, self.metric = counts, n_classes, metric
        self.y = np.asarray(y, np.int64).reshape(-1)
        self.lc = np.asarray(lc_pred, np.int64).reshape(-1)
        if counts.shape[0] != len(self.y):
            raise ValueError(f"bootstrap counts for {counts.shape[0]} rows, labels for "
                             f"{len(self.y)}")
        rows = np.arange(len(self.y))
        self.true = _group(counts, rows, self.y, n_classes)
        hit = rows[self.lc == self.y]
        self.lc_tp = _group(counts, hit, self.y[hit], n_classes)
        self.lc_pc = _group(counts, rows, self.lc, n_classes)
        self.lc_score = self._score(self.lc_tp, self.lc_pc)
        self._last = None  # (prediction, tp, pc) of the previous `differences` call

    def _score(self, tp, pc) -> np.ndarray:
        if self.metric == "accuracy":
            return tp.sum(0) / self.true.sum(0)
        denom = self.true + pc  # 2TP + FP + FN
        present = denom > 0  # a class absent from labels and predictions has no F1
        f1 = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
        return f1.sum(0) / present.sum(0)

    def differences(self, pred) -> np.ndarray:
        """`(resamples,)`: `metric` of `pred` minus the LC's, per resample (score units, 0..1).

        Updated from the LC's sums or from the previous call's, whichever differs from `pred`
        on fewer rows (a calibration sweep moves a few rows per step); the sums are integers,
        so the result does not depend on the path."""
        pred = np.asarray(pred, np.int64).reshape(-1)
        ref, tp, pc = self.lc, self.lc_tp, self.lc_pc
        changed = np.flatnonzero(pred != ref)
        if self._last is not None:
            from_last = np.flatnonzero(pred != self._last[0])
            if len(from_last) < len(changed):
                (ref, tp, pc), changed = self._last, from_last
        y, new, old = self.y[changed], pred[changed], ref[changed]
        gained, lost = changed[new == y], changed[old == y]
        tp = tp + _group(self.counts, gained, self.y[gained], self.k) \
            - _group(self.counts, lost, self.y[lost], self.k)
        pc = pc + _group(self.counts, changed, new, self.k) \
            - _group(self.counts, changed, old, self.k)
        self._last = (pred, tp, pc)
        return self._score(tp, pc) - self.lc_score

    def lower_bound(self, pred, confidence: float) -> float:
        """The `1 - confidence` quantile of `differences(pred)`: the difference that all but
        the worst `1 - confidence` of the resamples reach."""
        return worst_quantile(self.differences(pred), confidence)


def calibrate_policy(config: ResICConfig, name: str, probs: Mapping[str, np.ndarray],
                     labels: Mapping[str, np.ndarray], lengths, budget: float = DEFAULT_BUDGET,
                     metric: str = "macro_f1", bucket_width: int = 10,
                     min_support: int = DEFAULT_MIN_SUPPORT,
                     gate: LengthGate | None = None, confidence: float = DEFAULT_CONFIDENCE,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     wide_exit: bool | None = None) -> ExitPolicy:
    """Choose `name`'s thresholds on validation rows (never the test rows), per task.

    A threshold meets the budget when its `metric` on the rows is within `budget` points (0.5 =
    half a point of macro-F1) of the LC's and, unless `confidence` (or `resamples`) is 0, when
    the `1 - confidence` quantile of the paired bootstrap difference (policy minus LC on the
    same resampled rows: `resamples` resamples drawn with `seed`, `PairedBootstrap`) is too.

    Plain criterion (`confidence=0`, the behaviour before the bootstrap): the threshold that
    meets the budget at the lowest mean cost of the blocks up to the task's exit (ties: the
    better score). `hybrid` starts from the calibrated confidence threshold and lowers, bucket by
    bucket (buckets with at least `min_support` rows, largest first), each bucket's threshold to
    the lowest at which the whole task still meets the budget.

    Bootstrap criterion: the thresholds are tried from the LC towards the cheapest and the last
    one before the first that fails is taken (a fixed sequence); `hybrid` lowers each bucket's
    threshold the same way, step by step, while the task meets the budget and each step leaves
    it no worse than before in all but `1 - confidence` of the resamples. It never takes a
    threshold the plain criterion rejects. The chosen policy's bound and median difference go
    to `calibration["bootstrap"]`.

    `length` is the gate (`gate`, chosen by `resic_tf.gate.calibrate`; the budget does not
    apply).

    `wide_exit`: whether rows may stop at a late-fusion model's wide classifier, before the
    first block (default: when `probs` hold its probabilities, `has_wide_exit`; never for
    `length`). Its threshold is chosen after the blocks' (`_wide_threshold`): from "never",
    lowered by the same criterion while the task meets the budget, so the wide exit only adds
    savings to what the blocks' thresholds save. Its cost is the wide branch alone, which every
    row pays anyway.
    """
    check_choice(name, "policy", POLICIES)
    check_choice(metric, "metric", METRICS)
    budget = check_scalar(budget, "budget", (int, float), min_val=0)
    confidence = check_scalar(confidence, "confidence", float, min_val=0, max_val=1,
                              include_boundaries="left")
    resamples = check_scalar(resamples, "resamples", int, min_val=0)
    seed = check_scalar(seed, "seed", int, min_val=0)
    use_bootstrap = name != "length" and confidence > 0 and resamples > 0
    if wide_exit is None:
        wide_exit = name != "length" and has_wide_exit(config, probs)
    lengths = np.asarray(lengths)
    bounds = {}
    if name == "length":
        if gate is None:
            raise InvalidValueError("the length policy is the gate: run `resic calibrate` "
                                    "(without --policy) first")
        policy = ExitPolicy.from_gate(gate)
    else:
        cost = reach_flops(config, lengths)
        counts = bootstrap_counts(len(lengths), resamples, seed) if use_bootstrap else None
        thresholds, wide_thresholds = {}, {}
        for task, classes in config.tasks.items():
            p = np.asarray(probs[task], np.float32)
            y = np.asarray(labels[task]).reshape(-1)
            if len(y) == 0:
                raise ValueError("calibration data is empty")
            boot = PairedBootstrap(counts, y, p[:, -1].argmax(-1), len(classes), metric) \
                if use_bootstrap else None
            thresholds[task] = _task_thresholds(name, config, p, y, len(classes), lengths, cost,
                                                budget, metric, bucket_width, min_support,
                                                boot, confidence)
            if wide_exit:
                blocks_only = ExitPolicy(name, {task: config.exit_names(task)},
                                         {task: thresholds[task]}, bucket_width)
                exits = policy_exits(blocks_only, probs, lengths)[task]
                wide_thresholds[task] = _wide_threshold(
                    name, wide_probabilities(probs, task), p.argmax(-1)[np.arange(len(y)), exits],
                    cost[np.arange(len(y)), exits], y, len(classes),
                    score(y, p[:, -1].argmax(-1), len(classes), metric) - budget / 100, budget,
                    metric, boot, confidence)
            if boot is not None:
                policy = ExitPolicy(name, {task: config.exit_names(task)},
                                    {task: thresholds[task]}, bucket_width,
                                    wide_thresholds={task: wide_thresholds[task]}
                                    if wide_exit else {})
                chosen, _, _ = apply_policy(policy, probs, lengths)
                d = boot.differences(chosen[task].argmax(-1))
                bounds[task] = {"lower_bound_points": 100 * worst_quantile(d, confidence),
                                "median_points": 100 * float(np.median(d))}
        policy = ExitPolicy(name, {t: config.exit_names(t) for t in config.tasks}, thresholds,
                            bucket_width, wide_thresholds=wide_thresholds)
    summary = policy_summary(config, policy, probs, labels, lengths)
    criterion = {}
    if name != "length":
        criterion = {"criterion": "bootstrap" if use_bootstrap else "point"}
        if use_bootstrap:
            criterion["bootstrap"] = {"confidence": float(confidence), "resamples": resamples,
                                      "seed": seed, "paired": True, "tasks": bounds}
    return dataclasses.replace(policy, calibration={
        "budget_points": float(budget), "metric": metric, **criterion, "validation": summary,
        **({} if name == "length" else {"min_support": min_support})})


def _cheapest_passing(grid, evaluate_at, target):
    """The plain criterion: the threshold of `grid` meeting `target` at the lowest mean cost
    (ties: the better score, then the earlier); `grid[-1]` (the LC, which always meets it) when
    none does. `evaluate_at(t)` -> (score, mean cost, predictions)."""
    passing = []  # (cost, -score, grid index) of the thresholds meeting the budget
    for i, t in enumerate(grid):
        s, c, _ = evaluate_at(t)
        if s >= target - 1e-12:
            passing.append((c, -s, i))
    return grid[min(passing)[2]] if passing else grid[-1]


def _descend(grid, evaluate_at, target, budget, boot: PairedBootstrap, confidence):
    """The bootstrap criterion: from `grid[-1]` (fires nowhere) towards `grid[0]`, the last
    threshold before the first that misses `target` on the rows or the budget in the bootstrap
    bound (a fixed sequence: a cheap threshold that passes after a dearer one failed is a lucky
    one, never taken)."""
    floor = -budget / 100 - 1e-12
    best = grid[-1]
    for t in grid[-2::-1]:
        s, _, chosen = evaluate_at(t)
        if not (s >= target - 1e-12 and boot.lower_bound(chosen, confidence) >= floor):
            break
        best = t
    return best


def _wide_threshold(name, wide_p, block_pred, block_cost, y, n_classes, target, budget, metric,
                    boot: PairedBootstrap | None, confidence: float) -> float:
    """The wide exit's threshold for one task, the blocks' exits fixed (`block_pred`, and
    `block_cost` per row): the plain criterion takes the cheapest that keeps the task's score at
    `target` (the LC's less the budget) or above; the bootstrap one lowers it from "never" while
    the task meets the budget on the rows and in the bootstrap bound, stopping at the first
    that fails."""
    stat = wide_statistic(name, wide_p)
    grid = _candidates(stat, never=-1.0)[::-1] if name == "entropy" else \
        _candidates(stat, never=2.0)  # grid[0] fires the most, grid[-1] nowhere
    wide_pred = wide_p.argmax(-1)

    def evaluate(t):
        fire = wide_fires(name, wide_p, t)
        pred = np.where(fire, wide_pred, block_pred)
        return score(y, pred, n_classes, metric), float(np.where(fire, 0, block_cost).mean()), pred

    if boot is None:
        return float(_cheapest_passing(grid, evaluate, target))
    return float(_descend(grid, evaluate, target, budget, boot, confidence))


def _task_thresholds(name, config, p, y, n_classes, lengths, cost, budget, metric,
                     bucket_width, min_support, boot: PairedBootstrap | None = None,
                     confidence: float = 0.0) -> list[float]:
    """One task's thresholds: the plain criterion (`boot` None) or the bootstrap one
    (`calibrate_policy` describes both)."""
    target = score(y, p[:, -1].argmax(-1), n_classes, metric) - budget / 100
    pred = p.argmax(-1)
    rows = np.arange(len(y))
    base = "confidence" if name == "hybrid" else name
    stat = exit_statistic(base, p)  # once per task: each threshold is then one comparison

    def evaluate(e):
        """(score, mean cost, predictions) of the rows stopping at exits `e`."""
        chosen = pred[rows, e]
        return score(y, chosen, n_classes, metric), float(cost[rows, e].mean()), chosen

    def exits(t, where=rows):
        return np.argmax(fires_on(base, stat[where], t), axis=1)

    # grid[0] fires the most (the cheapest), grid[-1] nowhere (the LC itself)
    if base == "patience":
        grid = np.arange(config.num_exits + 1, dtype=np.float64)
    elif base == "confidence":
        grid = _candidates(stat, never=2.0)
    else:
        grid = _candidates(stat, never=-1.0)[::-1]
    n_b = num_buckets(config.max_len, bucket_width)
    buckets = bucket_of(lengths, bucket_width, n_b)
    order = [b for b in sorted(range(n_b), key=lambda b: -int((buckets == b).sum()))
             if (buckets == b).sum() >= min_support]  # hybrid: largest bucket first
    if boot is not None:
        return _bootstrap_thresholds(name, grid, exits, evaluate, target, budget, boot,
                                     confidence, buckets, n_b, order)
    best = _cheapest_passing(grid, lambda t: evaluate(exits(t)), target)
    if name != "hybrid":
        return [float(best)]
    table = np.full(n_b, best, np.float64)
    current = exits(best)
    for b in order:
        inside = np.flatnonzero(buckets == b)
        for t in grid:  # lowest first: the cheapest that keeps the whole task within budget
            if t >= table[b]:
                break
            trial = current.copy()  # only this bucket's rows move
            trial[inside] = exits(t, inside)
            if evaluate(trial)[0] >= target - 1e-12:
                table[b], current = t, trial
                break
    return [float(v) for v in table]


def _bootstrap_thresholds(name, grid, exits, evaluate, target, budget, boot, confidence,
                          buckets, n_b, order) -> list[float]:
    """The bootstrap criterion's search. From the LC towards cheaper thresholds, a threshold is
    accepted while it meets the budget on the rows and in the bootstrap bound, and the search
    stops at the first that does not (a fixed sequence: a cheap threshold that passes after a
    dearer one failed is a lucky one, never taken). Hybrid: then, largest bucket first, each
    bucket's threshold goes down the same way while, besides, each step leaves the task no
    worse than before it in all but `1 - confidence` of the resamples: a 20-row bucket cannot
    show that it may spend budget, and a lucky gain elsewhere must not pay for it."""
    floor = -budget / 100 - 1e-12
    best = _descend(grid, lambda t: evaluate(exits(t)), target, budget, boot, confidence)
    if name != "hybrid":
        return [float(best)]
    table = np.full(n_b, best, np.float64)
    current = exits(best)
    before = boot.differences(evaluate(current)[2])
    for b in order:
        inside = np.flatnonzero(buckets == b)
        for t in grid[grid < table[b]][::-1]:
            trial = current.copy()  # only this bucket's rows move
            trial[inside] = exits(t, inside)
            s, _, chosen = evaluate(trial)
            after = boot.differences(chosen)
            if not (s >= target - 1e-12 and worst_quantile(after, confidence) >= floor
                    and worst_quantile(after - before, confidence) >= -1e-12):
                break
            table[b], current, before = t, trial, after
    return [float(v) for v in table]


def sweep(config: ResICConfig, name: str, probs: Mapping[str, np.ndarray],
          labels: Mapping[str, np.ndarray], lengths, points: int = 24) -> list[dict[str, Any]]:
    """Accuracy and macro-F1 against cost as one threshold sweeps (every task the same
    threshold; `patience` every `t`): the accuracy-versus-FLOPs curve SDN and FastBERT publish.
    Rows: policy, threshold, task, accuracy, macro_f1, mean_exit, flops_share. With a
    late-fusion model's wide classifier in `probs` (`has_wide_exit`), confidence and entropy
    rows may stop there too, at the same threshold."""
    check_choice(name, "policy", ("confidence", "entropy", "patience"))
    lengths = np.asarray(lengths)
    wide = has_wide_exit(config, probs)
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
                            {k: [float(t)] for k in config.tasks},
                            wide_thresholds={k: float(t) for k in config.tasks}
                            if wide and name != "patience" else {})
        s = policy_summary(config, policy, probs, labels, lengths)
        for task, r in s["tasks"].items():
            out.append({"policy": name, "threshold": float(t), "task": task,
                        "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                        "mean_exit": r["mean_exit"], "flops_share": 1 - s["saved"]})
    return out


def policy_markdown(policy: ExitPolicy) -> str:
    """The policy and its calibration figures as Markdown: per task the threshold(s), LC and
    policy macro-F1 and mean exit on the calibration rows (and, with the bootstrap criterion, the
    lower bound of the difference); then mean blocks, FLOPs saved and the criterion."""
    from resic_tf.markdown import fmt, markdown_table
    v = policy.calibration.get("validation", {})
    boot = policy.calibration.get("bootstrap")
    rows = []
    for task, values in policy.thresholds.items():
        r = v.get("tasks", {}).get(task, {})
        shown = ", ".join(f"{x:g}" for x in values) if len(values) <= 4 else \
            f"{len(values)} buckets: {min(values):g} .. {max(values):g}"
        rows.append([task, shown, fmt(r.get("lc_macro_f1", float("nan"))),
                     fmt(r.get("macro_f1", float("nan"))), f"{r.get('mean_exit', float('nan')):.2f}"])
        if boot:
            bound = boot["tasks"].get(task, {}).get("lower_bound_points", float("nan"))
            rows[-1].append(f"{bound:+.2f}")
    header = [f"task ({policy.name})", "threshold", "LC macro-F1", "policy macro-F1", "mean exit"]
    if boot:
        header.append(f"{100 * boot['confidence']:g}% lower bound vs LC (points)")
    table = markdown_table(header, rows)
    if not v:
        return table
    text = (table + f"\n\n{v['rows']} rows; mean blocks run {v['mean_blocks_run']:.2f}; "
            f"FLOPs {v['mean_flops'] / 1e6:.2f}M of {v['full_flops'] / 1e6:.2f}M per row "
            f"({100 * v['saved']:.1f}% saved)")
    budget = policy.calibration.get("budget_points")
    if boot:
        text += (f"; within {budget:g} points of the LC on the rows and in "
                 f"{100 * boot['confidence']:g}% of {boot['resamples']} paired bootstrap "
                 f"resamples (seed {boot['seed']})")
    elif policy.calibration.get("criterion") == "point":
        text += f"; within {budget:g} points of the LC on the rows (no bootstrap)"
    if policy.wide_exit:
        at = ", ".join(f"{t} {v:g}" for t, v in policy.wide_thresholds.items())
        text += (f"; rows may stop at exit 0, the wide classifier, before the first block "
                 f"(its thresholds: {at}; it counts 0 in the mean exit)")
    return text
