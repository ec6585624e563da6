"""Res-IC models: a task-agnostic backbone, and the classifier that owns the exits, the loss
weights, the per-exit metrics and the text preprocessor (keras-hub's backbone / task split)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from resic_tf.config import WIDE_FUSIONS, ResICConfig, exit_names, loss_weights
from resic_tf.exit_metrics import ExitMetrics
from resic_tf.layers import (CBAM, DerivedLabels, InternalClassifier, LateFusion,
                             NGramEmbedding, PaddingMask, ResidualBlock, ShallowMix, Stem,
                             derive_probabilities, downsample_mask)
from resic_tf.losses import ExitLoss, self_distillation
from resic_tf.nesting import derivation_order
from resic_tf.preprocessor import ResICPreprocessor, string_dataset
from resic_tf.tfidf import LinearHead, TfidfNGrams
from resic_tf.validation import InvalidValueError, check_choice, check_scalar
from resic_tf.vocabulary import jamo_of, length_order

STEM_LAYERS = ("embedding", "stem_conv", "stem_bn", "stem_relu")
NGRAM_OUTPUT = "ngram"  # the backbone's output key of the wide branch
LINEAR_OUTPUTS = ("linear_columns", "linear_weights")  # and of the linear branch's features


class WideFeatures(NamedTuple):
    """`ResICBackbone.wide` of a model with a linear branch: the wide branch's n-gram embedding
    and the linear branch's TF-IDF features (`TfidfNGrams`: columns and weights)."""
    embedding: object
    columns: object
    weights: object


def block_name(index: int) -> str:
    """Zero-padded so that Keras's alphabetical sorting keeps block order."""
    return f"block{index:02d}"


