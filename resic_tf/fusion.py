"""Late fusion's one calibration: the wide classifier's share of each exit, chosen on
validation rows after training.

A late-fusion model (`wide_fusion="late"`) serves every exit as `(1 - w) * deep + w * wide`
(`resic_tf.layers.LateFusion`). How much the wide branch (a fastText-like bag of n-grams) should
weigh depends on the data: on 151 clean intents it beats the deep branch, on noisy sentiment
the two are level. So `resic train` picks `w` per task and exit from a grid on the run's
validation rows (the best macro-F1, ties going to the share nearest 0.5), as the length gate
picks exits; the chosen shares are weights of the model, saved and served with it.
"""
from __future__ import annotations

import numpy as np

from resic_tf.config import wide_exit_name
from resic_tf.metrics import macro_f1

SHARES = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, .., 1.0


def choose_shares(labels: np.ndarray, deep: np.ndarray, wide: np.ndarray,
                  shares=SHARES) -> list[float]:
    """Per exit, the share `w` whose `(1 - w) * deep + w * wide` has the best macro-F1 on
    `labels` (ties: the share nearest 0.5, then the smaller).

    `deep`: `(n, exits, classes)` probabilities of the deep heads; `wide`: `(n, classes)` of the
    wide classifier.
    """
    labels = np.asarray(labels)
    n_classes = deep.shape[-1]
    order = sorted(shares, key=lambda w: (abs(w - 0.5), w))
    chosen = []
    for e in range(deep.shape[1]):
        scores = {w: macro_f1(labels, ((1 - w) * deep[:, e] + w * wide).argmax(-1), n_classes)
                  for w in order}
        best = max(scores.values())
        chosen.append(next(w for w in order if scores[w] == best))
    return chosen


def fusion_layers(model, task: str) -> list:
    """The task's `LateFusion` layers, shallow to deep."""
    return model.fusion_layers(task)


def set_shares(model, shares: dict[str, list[float]]) -> None:
    for task, values in shares.items():
        for layer, w in zip(fusion_layers(model, task), values):
            layer.share.assign(float(w))


def shares_of(model) -> dict[str, list[float]]:
    """The model's current shares, task -> one per exit."""
    return {task: [round(float(layer.share.numpy()), 4) for layer in fusion_layers(model, task)]
            for task in model.tasks}


def branch_predictions(run, data=None):
    """`predict_file` of `data` (default: the run's validation rows) with every share of
    `run.model` at 0: `probs[task]` `(n, exits, classes)` holds the deep heads alone and
    `probs[wide_exit_name(task)]` `(n, classes)` the wide classifier (one pass of the deep
    network; the model's shares are restored after)."""
    from resic_tf.run import predict_file
    model = run.model
    if not getattr(model, "late_fusion", False):
        raise ValueError("Only a late-fusion model (wide_fusion='late') has shares")
    data = run.validation if data is None else data
    kept = shares_of(model)
    try:
        set_shares(model, {t: [0.0] * model.num_exits for t in model.tasks})
        return predict_file(run, data)
    finally:
        set_shares(model, kept)


def calibrate_shares(run) -> dict[str, list[float]]:
    """Choose and set the shares of `run.model` on `run.validation`; returns them (one
    prediction pass over the validation rows: `branch_predictions`)."""
    p = branch_predictions(run)
    shares = {task: choose_shares(p.labels[task], p.probs[task], p.probs[wide_exit_name(task)])
              for task in run.model.tasks}
    set_shares(run.model, shares)
    return shares
