"""Overthinking and length statistics of a multi-exit model's predictions (numpy in, numbers
out), and the one-row-per-input predictions table the report is computed from.

Definitions: with `C[n, e]` = "exit e is right on input n" and the LC the last exit,
*overthinking* (Kaya et al., "Shallow-Deep Networks", ICML 2019, the destructive effect) is the
share of inputs with some IC right and the LC wrong: `mean(any(C[:, :-1], 1) & ~C[:, -1])`; the
*lost-later share* of exit e is `sum(C[:, e] & ~C[:, -1]) / sum(C[:, e])` (NaN if exit e is never
right). The *error share* of exit e in bucket b is `sum(~C[:, e] & (bucket == b)) / sum(~C[:, e])`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from resic_tf.config import ResICConfig, exit_label
from resic_tf.gate import LengthGate, bucket_of, gated_predictions
from resic_tf.metrics import accuracy, best_index, macro_f1
from resic_tf.validation import InvalidValueError


def _check_preds(pred_matrix, y, min_exits: int = 1) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_matrix)
    y = np.asarray(y)
    if pred.ndim != 2 or pred.shape[1] < min_exits:
        raise InvalidValueError(f"`pred_matrix` must be 2-D (samples, exits) with at least {min_exits} "
                         f"exit(s). Received: pred_matrix.shape={pred.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.shape[0] != pred.shape[0]:
        raise InvalidValueError(f"`y` must be 1-D with one label per row of `pred_matrix`. Received: "
                         f"y.shape={y.shape}, pred_matrix.shape={pred.shape}")
    return pred.astype(np.int64), y.astype(np.int64)


def _check_buckets(buckets, n: int, n_buckets: int) -> np.ndarray:
    b = np.asarray(buckets).reshape(-1).astype(np.int64)
    if b.shape[0] != n:
        raise InvalidValueError(f"`buckets` needs one bucket per sample ({n}). Received: {b.shape[0]}")
    if b.size and (b.min() < 0 or b.max() >= n_buckets):
        raise InvalidValueError(f"`buckets` must lie in [0, {n_buckets}). Received: min={b.min()}, "
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
    """Per row of `scores` `(buckets, exits)`, the 0-based best exit by `metrics.best_index`
    (the shallowest among equal scores, NaN never wins); -1 for an all-NaN row (empty bucket)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.array([-1 if np.isnan(row).all() else best_index(row) for row in s], dtype=np.int64)


def bucket_labels(bucket_width: int, n_buckets: int) -> list[str]:
    """`0-9`, `10-19`, ..., and `130+` for the open-ended last bucket (width 10)."""
    return [f"{k * bucket_width}+" if k == n_buckets - 1
            else f"{k * bucket_width}-{(k + 1) * bucket_width - 1}" for k in range(n_buckets)]


def short_exit_names(config: ResICConfig) -> list[str]:
    """`ic1` .. `icN`, `lc`: exit names without the task prefix."""
    return [exit_label(i, config.num_exits) for i in range(config.num_exits)]


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
        gated, idx = gated_predictions(gate, task, p, lengths)
        cols[f"{task}_gate_exit"] = np.asarray(names, dtype=object)[idx]
        cols[f"{task}_gate_pred"] = gated.argmax(-1).astype(np.int64)
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
        best = best_index([exits[e]["macro_f1"] for e in names])
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