def _run_block(residual: ResidualBlock, cbam: CBAM, x, padding_mask, training=None):
    """A residual block then its CBAM, carrying the mask down: `(x, mask)` -> `(x, mask)`. The
    one composition of a block, for the functional graph and for `ResICBackbone.block`."""
    mask = downsample_mask(padding_mask, residual.strides)
    x = residual(x, padding_mask=padding_mask, training=training)
    return cbam(x, padding_mask=mask), mask


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICBackbone(keras.Model):
    """Character ids `(batch, steps)` -> dict of every block's CBAM output, in depth order.

    Embedding -> stem conv (kernel 3) + BN + ReLU -> residual blocks; the first block of every
    stage after the first has stride 2 and the stage's filters. CBAM follows every block. The
    backbone knows nothing of tasks; `ResICClassifier` attaches the exits.

    Length-adaptive (the default): the input is `(batch, None)`, padded to any length; a
    `PaddingMask` follows each text's own steps through every block (see `resic_tf.layers`), so
    a text's outputs do not depend on how far its batch is padded nor on its batch-mates, and a
    batch padded to its longest text costs only the steps that exist. `length_adaptive=False` is
    the first release's model (runs trained before 0.3): input `(batch, max_len)`, and padding
    takes part in every batch norm and pooling.

    Args:
        vocab_size: int, character ids (padding 0 and out-of-vocabulary 1 included).
        filters: filters per stage. Defaults to 64, 128, 256, 512.
        blocks: residual blocks per stage. Defaults to 2, 2, 2, 2 (Res-IC18).
        max_len: int, the truncation cap (and the fixed input length when not length-adaptive).
            Defaults to 132.
        embedding_dim: int. Defaults to 64.
        cbam_reduction: int, channel-attention reduction ratio. Defaults to 16.
        bn_momentum: float, momentum of every BatchNormalization. Defaults to 0.9.
        length_adaptive: bool. Defaults to True.
        ngram_buckets: int, hash buckets of the wide branch (`NGramEmbedding`), 0 for none.
            Defaults to 0.
        ngram_dim: int, its embedding width. Defaults to 64.
        ngram_sizes: its n-gram lengths. Defaults to 1, 2, 3, 4.
        ngram_rate: its learning-rate multiplier. Defaults to 10.
        ngram_hashes: rows each n-gram looks up, 1 or 2. Defaults to 1.
        ngram_pooling: "mean" or "weighted" (`NGramEmbedding`). Defaults to "mean".
        linear_ngrams: int, columns of the linear branch's TF-IDF features (`TfidfNGrams` over
            the same `ngram_sizes`; its vocabulary is set by `adapt` on the training texts), 0
            for none. Defaults to 0.

    Outputs: `{"block01": (batch, steps, filters), ..., "blockNN": ...}` and, when
    length-adaptive, `{"block01_padding_mask": (batch, steps) bool, ...}`; with a wide branch,
    `{"ngram": (batch, ngram_dim)}`; with a linear branch, `{"linear_columns": (batch,
    features) int32, "linear_weights": (batch, features)}`; `pyramid_outputs`
    (features) and `pyramid_masks` hold the same KerasTensors in depth order, for heads built on
    `backbone.input`. `stem(ids)` and `block(k, x, mask)` run the same layers piece by piece,
    for callers (the early-exit export) that stop between blocks.
    """

    def __init__(self, vocab_size: int, filters=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                 max_len: int = 132, embedding_dim: int = 64, cbam_reduction: int = 16,
                 bn_momentum: float = 0.9, length_adaptive: bool = True,
                 ngram_buckets: int = 0, ngram_dim: int = 64, ngram_sizes=(1, 2, 3, 4),
                 ngram_rate: float = 10.0, ngram_hashes: int = 1, ngram_pooling: str = "mean",
                 jamo=None, linear_ngrams: int = 0, **kwargs):
        if len(filters) != len(blocks):
            raise ValueError(f"`filters` needs one value per stage ({len(blocks)}). "
                             f"Received: filters={list(filters)}, blocks={list(blocks)}")
        length_adaptive = bool(length_adaptive)
        # === Layers + Functional Model ===
        inputs = keras.Input(shape=(None,) if length_adaptive else (max_len,), dtype="int32",
                             name="char_ids")
        if jamo is not None and not length_adaptive:
            raise InvalidValueError("Jamo embeddings need a length-adaptive model. Received: "
                                    "length_adaptive=False")
        if length_adaptive:
            mask = text_mask = PaddingMask(name="padding_mask")(inputs)
            x = Stem(vocab_size, embedding_dim, filters[0], bn_momentum, jamo, name="stem")(
                inputs, padding_mask=mask)
        else:  # the first release's four layers, so that its model.keras files load
            mask = text_mask = None
            x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")(inputs)
            x = keras.layers.Conv1D(filters[0], 3, padding="same", use_bias=False,
                                    kernel_initializer="he_normal", name="stem_conv")(x)
            x = keras.layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
            x = keras.layers.ReLU(name="stem_relu")(x)
        outputs, masks = {}, {}
        index = 0
        for stage, (n_blocks, stage_filters) in enumerate(zip(blocks, filters)):
            for b in range(n_blocks):
                index += 1
                strides = 2 if stage > 0 and b == 0 else 1
                name = block_name(index)
                residual = ResidualBlock(stage_filters, strides=strides, bn_momentum=bn_momentum,
                                         padding="centered" if length_adaptive else "same",
                                         name=f"{name}_residual")
                x, mask = _run_block(residual, CBAM(cbam_reduction, name=f"{name}_cbam"), x,
                                     mask)
                outputs[name] = x
                if length_adaptive:
                    masks[name] = mask
        wide = {}
        if ngram_buckets:
            wide[NGRAM_OUTPUT] = NGramEmbedding(ngram_buckets, ngram_dim, tuple(ngram_sizes),
                                                ngram_rate, ngram_hashes, ngram_pooling,
                                                name="ngram_embedding")(
                inputs, padding_mask=text_mask)
        if linear_ngrams:
            wide.update(zip(LINEAR_OUTPUTS, TfidfNGrams(linear_ngrams, tuple(ngram_sizes),
                                                        name="tfidf_ngrams")(
                inputs, padding_mask=text_mask)))
        kwargs.setdefault("name", "resic_backbone")
        super().__init__(inputs=inputs, outputs={
            **outputs, **{f"{k}_padding_mask": m for k, m in masks.items()}, **wide}, **kwargs)
        # === Config ===
        self.vocab_size = int(vocab_size)
        self.filters = [int(f) for f in filters]
        self.blocks = [int(b) for b in blocks]
        self.max_len = int(max_len)
        self.embedding_dim = int(embedding_dim)
        self.cbam_reduction = int(cbam_reduction)
        self.bn_momentum = float(bn_momentum)
        self.jamo = None if jamo is None else [[int(v) for v in row] for row in jamo]
        self.length_adaptive = length_adaptive
        self.pyramid_outputs = outputs
        self.pyramid_masks = masks
        self.ngram_buckets = int(ngram_buckets)
        self.ngram_dim = int(ngram_dim)
        self.ngram_sizes = [int(n) for n in ngram_sizes]
        self.ngram_rate = float(ngram_rate)
        self.ngram_hashes = int(ngram_hashes)
        self.ngram_pooling = str(ngram_pooling)
        self.linear_ngrams = int(linear_ngrams)

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks)

    def padding_mask(self, ids):
        """`(batch, steps)` bool, True on the characters that exist (None when not
        length-adaptive: the first release's model counts padding as text)."""
        return self.get_layer("padding_mask")(ids) if self.length_adaptive else None

    def stem(self, ids, training=False):
        """Character ids -> `(x, padding_mask)`, the first block's input and its mask (None when
        not length-adaptive)."""
        if self.length_adaptive:
            mask = self.padding_mask(ids)
            return self.get_layer("stem")(ids, padding_mask=mask, training=training), mask
        x = ids
        for name in STEM_LAYERS:
            layer = self.get_layer(name)
            x = layer(x, training=training) if name == "stem_bn" else layer(x)
        return x, None

    def wide(self, ids, padding_mask=None):
        """What the shallow classifiers read from character ids: the wide branch's `(batch,
        ngram_dim)` n-gram embedding, or with a linear branch `WideFeatures` (the embedding and
        the TF-IDF features); None when the model has no wide branch (`ngram_buckets=0`).
        Pass it on to `ResICClassifier.wide_probabilities` or `exits_at` as it is."""
        if not self.ngram_buckets:
            return None
        embedding = self.get_layer("ngram_embedding")(ids, padding_mask=padding_mask)
        if not self.linear_ngrams:
            return embedding
        return WideFeatures(embedding, *self.get_layer("tfidf_ngrams")(
            ids, padding_mask=padding_mask))

    def block(self, index: int, x, padding_mask=None, training=False):
        """Block `index` (0-based, in depth order), residual block then its CBAM:
        `(x, padding_mask)` -> the block's `(output, padding_mask)`."""
        name = block_name(index + 1)
        return _run_block(self.get_layer(f"{name}_residual"), self.get_layer(f"{name}_cbam"), x,
                          padding_mask, training)

    def block_strides(self, index: int) -> int:
        """The stride of block `index` (0-based): 2 at a stage boundary, else 1."""
        return self.get_layer(f"{block_name(index + 1)}_residual").strides

    def block_output_shape(self, index: int) -> tuple:
        """`(batch, steps, channels)` of block `index`'s output (steps None when
        length-adaptive)."""
        return tuple(self.pyramid_outputs[block_name(index + 1)].shape)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "vocab_size": self.vocab_size,
                "filters": self.filters, "blocks": self.blocks, "max_len": self.max_len,
                "embedding_dim": self.embedding_dim, "cbam_reduction": self.cbam_reduction,
                "bn_momentum": self.bn_momentum, "length_adaptive": self.length_adaptive,
                "ngram_buckets": self.ngram_buckets, "ngram_dim": self.ngram_dim,
                "ngram_sizes": self.ngram_sizes, "ngram_rate": self.ngram_rate,
                "ngram_hashes": self.ngram_hashes, "ngram_pooling": self.ngram_pooling,
                "jamo": self.jamo, "linear_ngrams": self.linear_ngrams}

    @classmethod
    def from_config(cls, config):
        # model.keras files written before 0.3 have no "length_adaptive": they are fixed-length.
        return cls(**{"length_adaptive": False, **config})


