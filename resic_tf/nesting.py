"""Nested label sets: a task whose every class lies inside one class of a coarser task.

CLINC150's 150 intents each belong to one of 10 domains; a product taxonomy's subcategories to
one category. When the training rows show it (every class of the finer task occurs with one
class of the coarser task only), the coarser task's probabilities are derived from the finer
one's at every exit: `P(coarse c) = sum of P(fine f) over the f inside c`
(`resic_tf.layers.DerivedLabels`). The two predictions are then always consistent, and the
coarse task gains from the finer labels: CLINC150 domain accuracy 96.0 -> 97.1 over 3 seeds
(docs/RESULTS.md, session 13).
The coarse task keeps its own heads and loss in training (they still shape the shared
features); only inference derives.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# A finer class seen fewer times than this cannot show that it lies inside one coarse class.
MIN_ROWS_PER_CLASS = 2


def find_nested_tasks(tasks: Mapping[str, Sequence[str]], ids: Mapping[str, np.ndarray],
                      min_rows: int = MIN_ROWS_PER_CLASS) -> dict[str, dict]:
    """`{coarse: {"from": fine, "classes": [coarse class id of each fine class]}}` for every
    pair of tasks where the training rows' class ids `ids` nest: the fine task has more classes,
    each seen at least `min_rows` times and always with one coarse class, and every coarse class
    holds a fine one. A coarse task nested in several finer ones derives from the one with the
    fewest classes (the nearest level of the hierarchy)."""
    found = {}
    for coarse, coarse_classes in tasks.items():
        candidates = []
        for fine, fine_classes in tasks.items():
            if len(fine_classes) <= len(coarse_classes):
                continue
            pairs = np.zeros((len(fine_classes), len(coarse_classes)), np.int64)
            np.add.at(pairs, (np.asarray(ids[fine]), np.asarray(ids[coarse])), 1)
            seen = (pairs > 0).sum(axis=1)
            if (pairs.sum(axis=1) >= min_rows).all() and (seen == 1).all() and \
                    (pairs.sum(axis=0) > 0).all():
                candidates.append((len(fine_classes), fine, pairs.argmax(axis=1)))
        if candidates:
            _, fine, of = min(candidates, key=lambda c: c[0])
            found[coarse] = {"from": fine, "classes": [int(c) for c in of]}
    return found


def derivation_order(nested: Mapping[str, Mapping]) -> list[str]:
    """The coarse tasks, each after the task it derives from when that one is derived too."""
    done: list[str] = []

    def visit(task):
        if task in nested and task not in done:
            visit(nested[task]["from"])
            done.append(task)

    for task in nested:
        visit(task)
    return done
