"""Res-IC model builder: a task-agnostic backbone plus one internal classifier per block and task."""
from __future__ import annotations

import keras

from resic_tf.config import ResICConfig
from resic_tf.layers import CBAM, InternalClassifier, ResidualBlock


def block_name(index: int) -> str:
    """Zero-padded so that Keras's alphabetical sorting keeps block order."""
    return f"block{index:02d}"


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICBackbone(keras.Model):
    """Character ids `(batch, max_len)` -> dict of every block's CBAM output, in depth order.

    Embedding -> stem conv (kernel 3) + BN + ReLU -> residual blocks; the first block of every
    stage after the first has stride 2 and the stage's filters. CBAM follows every block. The
    backbone knows nothing of tasks; `ResICClassifier` attaches the exits.

    Args:
        vocab_size: int, character ids (padding 0 and out-of-vocabulary 1 included).
        filters: filters per stage. Defaults to 64, 128, 256, 512.
        blocks: residual blocks per stage. Defaults to 2, 2, 2, 2 (Res-IC18).
        max_len: int, input length. Defaults to 132.
        embedding_dim: int. Defaults to 64.
        cbam_reduction: int, channel-attention reduction ratio. Defaults to 16.
        bn_momentum: float, momentum of every BatchNormalization. Defaults to 0.9.

    Outputs: `{"block01": (batch, steps, filters), ..., "blockNN": ...}`; `block_outputs` holds
    the same KerasTensors, for heads built on `backbone.input`.
    """

    def __init__(self, vocab_size: int, filters=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                 max_len: int = 132, embedding_dim: int = 64, cbam_reduction: int = 16,
                 bn_momentum: float = 0.9, **kwargs):
        if len(filters) != len(blocks):
            raise ValueError(f"`filters` needs one value per stage ({len(blocks)}). "
                             f"Received: filters={list(filters)}, blocks={list(blocks)}")
        # === Layers + Functional Model ===
        inputs = keras.Input(shape=(max_len,), dtype="int32", name="char_ids")
        x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")(inputs)
        x = keras.layers.Conv1D(filters[0], 3, padding="same", use_bias=False,
                                kernel_initializer="he_normal", name="stem_conv")(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
        x = keras.layers.ReLU(name="stem_relu")(x)
        outputs = {}
        index = 0
        for stage, (n_blocks, stage_filters) in enumerate(zip(blocks, filters)):
            for b in range(n_blocks):
                index += 1
                strides = 2 if stage > 0 and b == 0 else 1
                x = ResidualBlock(stage_filters, strides=strides, bn_momentum=bn_momentum,
                                  name=f"{block_name(index)}_residual")(x)
                x = CBAM(cbam_reduction, name=f"{block_name(index)}_cbam")(x)
                outputs[block_name(index)] = x
        kwargs.setdefault("name", "resic_backbone")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        # === Config ===
        self.vocab_size = int(vocab_size)
        self.filters = [int(f) for f in filters]
        self.blocks = [int(b) for b in blocks]
        self.max_len = int(max_len)
        self.embedding_dim = int(embedding_dim)
        self.cbam_reduction = int(cbam_reduction)
        self.bn_momentum = float(bn_momentum)
        self.block_outputs = outputs

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "vocab_size": self.vocab_size,
                "filters": self.filters, "blocks": self.blocks, "max_len": self.max_len,
                "embedding_dim": self.embedding_dim, "cbam_reduction": self.cbam_reduction,
                "bn_momentum": self.bn_momentum}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICClassifier(keras.Model):
    """A Res-IC backbone with one internal classifier per block and task.

    Outputs `{task}_ic1..{task}_icN` and `{task}_lc` (the last block's classifier) for every task,
    softmax probabilities. All exits run in `fit` and `predict`; the length gate that picks one
    per input lives in the export. Compile with `compile_model` (Adam, cross-entropy on every
    exit weighted by the paper's Eq. 1); `compile()` is Keras's own, so a saved model reloads
    compiled.

    Args:
        backbone: ResICBackbone.
        tasks: ordered mapping of task name -> class labels.
        dropout: float, dropout of every internal classifier. Defaults to 0.2.
    """

    def __init__(self, backbone: ResICBackbone, tasks, dropout: float = 0.2, **kwargs):
        tasks = {str(t): [str(c) for c in classes] for t, classes in dict(tasks).items()}
        # === Layers + Functional Model ===
        inputs = backbone.input
        features = backbone(inputs)
        blocks = [features[block_name(i)] for i in range(1, backbone.num_blocks + 1)]
        n_ics = backbone.num_blocks - 1
        outputs = {}
        for task, classes in tasks.items():
            names = [f"{task}_ic{i}" for i in range(1, n_ics + 1)] + [f"{task}_lc"]
            for name, feature in zip(names, blocks):
                outputs[name] = InternalClassifier(len(classes), dropout, name=name)(feature)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        # === Config ===
        self.backbone = backbone
        self.tasks = tasks
        self.dropout = float(dropout)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "backbone": keras.layers.serialize(self.backbone), "tasks": self.tasks,
                "dropout": self.dropout}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["backbone"], dict):
            config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)


def build_backbone(config: ResICConfig) -> ResICBackbone:
    """The task-agnostic backbone described by `config`."""
    return ResICBackbone(config.vocab_size, config.filters, config.stage_blocks, config.max_len,
                         config.embedding_dim, config.cbam_reduction, config.bn_momentum)


def build_model(config: ResICConfig) -> ResICClassifier:
    """The full Res-IC model with outputs `{task}_ic1..{task}_icN` and `{task}_lc` for every task.

    Example:
        >>> cfg = ResICConfig(tasks={"hate": ["hate", "none"]}, vocab_size=100,
        ...                   filters=(8, 8, 8, 8))
        >>> sorted(build_model(cfg).output_names)[:2]
        ['hate_ic1', 'hate_ic2']
    """
    return ResICClassifier(build_backbone(config), config.tasks, config.dropout,
                           name=f"{config.arch}_ic")


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
    """Adam + sparse cross-entropy on every exit, weighted by `exit_loss_weights(config)`."""
    weights = exit_loss_weights(config)
    if set(weights) != set(model.output_names):
        # Keras 3 silently reassigns misspelled weight keys by sorted position: refuse instead.
        raise ValueError(f"Loss-weight keys {sorted(weights)} do not match model outputs "
                         f"{sorted(model.output_names)}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={name: keras.losses.SparseCategoricalCrossentropy() for name in weights},
                  loss_weights=weights)