def head_inputs(padding_mask, wide) -> dict:
    """The keyword inputs of an exit head beside its block's features: the block's padding mask
    and the wide branch's embedding, each only when the model has one."""
    inputs = {}
    if padding_mask is not None:
        inputs["padding_mask"] = padding_mask
    if wide is not None:
        inputs["context"] = wide
    return inputs


def _is_text(x) -> bool:
    """True for raw strings: a list/array of str or bytes, a tf.string tensor, or a dataset of them."""
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        return getattr(spec, "dtype", None) == tf.string
    if isinstance(x, (tf.Tensor, tf.RaggedTensor)):
        return x.dtype == tf.string
    if isinstance(x, (list, tuple, np.ndarray)):
        arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
        if arr.dtype.kind in "US":
            return True
        return arr.dtype == object and arr.size > 0 and isinstance(arr.flat[0], (str, bytes))
    return False


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICClassifier(keras.Model):
    """A Res-IC backbone with one internal classifier per block and task.

    Outputs `{task}_ic1..{task}_icN` and `{task}_lc` (the last block's classifier) for every task,
    softmax probabilities. With a `preprocessor`, `fit`, `evaluate` and `predict` also take raw
    strings (mapped through the preprocessor inside `tf.data`, as keras-hub tasks do), and `fit`
    accepts labels keyed by task (`{"hate": ids}`): every exit of a task learns its label.

    Args:
        backbone: ResICBackbone.
        tasks: ordered mapping of task name -> class labels.
        dropout: float, dropout of every internal classifier. Defaults to 0.2.
        loss_weighting: "paper" (the paper's Eq. 1: IC i weighs i/N, the LC 1) or "uniform";
            what `compile(loss_weights="auto")` uses. Defaults to "paper".
        preprocessor: ResICPreprocessor or None.
        wide_fusion: how the wide branch (if the backbone has one) reaches the exits:
            "features" joins its n-gram embedding to every exit's pooled features (0.4);
            "late" gives it a classifier of its own per task, trained on its own loss, and
            every exit serves `(1 - wide_weight) * deep + wide_weight * wide` probabilities
            (`LateFusion`). Defaults to "features" (what models saved before 0.7 are).
        wide_weight: float in [0, 1], the shallow classifier's share under late fusion.
            With a linear branch (the backbone's `linear_ngrams`; late fusion only), the
            shallow classifier is the mean of the wide classifier and the task's `LinearHead`
            (`{task}_linear`, fitted apart by `resic_tf.training.train_linear_branch`, never
            trained by the model's loss).
        exit_pooling: "average" or "average_max", every exit's pooling (`InternalClassifier`).
            Defaults to "average" (what models saved before 0.12 are).
        nested_tasks: `ResICConfig.nested_tasks`: coarse tasks whose every exit serves
            probabilities derived from a finer task's (`DerivedLabels`). Defaults to none.

    Example:
        >>> model = build_model(config)                      # doctest: +SKIP
        >>> model.compile()                                  # Adam, Eq. 1, per-exit metrics
        >>> model.fit(texts, {"hate": hate_ids}, epochs=3)   # raw strings, labels per task
        >>> model.predict(["정말 재밌어요"])["hate_lc"]
    """

    def __init__(self, backbone: ResICBackbone, tasks, dropout: float = 0.2,
                 loss_weighting: str = "paper", preprocessor: ResICPreprocessor | None = None,
                 wide_fusion: str = "features", wide_weight: float = 0.5,
                 exit_pooling: str = "average", nested_tasks: Mapping | None = None, **kwargs):
        tasks = {str(t): [str(c) for c in classes] for t, classes in dict(tasks).items()}
        check_choice(loss_weighting, "loss_weighting", ("paper", "uniform"))
        # === Layers + Functional Model ===
        inputs = backbone.input
        features = backbone(inputs)
        names = [block_name(i) for i in range(1, backbone.num_blocks + 1)]
        blocks = [features[name] for name in names]
        masks = [features.get(f"{name}_padding_mask") for name in names]
        wide = features.get(NGRAM_OUTPUT)
        check_choice(wide_fusion, "wide_fusion", WIDE_FUSIONS)
        late = wide is not None and wide_fusion == "late"
        if backbone.linear_ngrams and not late:
            raise InvalidValueError(f"A linear branch is mixed into the exits by late fusion. "
                                    f"Received: linear_ngrams={backbone.linear_ngrams}, "
                                    f"wide_fusion={wide_fusion!r}")
        # The wide branch's own classifiers (one per task, on the n-gram embedding alone):
        # trained by their own loss (`compile(wide_loss=)`). Under "features" fusion they are
        # not outputs (they make the embedding a classifier in its own right, as fastText's is,
        # before the exits learn to mix it with the deep features); under "late" fusion every
        # exit's served probabilities average its deep head's with them (`LateFusion`).
        wide_heads = []
        if wide is not None:
            for task, classes in tasks.items():
                head = keras.layers.Dense(len(classes), activation="softmax", dtype="float32",
                                          name=f"{task}_wide")
                head.build((None, wide.shape[-1]))
                wide_heads.append(head)
        linear_heads, mixers = [], []
        if backbone.linear_ngrams:
            wide = WideFeatures(wide, *(features[k] for k in LINEAR_OUTPUTS))
            for task, classes in tasks.items():
                head = LinearHead(len(classes), backbone.linear_ngrams, name=f"{task}_linear",
                                  trainable=False)
                head.build()
                linear_heads.append(head)
                mixers.append(ShallowMix(name=f"{task}_shallow"))
        nested_tasks = {str(k): {"from": str(v["from"]), "classes": [int(c) for c in v["classes"]]}
                        for k, v in dict(nested_tasks or {}).items()}
        outputs = {}
        for t, (task, classes) in enumerate(tasks.items()):
            wide_probs = _shallow_probabilities(
                wide, wide_heads[t], (linear_heads[t], mixers[t]) if linear_heads else None) \
                if late else None
            for name, feature, mask in zip(exit_names(task, backbone.num_blocks), blocks, masks):
                # The layer that makes an output carries the exit's name: a nested task's own
                # exit is `{name}_own` and `DerivedLabels` makes the output.
                own = f"{name}_own" if task in nested_tasks else name
                if late:  # the deep head is `{name}_deep`
                    head = InternalClassifier(len(classes), dropout, exit_pooling,
                                              name=f"{name}_deep")
                    outputs[name] = LateFusion(wide_weight, bool(linear_heads), name=own)(
                        head(feature, **head_inputs(mask, None)), wide_probs)
                else:
                    head = InternalClassifier(len(classes), dropout, exit_pooling, name=own)
                    outputs[name] = head(feature, **head_inputs(mask, wide))
        for coarse in derivation_order(nested_tasks):
            spec = nested_tasks[coarse]
            for name, fine in zip(exit_names(coarse, backbone.num_blocks),
                                  exit_names(spec["from"], backbone.num_blocks)):
                outputs[name] = DerivedLabels(spec["classes"], len(tasks[coarse]), name=name)(
                    outputs[fine], outputs[name])
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.wide_heads = wide_heads
        self.linear_heads = linear_heads
        self.shallow_mixes = mixers
        # === Config ===
        self.backbone = backbone
        self.tasks = tasks
        self.dropout = float(dropout)
        self.loss_weighting = loss_weighting
        self.preprocessor = preprocessor
        self.wide_fusion = wide_fusion
        self.wide_weight = float(wide_weight)
        self.exit_pooling = exit_pooling
        self.nested_tasks = nested_tasks
        object.__setattr__(self, "_exit_metrics", None)  # untracked: see `metrics`
        self.distillation = self.wide_loss = 0.0

    @property
    def num_exits(self) -> int:
        return self.backbone.num_blocks

    def exit_names(self, task: str) -> list[str]:
        return exit_names(task, self.num_exits)

    def exit_heads(self, task: str) -> list[InternalClassifier]:
        """The task's internal classifiers in depth order (the LC last); under late fusion,
        the deep heads (`{exit}_deep`) whose probabilities `LateFusion` mixes."""
        suffix = "_deep" if self.late_fusion else "_own" if task in self.nested_tasks else ""
        return [self.get_layer(name + suffix) for name in self.exit_names(task)]

    def fusion_layers(self, task: str) -> list[LateFusion]:
        """The task's `LateFusion` layers, shallow to deep (late fusion only)."""
        suffix = "_own" if task in self.nested_tasks else ""
        return [self.get_layer(name + suffix) for name in self.exit_names(task)]

    @property
    def late_fusion(self) -> bool:
        return self.wide_fusion == "late" and bool(self.wide_heads)

    def wide_probabilities(self, wide) -> dict:
        """Task -> `(batch, classes)` probabilities of the wide classifier on the wide branch's
        embedding (`backbone.wide`): under late fusion, the model's exit 0, which needs neither
        the stem nor any block (early-exit policies may stop there). Empty without late
        fusion."""
        if not self.late_fusion:
            return {}
        return self._derive({task: self._shallow(t, wide) for t, task in enumerate(self.tasks)})

    def _shallow(self, t: int, wide):
        """Task `t`'s (index) shallow classifier on `backbone.wide`'s output."""
        linear = (self.linear_heads[t], self.shallow_mixes[t]) if self.linear_heads else None
        return _shallow_probabilities(wide, self.wide_heads[t], linear)

    def _derive(self, probs: dict) -> dict:
        """`probs` (task -> inference probabilities at one exit) with every nested task's
        derived from its finer task's (`nested_tasks`)."""
        probs = dict(probs)
        for coarse in derivation_order(self.nested_tasks):
            spec = self.nested_tasks[coarse]
            probs[coarse] = derive_probabilities(probs[spec["from"]], spec["classes"],
                                                 len(self.tasks[coarse]))
        return probs

    def exits_at(self, k: int, x, padding_mask=None, wide=None, wide_probs=None) -> dict:
        """Every task's inference probabilities at exit `k` (`exit_probabilities`), each nested
        task's derived from its finer task's as the model's outputs are."""
        wide_probs = wide_probs or {}
        return self._derive({task: self._own_exit(task, k, x, padding_mask, wide,
                                                  wide_probs.get(task)) for task in self.tasks})

    def exit_probabilities(self, task: str, k: int, x, padding_mask=None, wide=None,
                           wide_probs=None):
        """Inference probabilities of the task's exit `k` (0-based) from block `k`'s features
        and the wide branch's embedding (None without one), as the model's output computes
        them: the early-exit graph (`resic_tf.export`) calls this block by block. Under late
        fusion, `wide_probs` (the task's `wide_probabilities`, computed once per row) spares
        recomputing the wide classifier at every exit. A nested task's are derived from its
        finer task's (`exits_at` does that once for every task)."""
        if task in self.nested_tasks:
            return self.exits_at(k, x, padding_mask, wide)[task]
        return self._own_exit(task, k, x, padding_mask, wide, wide_probs)

    def _own_exit(self, task: str, k: int, x, padding_mask=None, wide=None, wide_probs=None):
        head = self.exit_heads(task)[k]
        if not self.late_fusion:
            return head(x, **head_inputs(padding_mask, wide), training=False)
        deep = head(x, **head_inputs(padding_mask, None), training=False)
        if wide_probs is None:
            wide_probs = self._shallow(list(self.tasks).index(task), wide)
        return self.fusion_layers(task)[k](deep, wide_probs, training=False)

    @property
    def wide_frozen(self) -> bool:
        """True when the wide branch's table is frozen (trained apart by
        `resic_tf.training.train_wide_stage`): `compile` then gives it no loss."""
        return bool(self.wide_heads) and not self.backbone.get_layer("ngram_embedding").trainable

    def freeze_wide(self) -> None:
        """Make the wide branch (its table and classifiers) non-trainable; call before
        `compile`. Saved with the model (`get_config`)."""
        self.backbone.get_layer("ngram_embedding").trainable = False
        for head in self.wide_heads:
            head.trainable = False

    # --- compile: keras-hub style "auto" defaults ---------------------------------------------

    def compile(self, optimizer="auto", loss="auto", loss_weights="auto", metrics="auto",
                label_smoothing: float = 0.0, class_weights: Mapping | None = None,
                distillation: float = 0.0, wide_loss: float = 0.0, **kwargs):
        """Keras's `compile` with the paper's defaults.

        `optimizer="auto"`: Adam(1e-3). `loss="auto"`: cross-entropy of the task's label on
        every exit (`ExitLoss`), with `label_smoothing` and, for the tasks in `class_weights`
        (task -> one weight per class, e.g. from `resic_tf.losses.class_weights`), per-class
        weights.
        `loss_weights="auto"`: Eq. 1 from the model's own tasks, depth and `loss_weighting`.
        `metrics="auto"`: `{output}_accuracy` and `{output}_macro_f1` of every exit, stateful
        (macro-F1 from a confusion matrix accumulated over the whole pass). `distillation`: the
        weight of self-distillation, every internal classifier learning the LC's distribution
        (`resic_tf.losses.self_distillation`, with the ICs' Eq. 1 weights), added to the loss.
        `wide_loss`: the weight of the wide branch's own classifiers' cross-entropy (one per
        task, on the n-gram embedding alone), added to the loss; models without a wide branch
        ignore it, and a late-fusion model, whose wide classifiers learn from nothing else,
        takes 0 as 1 (and a frozen wide branch, `wide_frozen`, as 0).
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3)
        if isinstance(loss, str) and loss == "auto":
            class_weights = dict(class_weights or {})
            unknown = sorted(set(class_weights) - set(self.tasks))
            if unknown:
                raise InvalidValueError(f"`class_weights` names tasks {unknown} that the model "
                                        f"does not have; its tasks are {list(self.tasks)}")
            loss = {}
            for task, classes in self.tasks.items():
                weights = class_weights.get(task)
                if weights is not None and len(weights) != len(classes):
                    raise InvalidValueError(f"`class_weights[{task!r}]` needs one weight per "
                                            f"class ({len(classes)}). Received: {list(weights)}")
                for name in self.exit_names(task):
                    loss[name] = ExitLoss(label_smoothing, weights)
        if loss_weights == "auto":
            loss_weights = loss_weights_of(self)
        if isinstance(loss_weights, Mapping) and set(loss_weights) != set(self.output_names):
            # Keras 3 silently reassigns misspelled weight keys by sorted position: refuse instead.
            raise InvalidValueError(f"Loss-weight keys {sorted(loss_weights)} do not match model "
                                    f"outputs {sorted(self.output_names)}")
        exit_metrics = None
        if isinstance(metrics, str) and metrics == "auto":
            exit_metrics = ExitMetrics({name: len(classes) for task, classes in self.tasks.items()
                                        for name in self.exit_names(task)})
            metrics = None
        object.__setattr__(self, "_exit_metrics", exit_metrics)
        self.distillation = check_scalar(distillation, "distillation", float, min_val=0.0)
        self.wide_loss = check_scalar(wide_loss, "wide_loss", float, min_val=0.0)
        if self.wide_frozen:  # trained apart (`resic_tf.training.train_wide_stage`): no more
            self.wide_loss = 0.0
        elif self.late_fusion and not self.wide_loss:  # its wide classifiers learn only from it
            self.wide_loss = 1.0
        for head in self.wide_heads:  # untrained without their loss (and no missing-gradient
            head.trainable = self.wide_loss > 0  # warning from the optimizer)
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights,
                        metrics=metrics, **kwargs)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and self._exit_metrics is not None:
            metrics.append(self._exit_metrics)
        return metrics

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._exit_metrics is not None:
            self._exit_metrics.update_state(y, y_pred)
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3 means each step's logs over the workers with `strategy.reduce("MEAN", v,
            # axis=0)`, which fails on scalars (tensorflow/tensorflow#72388): give it vectors of
            # one. The epoch's logs are the metrics' results, all-reduced over every worker.
            logs = tf.nest.map_structure(
                lambda v: tf.reshape(v, [1]) if getattr(v, "shape", None) == () else v, logs)
        return logs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if self.distillation and isinstance(y_pred, Mapping):
            weights = loss_weights_of(self)
            for task in self.tasks:
                names = self.exit_names(task)
                loss = loss + self.distillation * self_distillation(
                    y_pred[names[-1]], [y_pred[n] for n in names[:-1]],
                    [weights[n] for n in names[:-1]])
        if self.wide_loss and self.wide_heads and x is not None and isinstance(y, Mapping):
            wide = self.backbone.get_layer("ngram_embedding")(x)
            for task, head in zip(self.tasks, self.wide_heads):
                target = y.get(self.exit_names(task)[-1])
                if target is not None:
                    lc_loss = self.loss[self.exit_names(task)[-1]] \
                        if isinstance(self.loss, Mapping) else ExitLoss()
                    loss = loss + self.wide_loss * lc_loss(target, head(wide))
        return loss

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config["exit_metrics"] = self._exit_metrics is not None
            config["distillation"] = self.distillation
            config["wide_loss"] = self.wide_loss
        return config

    def compile_from_config(self, config):
        config = dict(config)
        auto_metrics = config.pop("exit_metrics", False)
        extra = {k: config.pop(k, 0.0) for k in ("distillation", "wide_loss")}
        config = keras.saving.deserialize_keras_object(config)
        if auto_metrics:
            config["metrics"] = "auto"
        self.compile(**config, **extra)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # --- raw strings in fit / evaluate / predict ------------------------------------------------

    def _targets(self, y):
        """Labels keyed by task -> the same labels for every exit of that task."""
        if isinstance(y, Mapping) and y and set(y) <= set(self.tasks):
            return {name: y[task] for task in y for name in self.exit_names(task)}
        return y

    def _text_dataset(self, x, y=None, sample_weight=None, batch_size=None, shuffle=False,
                      by_length=None):
        if self.preprocessor is None:
            raise InvalidValueError("This model has no preprocessor, so it takes character ids, "
                                    "not strings; build it with `build_model(config, "
                                    "vocabulary)` or attach a ResICPreprocessor")
        # Evaluation and prediction of a length-adaptive model run texts by length (each batch
        # padded to its longest: the outputs do not change); training batches stay random, as
        # length-grouped ones trained less accurate models (pass a dataset made by
        # `string_dataset(..., by_length=True)` to train on them). `by_length=False`: `x` is
        # already in the order wanted.
        if by_length is None:
            by_length = self.backbone.length_adaptive and not shuffle
        ds = x if isinstance(x, tf.data.Dataset) else \
            string_dataset(x, y, batch_size or 32, shuffle, sample_weight=sample_weight,
                           by_length=by_length)

        def prepare(*data):
            ids, y, sw = keras.utils.unpack_x_y_sample_weight(data)
            return keras.utils.pack_x_y_sample_weight(self.preprocessor(ids), self._targets(y), sw)

        return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True).prefetch(tf.data.AUTOTUNE)

    def fit(self, x=None, y=None, batch_size=None, validation_data=None, shuffle=True,
            sample_weight=None, validation_split=0.0, **kwargs):
        if validation_split and _is_text(x) and not isinstance(x, tf.data.Dataset):
            # Keras splits arrays but not datasets: hold out the last rows here, as Keras does.
            x, y, sample_weight = list(x), y, sample_weight
            cut = int(len(x) * (1.0 - validation_split))
            part = lambda v, s: None if v is None else (  # noqa: E731
                {k: np.asarray(a)[s] for k, a in v.items()} if isinstance(v, Mapping)
                else np.asarray(v)[s])
            validation_data = keras.utils.pack_x_y_sample_weight(
                x[cut:], part(y, slice(cut, None)), part(sample_weight, slice(cut, None)))
            x, y, sample_weight = x[:cut], part(y, slice(None, cut)), \
                part(sample_weight, slice(None, cut))
            validation_split = 0.0
        text_batch_size = batch_size
        if _is_text(x):
            x = self._text_dataset(x, y, sample_weight, batch_size, shuffle)
            y = sample_weight = batch_size = None
            shuffle = False  # the dataset shuffles itself
        elif y is not None:
            y = self._targets(y)
        if isinstance(x, tf.data.Dataset):
            shuffle = False  # Keras ignores it for datasets, with a warning
        if validation_data is not None and not isinstance(validation_data, tf.data.Dataset):
            vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(validation_data))
            if _is_text(vx):
                validation_data = self._text_dataset(vx, vy, vsw, text_batch_size)
            else:
                validation_data = keras.utils.pack_x_y_sample_weight(vx, self._targets(vy), vsw)
        elif validation_data is not None and _is_text(validation_data):
            validation_data = self._text_dataset(validation_data)
        return super().fit(x, y, batch_size=batch_size, validation_data=validation_data,
                           shuffle=shuffle, sample_weight=sample_weight,
                           validation_split=validation_split, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds a distributed model from the first batch averaged over the replicas with
        # `strategy.reduce`, which MultiWorkerMirroredStrategy cannot do for a nested batch (and
        # a mean of character ids means nothing): build from this worker's first replica's.
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        if _is_text(x):
            x = self._text_dataset(x, y, sample_weight, batch_size)
            y = sample_weight = batch_size = None
        elif y is not None:
            y = self._targets(y)
        return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        """Keras's `predict`; raw strings (not a dataset) are run shortest first, in batches of
        similar length, and the outputs come back in input order."""
        if not _is_text(x) or isinstance(x, tf.data.Dataset):
            if _is_text(x):
                x, batch_size = self._text_dataset(x), None
            return super().predict(x, batch_size=batch_size, **kwargs)
        texts = [t if isinstance(t, bytes) else str(t) for t in
                 (x.numpy().tolist() if isinstance(x, tf.Tensor) else list(x))]
        # Sorted here (not in the dataset) so that the outputs can be put back in input order.
        order = length_order(texts) if self.backbone.length_adaptive else np.arange(len(texts))
        ds = self._text_dataset([texts[i] for i in order], batch_size=batch_size, by_length=False)
        outputs = super().predict(ds, **kwargs)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return tf.nest.map_structure(lambda a: a[inverse], outputs)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "backbone": keras.layers.serialize(self.backbone), "tasks": self.tasks,
                "dropout": self.dropout, "loss_weighting": self.loss_weighting,
                "wide_fusion": self.wide_fusion, "wide_weight": self.wide_weight,
                "exit_pooling": self.exit_pooling, "nested_tasks": self.nested_tasks,
                "preprocessor": None if self.preprocessor is None
                else keras.layers.serialize(self.preprocessor),
                **({"wide_frozen": True} if self.wide_frozen else {})}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        frozen = config.pop("wide_frozen", False)
        for key in ("backbone", "preprocessor"):
            if isinstance(config.get(key), dict):
                config[key] = keras.layers.deserialize(config[key])
        model = cls(**config)
        if frozen:
            model.freeze_wide()
        return model


def _shallow_probabilities(wide, wide_head, linear=None):
    """A task's shallow classifier (late fusion's exit 0) on `ResICBackbone.wide`'s output: the
    wide classifier, or with `linear` (the task's `LinearHead` and its `ShallowMix`) the mix
    of it and the linear classifier."""
    if linear is None:
        return wide_head(wide)
    head, mean = linear
    return mean([wide_head(wide.embedding), head(wide.columns, wide.weights)])


def loss_weights_of(model: ResICClassifier) -> dict[str, float]:
    """The model's Eq. 1 weights, from its own tasks, depth and `loss_weighting`."""
    return loss_weights(model.tasks, model.num_exits, model.loss_weighting)


def build_backbone(config: ResICConfig, chars: Sequence[str] | None = None) -> ResICBackbone:
    """The task-agnostic backbone described by `config`; `config.jamo_embedding` needs the
    vocabulary's characters `chars` (the jamo of each id)."""
    jamo = None
    if config.jamo_embedding:
        if chars is None:
            raise InvalidValueError("A model with jamo embeddings is built from its vocabulary: "
                                    "build_model(config, vocabulary)")
        jamo = jamo_of(chars)
    return ResICBackbone(config.vocab_size, config.filters, config.stage_blocks, config.max_len,
                         config.embedding_dim, config.cbam_reduction, config.bn_momentum,
                         config.length_adaptive, config.ngram_buckets, config.ngram_dim,
                         config.ngram_sizes, config.ngram_rate, config.ngram_hashes,
                         config.ngram_pooling, jamo, config.linear_ngrams)


def build_preprocessor(config: ResICConfig, chars: Sequence[str]) -> ResICPreprocessor:
    """Raw strings -> the character ids a model of `config` reads: truncated at `max_len`, and
    padded to it unless length-adaptive. The one recipe for the model's own preprocessor, a
    run's, and the linear branch's vocabulary pass (`resic_tf.training.linear_vocabulary`)."""
    return ResICPreprocessor(chars, config.max_len, pad_to_max_len=not config.length_adaptive)


def build_model(config: ResICConfig, vocabulary=None) -> ResICClassifier:
    """The full Res-IC model with outputs `{task}_ic1..{task}_icN` and `{task}_lc` for every task.

    With a `CharVocabulary` (or a list of characters), the model gets a `ResICPreprocessor` and
    predicts raw strings.

    Example:
        >>> cfg = ResICConfig(tasks={"hate": ["hate", "none"]}, vocab_size=100,
        ...                   filters=(8, 8, 8, 8))
        >>> sorted(build_model(cfg).output_names)[:2]
        ['hate_ic1', 'hate_ic2']
    """
    preprocessor = chars = None
    if vocabulary is not None:
        chars = getattr(vocabulary, "chars", vocabulary)
        if len(chars) + 2 != config.vocab_size:
            raise InvalidValueError(f"The vocabulary has {len(chars) + 2} ids (padding and OOV "
                                    f"included) but the config says vocab_size="
                                    f"{config.vocab_size}")
        preprocessor = build_preprocessor(config, chars)
    return ResICClassifier(build_backbone(config, chars), config.tasks, config.dropout,
                           config.loss_weighting, preprocessor, config.wide_fusion,
                           config.wide_weight, config.exit_pooling,
                           {k: dict(v) for k, v in config.nested_tasks.items()},
                           name=f"{config.arch}_ic")


def exit_loss_weights(config: ResICConfig) -> dict[str, float]:
    """The paper's Eq. 1: weight i/N for `{task}_ic{i}`, 1.0 for `{task}_lc` ("uniform": all 1.0)."""
    return loss_weights(config.tasks, config.num_exits, config.loss_weighting)
