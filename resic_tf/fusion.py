"""Late fusion's calibration: how each exit mixes the deep and shallow classifiers, chosen on
validation rows after training.

A late-fusion model (`wide_fusion="late"`) serves every exit as `(1 - w) * deep + w * wide`
(`resic_tf.layers.LateFusion`). How much the wide branch (a fastText-like bag of n-grams) should
weigh depends on the data: on 151 clean intents it beats the deep branch, on noisy sentiment
the two are level. So `resic train` picks `w` per task and exit from a grid on the run's
validation rows (the best macro-F1, ties going to the share nearest 0.5), as the length gate
picks exits; the chosen shares are weights of the model, saved and served with it.

A model with a linear branch keeps equal thirds (deep, wide, linear) unless the validation rows
show, beyond doubt, that a log-linear mix fitted on them predicts better (`choose_mix`): where
one branch is much weaker on a task (StyleKQC topic: the deep branch 7-10 points under the
linear one), the fitted powers drop it; where the evidence is the usual noise of a few hundred
rows (korean-hate-speech), the thirds stay (docs/RESULTS.md, session 18).
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


def mix_state(model) -> list:
    """Everything the mixes of `model` hold (shares, log-linear flags and powers), to restore
    with `set_mix_state`."""
    return [(layer, [v.numpy() for v in layer.weights]) for layer in _mix_layers(model)]


def set_mix_state(state: list) -> None:
    for layer, values in state:
        for v, value in zip(layer.weights, values):
            v.assign(value)


def _arithmetic(model) -> None:
    """Every exit of `model` back to its arithmetic mix (the log-linear flags at 0)."""
    for layer in _mix_layers(model):
        if getattr(layer, "log_linear", True):  # every ShallowMix; a LateFusion that can
            layer.geometric.assign(0.0)


def _mix_layers(model) -> list:
    """The layers holding `model`'s mixes: every `LateFusion`, then every `ShallowMix`."""
    return [layer for task in model.tasks for layer in fusion_layers(model, task)] + list(
        getattr(model, "shallow_mixes", []))


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
    kept = mix_state(model)
    try:
        _arithmetic(model)
        set_shares(model, {t: [0.0] * model.num_exits for t in model.tasks})
        return predict_file(run, data)
    finally:
        set_mix_state(kept)


def linear_branch_predictions(run, data=None) -> dict:
    """Task -> `(labels, deep LC, wide, linear)` probabilities of `data`'s rows (default: the
    run's validation rows) for a model with a linear branch: each of its three classifiers
    alone (nested tasks: their own classifiers)."""
    import tensorflow as tf

    model = run.model
    if not getattr(model, "linear_heads", None):
        raise ValueError("Only a model with a linear branch (linear_ngrams > 0) has three "
                         "branches")
    data = run.validation if data is None else data
    pred = branch_predictions(run, data)
    texts = list(data.texts)
    parts = {t: ([], []) for t in model.tasks}
    for start in range(0, len(texts), 512):
        ids = model.preprocessor(tf.constant(texts[start:start + 512]))
        wide = model.backbone.wide(ids, model.backbone.padding_mask(ids))
        for i, task in enumerate(model.tasks):
            parts[task][0].append(np.asarray(model.wide_heads[i](wide.embedding)))
            parts[task][1].append(np.asarray(model.linear_heads[i](wide.columns, wide.weights)))
    return {task: (pred.labels[task], pred.probs[task][:, -1],
                   np.concatenate(parts[task][0]), np.concatenate(parts[task][1]))
            for task in model.tasks}


MIX_FOLDS = 5  # folds of the validation rows that judge a fitted mix against the thirds
MIX_MIN_Z = 4.0  # its cross-validated gain in cross-entropy, in standard errors, to be adopted


def _row_log_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(-1))
    return log_z - logits[np.arange(len(labels)), labels]


