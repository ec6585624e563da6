"""The length gate: per task and per character-length bucket, the exit that scored best on
validation data. At prediction time each input takes its bucket's exit.

Buckets have width `bucket_width` (10 in the paper): bucket b holds lengths
[b * width, (b + 1) * width), and the last bucket, `max_len // width`, is open-ended. Length is
the raw text's Unicode character count (see `resic_tf.vocabulary.text_lengths`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from resic_tf.config import ResICConfig
from resic_tf.io import atomic_write_text, load_json_as
from resic_tf.markdown import markdown_table
from resic_tf.metrics import METRICS, best_index, score
from resic_tf.validation import InvalidValueError, check_choice, check_scalar
# A bucket's best exit on a handful of validation rows is noise; below this many rows a bucket
# uses the exit that is best over all lengths.
DEFAULT_MIN_SUPPORT = 20


def num_buckets(max_len: int, bucket_width: int) -> int:
    return max_len // bucket_width + 1


def bucket_of(lengths, bucket_width: int, n_buckets: int) -> np.ndarray:
    return np.minimum(np.asarray(lengths, dtype=np.int64) // bucket_width, n_buckets - 1)


@dataclasses.dataclass(frozen=True)
class LengthGate:
    """Chosen exit index (0-based, shallow to deep; the LC is the last) per task and bucket.

    `details` keeps, per task, the scores that made each choice, for `gate.json` readers.
    """

    bucket_width: int
    metric: str
    min_support: int
    exits: Mapping[str, Sequence[str]]
    choice: Mapping[str, Sequence[int]]
    fallback: Mapping[str, int]
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_buckets(self) -> int:
        return len(next(iter(self.choice.values())))

    def check(self, config: ResICConfig) -> None:
        """Refuse a gate made for another model: tasks, exit names and buckets must match."""
        if list(self.exits) != list(config.tasks):
            raise InvalidValueError(f"gate.json is for tasks {list(self.exits)}, the model has "
                             f"{list(config.tasks)}; re-run `resic calibrate`")
        for task in config.tasks:
            if list(self.exits[task]) != config.exit_names(task):
                raise InvalidValueError(f"gate.json's exits for {task!r} ({len(self.exits[task])}) do not "
                                 f"match the model's ({config.num_exits}); re-run `resic calibrate`")
            if len(self.choice[task]) != num_buckets(config.max_len, self.bucket_width):
                raise InvalidValueError(f"gate.json has {len(self.choice[task])} buckets for {task!r}; "
                                 f"max_len {config.max_len} and width {self.bucket_width} need "
                                 f"{num_buckets(config.max_len, self.bucket_width)}; re-run "
                                 "`resic calibrate`")

    def exit_index(self, task: str, lengths) -> np.ndarray:
        """0-based exit index for each length."""
        table = np.asarray(self.choice[task], dtype=np.int64)
        return table[bucket_of(lengths, self.bucket_width, len(table))]

    def to_dict(self) -> dict[str, Any]:
        tasks = {}
        for task, exits in self.exits.items():
            tasks[task] = {
                "exits": list(exits),
                "overall_best_exit": exits[self.fallback[task]],
                "buckets": [{"bucket": b,
                             "min_length": b * self.bucket_width,
                             "max_length": None if b == self.num_buckets - 1
                             else (b + 1) * self.bucket_width - 1,
                             "exit": exits[c],
                             **self.details.get(task, {}).get("buckets", [{}] * (b + 1))[b]}
                            for b, c in enumerate(self.choice[task])],
                "overall_scores": self.details.get(task, {}).get("overall_scores", {}),
            }
        return {"bucket_width": self.bucket_width, "metric": self.metric,
                "calibration_data": self.details.get("_source"),
                "min_support": self.min_support, "num_buckets": self.num_buckets,
                "fallback_rule": f"a bucket with fewer than min_support={self.min_support} "
                                 "validation examples uses the exit that is best over all lengths",
                "tie_rule": "equal scores go to the shallower exit",
                "tasks": tasks}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LengthGate":
        exits, choice, fallback, details = {}, {}, {}, {}
        details["_source"] = d.get("calibration_data")
        for task, t in d["tasks"].items():
            exits[task] = list(t["exits"])
            index = {name: i for i, name in enumerate(t["exits"])}
            buckets = sorted(t["buckets"], key=lambda b: b["bucket"])
            choice[task] = [index[b["exit"]] for b in buckets]
            fallback[task] = index[t["overall_best_exit"]]
            details[task] = {"overall_scores": t.get("overall_scores", {}),
                             "buckets": [{k: v for k, v in b.items() if k not in
                                          ("bucket", "min_length", "max_length", "exit")}
                                         for b in buckets]}
        return cls(int(d["bucket_width"]), d["metric"], int(d["min_support"]), exits, choice,
                   fallback, details)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LengthGate":
        return load_json_as(path, cls.from_dict, "gate", "`resic calibrate`")


def calibrate(config: ResICConfig, probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
              lengths, bucket_width: int = 10, metric: str = "macro_f1",
              min_support: int = DEFAULT_MIN_SUPPORT) -> LengthGate:
    """Pick the best exit per task and length bucket from all-exit validation predictions.

    Args:
        probs: task -> `(n, num_exits, classes)` probabilities (or class ids `(n, num_exits)`).
        labels: task -> `(n,)` class ids.
        lengths: `(n,)` character lengths of the raw texts.
        bucket_width: int >= 1. min_support: int >= 1 (default 20); a bucket with fewer rows
            falls back to the exit best over all lengths.
    """
    check_choice(metric, "metric", METRICS)
    bucket_width = check_scalar(bucket_width, "bucket_width", int, min_val=1)
    min_support = check_scalar(min_support, "min_support", int, min_val=1)
    lengths = np.asarray(lengths)
    n_b = num_buckets(config.max_len, bucket_width)
    buckets = bucket_of(lengths, bucket_width, n_b)
    exits, choice, fallback, details = {}, {}, {}, {}
    for task, classes in config.tasks.items():
        p = np.asarray(probs[task])
        pred = p.argmax(-1) if p.ndim == 3 else p
        y = np.asarray(labels[task]).reshape(-1)
        if pred.shape[0] != y.shape[0] or y.shape[0] != lengths.shape[0]:
            raise ValueError(f"task {task!r}: {pred.shape[0]} predictions, {y.shape[0]} labels and "
                             f"{lengths.shape[0]} lengths; they must match")
        if len(y) == 0:
            raise ValueError("calibration data is empty")
        names = config.exit_names(task)
        overall = np.array([score(y, pred[:, e], len(classes), metric) for e in range(len(names))])
        best_all = best_index(overall)
        task_choice, task_details = [], []
        for b in range(n_b):
            rows = buckets == b
            support = int(rows.sum())
            s = np.array([score(y[rows], pred[rows, e], len(classes), metric) if support else np.nan
                          for e in range(len(names))])
            use_fallback = support < min_support or np.all(np.isnan(s))
            task_choice.append(best_all if use_fallback else best_index(s))
            task_details.append({"support": support, "fallback": bool(use_fallback),
                                 "scores": {n: (None if np.isnan(v) else round(float(v), 6))
                                            for n, v in zip(names, s)}})
        exits[task], choice[task], fallback[task] = names, task_choice, best_all
        details[task] = {"buckets": task_details,
                         "overall_scores": {n: round(float(v), 6) for n, v in zip(names, overall)}}
    return LengthGate(bucket_width, metric, min_support, exits, choice, fallback, details)


def gate_markdown(gate: LengthGate, task: str) -> str:
    """The gate of one task as a Markdown table: bucket, validation support, chosen exit."""
    buckets = gate.to_dict()["tasks"][task]["buckets"]
    rows = [[f"{b['min_length']}+" if b["max_length"] is None
             else f"{b['min_length']}-{b['max_length']}", b.get("support", ""),
             b["exit"] + (" (fallback)" if b.get("fallback") else "")] for b in buckets]
    return markdown_table(["length", "validation rows", "exit"], rows)


def gated_predictions(gate: LengthGate, task: str, probs: np.ndarray,
                      lengths) -> tuple[np.ndarray, np.ndarray]:
    """Apply the gate: returns (probabilities `(n, classes)`, 0-based exit index `(n,)`)."""
    idx = gate.exit_index(task, lengths)
    return np.take_along_axis(np.asarray(probs), idx[:, None, None], axis=1)[:, 0], idx
