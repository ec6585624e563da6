"""Res-IC model builder: a task-agnostic backbone plus one internal classifier per block and task."""
from __future__ import annotations

import keras

from resic_tf.config import ResICConfig
from resic_tf.layers import CBAM, InternalClassifier, ResidualBlock


def block_name(index: int) -> str:
    """Zero-padded so that Keras's alphabetical sorting keeps block order."""
    return f"block{index:02d}"


def build_backbone(config: ResICConfig) -> keras.Model:
    """Character ids `(batch, max_len)` -> dict of every block's CBAM output, in depth order.

    Embedding -> stem conv (kernel 3) -> residual blocks; the first block of every stage after the
    first has stride 2 and the stage's filters. CBAM follows every block. Knows nothing of tasks.
    """
    # === Layers ===
    inputs = keras.Input(shape=(config.max_len,), dtype="int32", name="char_ids")
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim, name="embedding")(inputs)
    x = keras.layers.Conv1D(config.filters[0], 3, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    outputs = {}
    index = 0
    for stage, (n_blocks, filters) in enumerate(zip(config.stage_blocks, config.filters)):
        for b in range(n_blocks):
            index += 1
            strides = 2 if stage > 0 and b == 0 else 1
            x = ResidualBlock(filters, strides=strides, name=f"{block_name(index)}_residual")(x)
            x = CBAM(config.cbam_reduction, name=f"{block_name(index)}_cbam")(x)
            outputs[block_name(index)] = x
    # === Functional Model ===
    return keras.Model(inputs, outputs, name="resic_backbone")


def build_model(config: ResICConfig) -> keras.Model:
    """The full Res-IC model with outputs `{task}_ic1..{task}_icN` and `{task}_lc` for every task.

    All exits run in `fit` and `predict`; the length gate that chooses one per input lives in the
    export, not here.

    Example:
        >>> cfg = ResICConfig(tasks={"hate": ["hate", "none"]}, vocab_size=100,
        ...                   filters=(8, 8, 8, 8))
        >>> sorted(build_model(cfg).output_names)[:2]
        ['hate_ic1', 'hate_ic2']
    """
    backbone = build_backbone(config)
    inputs = keras.Input(shape=(config.max_len,), dtype="int32", name="char_ids")
    features = backbone(inputs)
    blocks = [features[block_name(i)] for i in range(1, config.num_blocks + 1)]
    outputs = {}
    for task, classes in config.tasks.items():
        for name, feature in zip(config.exit_names(task), blocks):
            outputs[name] = InternalClassifier(len(classes), config.dropout, name=name)(feature)
    return keras.Model(inputs, outputs, name=f"{config.arch}_ic")


def exit_loss_weights(config: ResICConfig) -> dict[str, float]:
    """The paper's Eq. 1: weight i/N for `{task}_ic{i}`, 1.0 for `{task}_lc` ("uniform": all 1.0)."""
    n = config.num_ics
    weights = {}
    for task in config.tasks:
        for i, name in enumerate(config.exit_names(task), start=1):
            last = i == n + 1
            weights[name] = 1.0 if last or config.loss_weighting == "uniform" else i / n
    return weights


def compile_model(model: keras.Model, config: ResICConfig, learning_rate: float = 1e-3) -> None:
    """Adam + sparse cross-entropy on every exit, weighted by `exit_loss_weights`."""
    weights = exit_loss_weights(config)
    if set(weights) != set(model.output_names):
        # Keras 3 silently reassigns misspelled weight keys by sorted position: refuse instead.
        raise ValueError(f"Loss-weight keys {sorted(weights)} do not match model outputs "
                         f"{sorted(model.output_names)}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={name: keras.losses.SparseCategoricalCrossentropy() for name in weights},
                  loss_weights=weights)