def fit_powers(log_probs: list[np.ndarray], labels, iterations: int = 100) -> np.ndarray:
    """Non-negative powers `a` minimising the mean cross-entropy of `softmax(sum_k a_k *
    log_probs[k])` on `labels`: a logistic regression with one coefficient per classifier
    (convex; projected Newton steps with a backtracking line search).

    `log_probs`: `(n, classes)` log-probabilities of each classifier on the same rows.
    """
    labels = np.asarray(labels)
    feats = np.stack(log_probs, axis=0)  # (k, n, classes)
    k, n = feats.shape[0], len(labels)
    own = feats[:, np.arange(n), labels]  # (k, n)

    def loss(a):
        return float(_row_log_loss(np.tensordot(a, feats, 1), labels).mean())

    a = np.full(k, 1.0 / k)
    current = loss(a)
    for _ in range(iterations):
        logits = np.tensordot(a, feats, 1)
        q = np.exp(logits - logits.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        expected = np.einsum("knc,nc->kn", feats, q)  # E_q[feature]
        grad = (expected - own).mean(1)
        hess = np.einsum("knc,lnc,nc->kl", feats, feats, q) / n - expected @ expected.T / n
        free = (a > 0) | (grad < 0)  # a power at 0 that the gradient pushes below stays there
        step = np.zeros(k)
        if free.any():
            h = hess[np.ix_(free, free)] + 1e-9 * np.eye(int(free.sum()))
            step[free] = -np.linalg.solve(h, grad[free])
        if np.abs(step).max() < 1e-10:
            break
        t, improved = 1.0, False
        while t > 1e-6:
            trial = np.maximum(a + t * step, 0.0)
            value = loss(trial)
            if value < current:
                a, current, improved = trial, value, True
                break
            t /= 2
        if not improved:
            break
    return a


def choose_mix(labels, deep, wide, linear, share: float = 2 / 3, folds: int = MIX_FOLDS,
               min_z: float = MIX_MIN_Z, seed: int = 0) -> dict:
    """Whether a task's exits should serve the log-linear mix fitted on these validation rows
    instead of the arithmetic one (`(1 - share) * deep + share * (wide + linear) / 2`), and its
    powers (deep, wide, linear).

    The fitted mix is adopted only when its cross-entropy, each row scored by powers fitted on
    the other folds, is lower than the arithmetic mix's by at least `min_z` standard errors of
    the per-row difference: a fitted mix follows a few hundred noisy rows' quirks (on
    korean-hate-speech it raised the validation likelihood at z 0.6-3.9 and lost 0.4-0.8 test
    macro-F1 on the mean), so only a large, consistent gain (StyleKQC topic: z 5.0-8.9; 3i4k
    5.8; CLINC150 intent 30-49) moves the mix (docs/RESULTS.md, session 18).
    Returns `{"geometric": bool, "powers": [deep, wide, linear], "z": float, "rows": n}`.
    """
    labels = np.asarray(labels)
    logs = [np.log(np.asarray(p, np.float64) + 1e-9) for p in (deep, wide, linear)]
    arithmetic = (1 - share) * np.asarray(deep, np.float64) + share * 0.5 * (
        np.asarray(wide, np.float64) + np.asarray(linear, np.float64))
    base = _row_log_loss(np.log(arithmetic + 1e-9), labels)
    order = np.random.default_rng(seed).permutation(len(labels)) % folds
    held = np.zeros(len(labels))
    for f in range(folds):
        inside = order != f
        a = fit_powers([x[inside] for x in logs], labels[inside])
        held[~inside] = _row_log_loss(np.tensordot(a, np.stack([x[~inside] for x in logs]), 1),
                                      labels[~inside])
    gain = base - held
    sd = gain.std(ddof=1) if len(gain) > 1 else 0.0
    z = float(gain.mean() / sd * np.sqrt(len(gain))) if sd > 0 else 0.0
    powers = fit_powers(logs, labels)
    return {"geometric": bool(z >= min_z), "powers": [round(float(p), 6) for p in powers],
            "z": round(z, 3), "rows": int(len(labels))}


def set_mix(model, task: str, geometric: bool, powers) -> None:
    """Serve task's exits with the log-linear mix of `powers` (deep, wide, linear), or back
    with the arithmetic one."""
    t = list(model.tasks).index(task)
    flag = 1.0 if geometric else 0.0
    model.shallow_mixes[t].geometric.assign(flag)
    model.shallow_mixes[t].powers.assign(np.asarray(powers[1:], np.float32))
    for layer in fusion_layers(model, task):
        layer.geometric.assign(flag)
        layer.deep_power.assign(float(powers[0]))


def calibrate_mix(run) -> dict[str, dict]:
    """Choose (`choose_mix`) and set, for every task of `run.model` (a linear-branch model)
    that is not derived from another, its exits' mix on `run.validation`; returns task -> the
    choice."""
    model = run.model
    branches = linear_branch_predictions(run)
    chosen = {}
    for task in model.tasks:
        if task in model.nested_tasks:
            continue  # served from its finer task's exits
        share = float(fusion_layers(model, task)[-1].share.numpy())
        chosen[task] = choose_mix(*branches[task], share=share)
        set_mix(model, task, chosen[task]["geometric"], chosen[task]["powers"])
    return chosen


def calibrate_shares(run) -> dict[str, list[float]]:
    """Choose and set the shares of `run.model` on `run.validation`; returns them (one
    prediction pass over the validation rows: `branch_predictions`)."""
    p = branch_predictions(run)
    shares = {task: choose_shares(p.labels[task], p.probs[task], p.probs[wide_exit_name(task)])
              for task in run.model.tasks}
    set_shares(run.model, shares)
    return shares
