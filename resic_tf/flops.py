"""Floating-point operations of a Res-IC forward pass, counted from the config (multiply and add
count as 2), per text length: what a padded batch costs, and what each exit costs.

Counted: every convolution (stem, residual, projection, CBAM temporal), CBAM's channel MLP,
every exit's dense layer, and the wide branch: the average of its n-gram vectors (one add per
value, `steps * len(ngram_sizes) * ngram_hashes * ngram_dim`, and one multiply more per value
under weighted pooling; the hashing, the table lookups and the softmax are not counted) and,
under late fusion, its classifiers; a linear branch's TF-IDF weights (8 per n-gram
occurrence: its count, log, IDF, division, square and norm; the sort and the vocabulary
search, comparisons, are not counted) and each task's linear classifier (a multiply-add per
occurrence and class) and mix. Not counted: batch norm, activations, pooling
and the attention products (elementwise, a few percent of the total at these widths). Training
costs about three forward passes (forward, gradient of the inputs, gradient of the weights).
"""
from __future__ import annotations

import math

from resic_tf.config import ResICConfig
from resic_tf.validation import check_scalar


def _conv(steps: int, kernel: int, c_in: int, c_out: int) -> int:
    return 2 * steps * kernel * c_in * c_out


def block_flops(config: ResICConfig, steps: int, cbam_kernel: int = 7) -> list[int]:
    """FLOPs per row of the stem (first item) and of each block with its CBAM, for a row of
    `steps` characters (a padded row counts its padded length)."""
    steps = check_scalar(steps, "steps", int, min_val=1)
    out = [_conv(steps, 3, config.embedding_dim, config.filters[0])]
    c_in = config.filters[0]
    for stage, (n_blocks, c) in enumerate(zip(config.stage_blocks, config.filters)):
        for b in range(n_blocks):
            strides = 2 if stage > 0 and b == 0 else 1
            steps = math.ceil(steps / strides)
            flops = _conv(steps, 3, c_in, c) + _conv(steps, 3, c, c)
            if strides != 1 or c_in != c:
                flops += _conv(steps, 1, c_in, c)  # projection shortcut
            hidden = max(1, c // config.cbam_reduction)
            flops += 2 * 2 * (c * hidden + hidden * c)  # shared MLP on the average and the max
            flops += _conv(steps, cbam_kernel, 2, 1)  # temporal attention
            out.append(flops)
            c_in = c
    return out


TFIDF_FLOPS = 8  # per n-gram occurrence of a linear branch's TF-IDF weights


def mix_flops(config: ResICConfig) -> int:
    """FLOPs per class of one late-fusion mix: the arithmetic mix (3), and with a linear branch
    also the log-linear one, computed beside it (`LateFusion`, `ShallowMix`: two
    multiply-adds of log-probabilities, 4, and the blend of the two mixes, 3; the logs and the
    softmax's exponentials are activations, not counted)."""
    return 10 if config.linear_ngrams else 3


def wide_flops(config: ResICConfig, steps: int) -> int:
    """FLOPs per row of the wide branch (0 without one): the mean of its n-gram vectors and,
    under late fusion, every task's wide classifier on it, and a linear branch's TF-IDF and
    classifiers (computed once per row: they are exit 0, and every deep exit mixes the same
    probabilities in). A row that stops at exit 0 costs
    this alone: no stem, no block."""
    steps = check_scalar(steps, "steps", int, min_val=1)
    if not config.ngram_buckets:
        return 0
    classifiers = sum(2 * config.ngram_dim * len(c) for c in config.tasks.values()) \
        if config.late_fusion else 0
    per_value = 2 if config.ngram_pooling == "weighted" else 1
    linear = 0
    if config.linear_ngrams:
        occurrences = steps * len(config.ngram_sizes)
        linear = occurrences * (TFIDF_FLOPS + sum(2 * len(c) for c in config.tasks.values())) \
            + sum(mix_flops(config) * len(c) for c in config.tasks.values())
    return steps * len(config.ngram_sizes) * config.ngram_hashes * config.ngram_dim * per_value \
        + classifiers + linear


def exit_flops(config: ResICConfig, steps: int) -> list[int]:
    """Cumulative FLOPs per row to reach each exit (shallow to deep, the LC last): the stem, the
    wide branch, the blocks up to the exit, and every task's head at that exit."""
    blocks = block_flops(config, steps)
    total, out = blocks[0] + wide_flops(config, steps), []
    for k, c in enumerate(_block_channels(config)):
        total += blocks[k + 1]
        out.append(total + _heads(config, c))
    return out


def forward_flops(config: ResICConfig, steps: int) -> int:
    """FLOPs per row of the full model (every block, every exit of every task)."""
    heads = sum(_heads(config, c) for c in _block_channels(config))
    return sum(block_flops(config, steps)) + wide_flops(config, steps) + heads


def _heads(config: ResICConfig, channels: int) -> int:
    """Every task's exit head on `channels` pooled features (plus the wide branch's embedding,
    or under late fusion the mix with the shallow classifier's probabilities, `mix_flops`); average
    and max pooling join `2 * channels` features."""
    if config.exit_pooling == "average_max":
        channels *= 2
    if config.late_fusion:
        return sum(2 * channels * k + mix_flops(config) * k for k in map(len, config.tasks.values()))
    width = channels + (config.ngram_dim if config.ngram_buckets else 0)
    return sum(2 * width * len(classes) for classes in config.tasks.values())


def _block_channels(config: ResICConfig) -> list[int]:
    return [c for n, c in zip(config.stage_blocks, config.filters) for _ in range(n)]


def row_steps(config: ResICConfig, lengths) -> "np.ndarray":
    """Steps each row is convolved over: its own length (at least 1, at most `max_len`) in a
    length-adaptive model, `max_len` in a fixed-length one."""
    import numpy as np
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if not config.length_adaptive:
        return np.full(lengths.shape, config.max_len, np.int64)
    return np.clip(lengths, 1, config.max_len)


def policy_flops(config: ResICConfig, lengths, exits) -> "np.ndarray":
    """FLOPs per row of an early-exit pass (`resic_tf.export`): the wide branch, and unless
    every task stopped at exit 0 (`-1`, a late-fusion model's wide classifier) the stem, the
    blocks up to the row's deepest exit over all tasks, and every task's head at each of those
    blocks (the served graph evaluates them all on the rows still running).

    `exits`: task -> `(n,)` 0-based exit per row (-1: the wide exit). Each row is counted at its
    own length (`row_steps`), what a length-sorted batch costs.
    """
    import numpy as np
    depth = np.max(np.stack([np.asarray(e, dtype=np.int64).reshape(-1)
                             for e in exits.values()]), axis=0)
    heads = np.cumsum([_heads(config, c) for c in _block_channels(config)])
    steps, where = np.unique(row_steps(config, lengths), return_inverse=True)
    wide = np.array([wide_flops(config, int(s)) for s in steps], np.int64)
    ran = depth >= 0
    at = np.maximum(depth, 0)
    blocks = np.where(ran, reach_flops(config, lengths)[np.arange(len(depth)), at], 0)
    return blocks + wide[where.reshape(-1)] + np.where(ran, heads[at], 0)


def full_flops(config: ResICConfig, lengths) -> "np.ndarray":
    """`(n,)`: `forward_flops` of each row at its own length (the full-depth cost that an
    early-exit policy's saving is measured against), computed once per distinct length."""
    import numpy as np
    steps, where = np.unique(row_steps(config, lengths), return_inverse=True)
    per_steps = np.array([forward_flops(config, int(s)) for s in steps], np.int64)
    return per_steps[where.reshape(-1)]


def reach_flops(config: ResICConfig, lengths) -> "np.ndarray":
    """`(n, exits)`: FLOPs of the stem and the blocks up to each exit, per row at its own length
    (what a row costs to reach each exit, heads aside)."""
    import numpy as np
    steps = row_steps(config, lengths)
    out = np.zeros((len(steps), config.num_exits), np.int64)
    for s in np.unique(steps):
        out[steps == s] = np.cumsum(block_flops(config, int(s)))[1:]
    return out
