"""Res-IC building blocks as small, registered Keras layers.

Papers: He et al., "Deep Residual Learning for Image Recognition" (https://arxiv.org/abs/1512.03385);
Woo et al., "CBAM: Convolutional Block Attention Module" (https://arxiv.org/abs/1807.06521).
Every layer loads with `keras.saving.load_model` without `custom_objects`.

Padding. The layers take an optional `padding_mask`, `(batch, steps)` bool, True on a text's own
steps (`PaddingMask` makes it from character ids). With it, padding never influences a
prediction: padded steps are zeroed after every convolution, batch normalisation takes its batch
statistics over real steps only, and every pooling (CBAM's and the exits') covers real steps
only; a strided layer's output mask is `padding_mask[:, ::strides]` (`downsample_mask`). Without
it (runs trained before 0.3, `length_adaptive=False`) every step counts, padding included.
"""
from __future__ import annotations

import keras
from keras import ops

from resic_tf.config import EXIT_POOLINGS, NGRAM_POOLINGS
from resic_tf.validation import (InvalidValueError, check_choice, check_int_sequence,
                                 check_scalar)

PADDINGS = ("same", "centered")


def downsample_mask(padding_mask, strides: int):
    """The mask of a layer with `strides`: output step j is centred on input step j * strides."""
    return padding_mask if padding_mask is None or strides == 1 else padding_mask[:, ::strides]


def zero_padding(x, padding_mask):
    """`x` `(batch, steps, channels)` with its padded steps set to 0 (unchanged without a mask)."""
    if padding_mask is None:
        return x
    return x * ops.expand_dims(ops.cast(padding_mask, x.dtype), -1)


def real_steps(padding_mask, dtype):
    """`(batch, 1)` count of each row's real steps, at least 1 (a divisor for averages)."""
    return ops.maximum(ops.sum(ops.cast(padding_mask, dtype), axis=1, keepdims=True), 1.0)


def masked_average(x, padding_mask):
    """Mean over the real steps of `x` `(batch, steps, channels)`; 0 for a row with none."""
    return ops.sum(zero_padding(x, padding_mask), axis=1) / real_steps(padding_mask, x.dtype)


def masked_max(x, padding_mask):
    """Max over the real steps of `x` `(batch, steps, channels)` (a row needs one at least)."""
    return ops.max(ops.where(ops.expand_dims(padding_mask, -1), x, ops.cast(-1e9, x.dtype)),
                   axis=1)


@keras.saving.register_keras_serializable(package="resic_tf")
class PaddingMask(keras.layers.Layer):
    """Character ids `(batch, steps)` -> bool `(batch, steps)`, True on the text's own steps.

    A text runs to its last non-padding id (id 0 pads). An empty text keeps its first step (one
    padding step), so every row has at least one step and no pooling is over nothing: its
    prediction is the model's output for a lone padding character, finite and the same at any
    padded length.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)

    def call(self, ids):
        steps = ops.shape(ids)[1]
        positions = ops.arange(1, steps + 1, dtype="int32")
        real = ops.cast(ops.not_equal(ids, 0), "int32")
        length = ops.maximum(ops.max(real * ops.expand_dims(positions, 0), axis=1), 1)
        return ops.less(ops.expand_dims(positions, 0), ops.expand_dims(length, 1) + 1)

    def compute_output_spec(self, ids):
        return keras.KerasTensor(ids.shape, dtype="bool")


@keras.saving.register_keras_serializable(package="resic_tf")
class SequenceConv1D(keras.layers.Conv1D):
    """`keras.layers.Conv1D` that runs a wide stride-1 "same" convolution as `kernel_size`
    shifted matrix products, with the same weights and outputs.

    Measured on 2 CPU cores (oneDNN, TF 2.21, batch 256, 512 -> 512 channels, kernel 3): the
    convolution op reaches 124 GFLOP/s on 4 steps and 269 on 17, the matrix products 264 and
    298; below 512 input channels the convolution op is faster (docs/MEASURED.md). A text's
    last stage has few steps, so this is where length-adaptive batches lost most efficiency.

    Args:
        matmul_min_channels: int, input channels from which the matrix-product form is used.
            Defaults to 512.
        Other arguments: as `keras.layers.Conv1D`.
    """

    def __init__(self, *args, matmul_min_channels: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_min_channels = check_scalar(matmul_min_channels, "matmul_min_channels", int,
                                                min_val=1)

    def call(self, inputs):
        if (tuple(self.strides) != (1,) or self.padding != "same" or self.groups != 1
                or tuple(self.dilation_rate) != (1,) or self.data_format != "channels_last"
                or self.kernel.shape[1] < self.matmul_min_channels):
            return super().call(inputs)
        outputs = self._shifted_matmuls(inputs, self.kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs if self.activation is None else self.activation(outputs)

    def _shifted_matmuls(self, inputs, kernel):
        k, c_in, _ = kernel.shape
        left = (k - 1) // 2  # where TensorFlow's "same" puts the padding at stride 1
        x = ops.pad(inputs, ((0, 0), (left, k - 1 - left), (0, 0)))
        batch, steps = ops.shape(inputs)[0], ops.shape(inputs)[1]
        out = None
        for i in range(k):
            part = ops.matmul(ops.reshape(x[:, i:i + steps], (-1, c_in)), kernel[i])
            out = part if out is None else out + part
        return ops.reshape(out, (batch, steps, self.filters))

    def get_config(self):
        return {**super().get_config(), "matmul_min_channels": self.matmul_min_channels}


@keras.saving.register_keras_serializable(package="resic_tf")
class ResidualBlock(keras.layers.Layer):
    """Basic 1-D residual block: conv3-BN-ReLU-conv3-BN plus shortcut, then ReLU.

    With `strides > 1` or a change of channels the shortcut is a strided 1x1 conv + BN (projection).

    Args:
        filters: int, output channels.
        strides: int, stride of the first conv (2 at a stage boundary). Defaults to 1.
        kernel_size: int, kernel of both convs. Defaults to 3.
        bn_momentum: float, BatchNormalization moving-average momentum. Defaults to 0.9 (the
            ResNet papers' value; Keras's 0.99 needs ~600 steps to forget its initial variance,
            which on small data made every exit predict one class for the first epochs).
        padding: "same" (TensorFlow's: with strides 2 and an even length the window shifts one
            step right, so outputs depend on how far the batch is padded; runs before 0.3) or
            "centered" (`(kernel_size - 1) // 2` steps on the left whatever the length: output
            step j is centred on input step j * strides, as `downsample_mask` assumes).
            Defaults to "same".

    Call arguments:
        inputs: `(batch, steps, channels)`.
        padding_mask: optional bool `(batch, steps)`; with it the padded steps of the output are
            0 and batch normalisation takes its statistics over real steps only.
        training: bool, batch-norm mode.

    Output shape: `(batch, ceil(steps / strides), filters)`.
    """

    def __init__(self, filters: int, strides: int = 1, kernel_size: int = 3,
                 bn_momentum: float = 0.9, padding: str = "same", **kwargs):
        super().__init__(**kwargs)
        self.padding = check_choice(padding, "padding", PADDINGS)
        self.filters = check_scalar(filters, "filters", int, min_val=1)
        self.strides = check_scalar(strides, "strides", int, min_val=1)
        self.kernel_size = check_scalar(kernel_size, "kernel_size", int, min_val=1)
        self.bn_momentum = check_scalar(bn_momentum, "bn_momentum", float, min_val=0.0,
                                        max_val=1.0, include_boundaries="neither")
        # Stride-1 "same" padding is centred whatever the length; only a strided conv needs the
        # explicit left padding of "centered".
        explicit = self.padding == "centered" and self.strides > 1
        conv = lambda k, s, name: SequenceConv1D(  # noqa: E731
            self.filters, k, strides=s, padding="valid" if explicit and s > 1 else "same",
            use_bias=False, kernel_initializer="he_normal", name=name)
        self._pad = ((self.kernel_size - 1) // 2, self.kernel_size // 2) if explicit else None
        self.conv1 = conv(self.kernel_size, self.strides, "conv1")
        self.bn1 = keras.layers.BatchNormalization(momentum=self.bn_momentum, name="bn1")
        self.conv2 = conv(self.kernel_size, 1, "conv2")
        self.bn2 = keras.layers.BatchNormalization(momentum=self.bn_momentum, name="bn2")
        # A strided 1x1 conv equals subsampling then a stride-1 1x1 conv. We subsample by slicing:
        # oneDNN (TF 2.21, CPU) corrupts the heap on a strided 1x1 Conv1D when the batch is odd.
        self.proj_conv = conv(1, 1, "proj_conv")
        self.proj_bn = keras.layers.BatchNormalization(momentum=self.bn_momentum, name="proj_bn")
        self.use_projection = None

    def build(self, input_shape):
        self.use_projection = self.strides != 1 or input_shape[-1] != self.filters
        self.conv1.build(input_shape)
        shape = self.compute_output_shape(input_shape)
        self.bn1.build(shape)
        self.conv2.build(shape)
        self.bn2.build(shape)
        if self.use_projection:
            self.proj_conv.build((*input_shape[:-2], shape[-2], input_shape[-1]))
            self.proj_bn.build(shape)

    def call(self, inputs, padding_mask=None, training=None):
        mask = downsample_mask(padding_mask, self.strides)
        inputs = zero_padding(inputs, padding_mask)
        x = inputs if self._pad is None else ops.pad(inputs, ((0, 0), self._pad, (0, 0)))
        x = zero_padding(ops.relu(self.bn1(self.conv1(x), training=training, mask=mask)), mask)
        x = self.bn2(self.conv2(x), training=training, mask=mask)
        shortcut = inputs
        if self.use_projection:
            shortcut = self.proj_bn(self.proj_conv(inputs[:, :: self.strides, :]),
                                    training=training, mask=mask)
        return zero_padding(ops.relu(x + shortcut), mask)

    def compute_output_shape(self, input_shape):
        steps = input_shape[-2]
        steps = None if steps is None else -(-steps // self.strides)
        return (*input_shape[:-2], steps, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "kernel_size": self.kernel_size, "bn_momentum": self.bn_momentum,
                "padding": self.padding}


@keras.saving.register_keras_serializable(package="resic_tf")
class CBAM(keras.layers.Layer):
    """Convolutional Block Attention Module for sequences: channel, then temporal attention.

    Channel attention: a shared MLP (C -> C/reduction -> C) on the average- and max-pooled
    features, summed, sigmoid. Temporal attention: a conv over the per-step channel mean and
    channel max, sigmoid. With a `padding_mask` the average and max pooling cover the text's own
    steps only, the temporal conv sees zeros beyond the text, and padded output steps are 0;
    without one, pooling runs over all steps, padding included.

    Args:
        reduction: int, channel MLP reduction ratio (hidden size is at least 1). Defaults to 16.
        kernel_size: int, temporal-attention conv kernel. Defaults to 7.

    Call arguments:
        inputs: `(batch, steps, channels)`.
        padding_mask: optional bool `(batch, steps)`.

    Input shape / output shape: `(batch, steps, channels)`.
    """

    def __init__(self, reduction: int = 16, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        self.reduction = check_scalar(reduction, "reduction", int, min_val=1)
        self.kernel_size = check_scalar(kernel_size, "kernel_size", int, min_val=1)
        self.temporal_conv = keras.layers.Conv1D(1, self.kernel_size, padding="same",
                                                 name="temporal_conv")
        self.mlp_hidden = None
        self.mlp_out = None

    def build(self, input_shape):
        channels = input_shape[-1]
        self.mlp_hidden = keras.layers.Dense(max(1, channels // self.reduction),
                                             activation="relu", name="mlp_hidden")
        self.mlp_out = keras.layers.Dense(channels, name="mlp_out")
        self.mlp_hidden.build((input_shape[0], channels))
        self.mlp_out.build((input_shape[0], self.mlp_hidden.units))
        self.temporal_conv.build((*input_shape[:-1], 2))

    def call(self, inputs, padding_mask=None):
        mlp = lambda v: self.mlp_out(self.mlp_hidden(v))  # noqa: E731
        if padding_mask is None:
            average, maximum = ops.mean(inputs, axis=1), ops.max(inputs, axis=1)
        else:
            inputs = zero_padding(inputs, padding_mask)  # zeroed once: the average needs no more
            average = ops.sum(inputs, axis=1) / real_steps(padding_mask, inputs.dtype)
            real = ops.expand_dims(padding_mask, -1)
            lowest = -3.0e38 if inputs.dtype == "float32" else -6.0e4
            maximum = ops.max(ops.where(real, inputs, lowest), axis=1)
            maximum = ops.where(ops.any(real, axis=1), maximum, 0.0)  # a row with no step
        channel = ops.sigmoid(mlp(average) + mlp(maximum))
        x = inputs * ops.expand_dims(channel, 1)
        pooled = ops.concatenate([ops.mean(x, axis=-1, keepdims=True),
                                  ops.max(x, axis=-1, keepdims=True)], axis=-1)
        return zero_padding(x * ops.sigmoid(self.temporal_conv(pooled)), padding_mask)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction,
                "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="resic_tf")
class InternalClassifier(keras.layers.Layer):
    """Exit head: global pooling, dropout, dense softmax.

    `pooling="average"` (the paper's) averages the steps; "average_max" joins the average and the
    maximum over the steps (as text CNNs pool since Kim 2014: one telling phrase is not
    averaged away by a long text). With a `padding_mask` both cover the text's own steps only (as
    `keras.layers.GlobalAveragePooling1D` and `GlobalMaxPooling1D` do with a mask); without one,
    every step.

    Args:
        num_classes: int, classes of the task.
        dropout: float in [0, 1), active in training only. Defaults to 0.2.
        pooling: "average" or "average_max". Defaults to "average".

    Call arguments:
        inputs: `(batch, steps, channels)`.
        padding_mask: optional bool `(batch, steps)`.
        context: optional `(batch, width)`, joined to the pooled features before dropout (the
            wide branch's n-gram embedding, `NGramEmbedding`).
        training: bool, dropout mode.

    Input shape: `(batch, steps, channels)`. Output shape: `(batch, num_classes)`, float32
    probabilities.
    """

    def __init__(self, num_classes: int, dropout: float = 0.2, pooling: str = "average",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_scalar(num_classes, "num_classes", int, min_val=1)
        self.dropout = check_scalar(dropout, "dropout", float, min_val=0.0, max_val=1.0,
                                    include_boundaries="left")
        self.pooling = check_choice(pooling, "pooling", EXIT_POOLINGS)
        self.drop = keras.layers.Dropout(self.dropout, name="dropout")
        self.dense = keras.layers.Dense(self.num_classes, activation="softmax", name="dense",
                                        dtype="float32")

    def build(self, inputs_shape, context_shape=None):
        pooled = inputs_shape[-1] * (2 if self.pooling == "average_max" else 1)
        width = pooled + (0 if context_shape is None else context_shape[-1])
        self.dense.build((inputs_shape[0], width))

    def call(self, inputs, padding_mask=None, context=None, training=None):
        pooled = ops.mean(inputs, axis=1) if padding_mask is None else \
            masked_average(inputs, padding_mask)
        if self.pooling == "average_max":
            peak = ops.max(inputs, axis=1) if padding_mask is None else \
                masked_max(inputs, padding_mask)
            pooled = ops.concatenate([pooled, peak], axis=-1)
        if context is not None:
            pooled = ops.concatenate([pooled, ops.cast(context, pooled.dtype)], axis=-1)
        return self.dense(self.drop(pooled, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dropout": self.dropout,
                "pooling": self.pooling}


# Rows of the stem's jamo tables: "not a syllable" plus 19 initials, 21 medials, 28 finals
# (one of them "no final").
JAMO_ROWS = (20, 22, 29)


@keras.saving.register_keras_serializable(package="resic_tf")
class Stem(keras.layers.Layer):
    """Character ids -> the first block's input: embedding, conv (kernel 3), BN, ReLU.

    The stem of length-adaptive models (one layer, so that its batch normalisation can take the
    `padding_mask`); models trained before 0.3 keep the same four layers unwrapped, with the same
    weights in the same order.

    Args:
        vocab_size: int, character ids (padding 0 and out-of-vocabulary 1 included).
        embedding_dim: int.
        filters: int, output channels.
        bn_momentum: float. Defaults to 0.9.
        jamo: optional `[initial, medial, final]` jamo numbers of every id
            (`resic_tf.vocabulary.jamo_of`): each character's vector then adds the vectors of
            its Hangul jamo (19 initials, 21 medials, 28 finals and "none", each its own small
            table) to its own, so that the ~2,000 syllables share what their ~70 jamo learn (a
            rare syllable is no longer a stranger). Defaults to None.

    Call arguments:
        ids: int `(batch, steps)`.
        padding_mask: optional bool `(batch, steps)`: padded steps of the embedding and of the
            output are 0, batch statistics over real steps only.
        training: bool, batch-norm mode.

    Output shape: `(batch, steps, filters)`.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, filters: int,
                 bn_momentum: float = 0.9, jamo=None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = check_scalar(vocab_size, "vocab_size", int, min_val=1)
        self.embedding_dim = check_scalar(embedding_dim, "embedding_dim", int, min_val=1)
        self.filters = check_scalar(filters, "filters", int, min_val=1)
        self.bn_momentum = check_scalar(bn_momentum, "bn_momentum", float, min_val=0.0,
                                        max_val=1.0, include_boundaries="neither")
        self.embedding = keras.layers.Embedding(self.vocab_size, self.embedding_dim,
                                                name="embedding")
        self.jamo = None if jamo is None else [[int(v) for v in row] for row in jamo]
        self.jamo_embeddings = []
        if self.jamo is not None:
            if len(self.jamo) != self.vocab_size or any(
                    len(row) != 3 or not all(0 <= v < n for v, n in zip(row, JAMO_ROWS))
                    for row in self.jamo):
                raise InvalidValueError(
                    f"`jamo` needs [initial, medial, final] numbers within {list(JAMO_ROWS)} for "
                    f"each of the {self.vocab_size} ids. Received: {len(self.jamo)} rows")
            self.jamo_embeddings = [
                keras.layers.Embedding(n, self.embedding_dim, name=f"jamo_{part}")
                for n, part in zip(JAMO_ROWS, ("initial", "medial", "final"))]
        self.conv = keras.layers.Conv1D(self.filters, 3, padding="same", use_bias=False,
                                        kernel_initializer="he_normal", name="stem_conv")
        self.bn = keras.layers.BatchNormalization(momentum=self.bn_momentum, name="stem_bn")

    def build(self, input_shape):
        self.embedding.build(input_shape)
        for table in self.jamo_embeddings:
            table.build(input_shape)
        shape = (*input_shape, self.embedding_dim)
        self.conv.build(shape)
        self.bn.build((*input_shape, self.filters))

    def embed(self, ids):
        """`(batch, steps, embedding_dim)`: each id's vector, plus its jamo's with `jamo`."""
        x = self.embedding(ids)
        if self.jamo is not None:
            parts = ops.take(ops.convert_to_tensor(self.jamo, "int32"), ids, axis=0)
            for k, table in enumerate(self.jamo_embeddings):
                x = x + table(parts[..., k])
        return x

    def call(self, ids, padding_mask=None, training=None):
        x = zero_padding(self.embed(ids), padding_mask)
        x = self.bn(self.conv(x), training=training, mask=padding_mask)
        return zero_padding(ops.relu(x), padding_mask)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.filters)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim, "filters": self.filters,
                "bn_momentum": self.bn_momentum, "jamo": self.jamo}


# Polynomial hash of an n-gram of character ids, modulo a Mersenne prime: integer ops only, so
# the served graph computes the same buckets as training (TF Serving runs them).
_HASH_PRIME = 2_147_483_647  # 2**31 - 1
_HASH_BASE = 1_000_003
_REHASH_BASE = 48_271


def ngram_hashes(ids, n: int):
    """`(batch, steps)` int64 hash of the character n-gram starting at each step (ids past the
    end count as padding, 0). Step t's hash is `h_n(ids[t..t+n-1])`, where `h(s) = n` before the
    first id and `h = (h * 1000003 + id + 1) mod (2**31 - 1)` for each id in turn."""
    ids = ops.cast(ids, "int64")
    padded = ops.pad(ids, [[0, 0], [0, n - 1]])
    steps = ops.shape(ids)[1]
    h = ops.full_like(ids, n)
    for k in range(n):
        h = _hash_step(h, padded[:, k: k + steps])
    return h


def text_ngram_hashes(ids, ngram_sizes, padding_mask=None):
    """Every character n-gram of each size in `ngram_sizes` (`ngram_hashes`, sizes in order),
    `(batch, features)` int64, and whether it lies wholly within the text (bool, same shape: a
    text shorter than n has no n-gram of size n). Without `padding_mask`, a text ends at its
    last non-zero id (`PaddingMask`)."""
    if padding_mask is None:
        padding_mask = PaddingMask()(ids)
    hashes, inside = [], []
    for n in ngram_sizes:
        hashes.append(ngram_hashes(ids, n))
        # The n-gram at t lies within the text when its last character, t + n - 1, does.
        ends = ops.pad(padding_mask, [[0, 0], [0, n - 1]], constant_values=False)
        inside.append(ends[:, n - 1:])
    return ops.concatenate(hashes, axis=1), ops.concatenate(inside, axis=1)


def _hash_step(h, value):
    """One step of the rolling hash every n-gram, word and word bigram uses: `(h * 1000003 +
    value + 1) mod (2**31 - 1)` (int64, so the product cannot overflow)."""
    return ops.mod(h * _HASH_BASE + value + 1, _HASH_PRIME)


def rehash(h):
    """A second hash of `ngram_hashes`' values: `(h * 48271 + 11) mod (2**31 - 1)` (the MINSTD
    multiplier), a bijection of [0, 2**31 - 1), so n-grams that share a bucket under `h` mostly
    land apart under `rehash(h)`."""
    return ops.mod(ops.cast(h, "int64") * _REHASH_BASE + 11, _HASH_PRIME)


MAX_WORD_CHARS = 24  # a longer word is hashed by its first 24 characters
_WORD_SALT, _BIGRAM_SALT = 101, 202  # start values apart from ngram_hashes' (n = 1..4)


def word_hashes(ids, separator_ids, word_ngrams: int):
    """The text's words in order (`(batch, steps)` int64 hashes, bool valid) and, when
    `word_ngrams` is 2, its word bigrams (`(batch, steps - 1)`, bool valid): fastText's word
    features, from character ids in the graph.

    A word is a maximal run of real (non-zero) ids none of which is in `separator_ids` (the
    vocabulary's whitespace, `resic_tf.vocabulary.separator_ids`, as fastText splits); its hash
    is `ngram_hashes`' rule (`_hash_step`) started from 101 over its first `MAX_WORD_CHARS`
    ids. A bigram hashes its two words' hashes by the same rule, started from 202.
    """
    ids = ops.cast(ids, "int64")
    steps = ops.shape(ids)[1]
    is_char = ops.not_equal(ids, 0)
    for s in separator_ids:
        is_char = ops.logical_and(is_char, ops.not_equal(ids, s))
    before = ops.pad(is_char, [[0, 0], [1, 0]], constant_values=False)[:, :steps]
    starts = ops.logical_and(is_char, ops.logical_not(before))
    padded_ids = ops.pad(ids, [[0, 0], [0, MAX_WORD_CHARS]])
    padded_char = ops.pad(is_char, [[0, 0], [0, MAX_WORD_CHARS]], constant_values=False)
    h, alive = ops.full_like(ids, _WORD_SALT), ops.ones_like(is_char)
    for k in range(MAX_WORD_CHARS):  # step t's hash: the word that starts at t
        alive = ops.logical_and(alive, padded_char[:, k: k + steps])
        h = ops.where(alive, _hash_step(h, padded_ids[:, k: k + steps]), h)
    # The words' start steps in order, then `steps` (a sentinel) for the rest of the row.
    position = ops.broadcast_to(ops.arange(steps, dtype="int64")[None, :], ops.shape(ids))
    order = ops.sort(ops.where(starts, position, ops.cast(steps, "int64")), axis=1)
    words = ops.take_along_axis(ops.pad(h, [[0, 0], [0, 1]]), order, axis=1)
    valid = ops.less(order, ops.cast(steps, "int64"))
    if word_ngrams < 2:
        return words, valid, None, None
    bigrams = _hash_step(_hash_step(ops.full_like(words[:, 1:], _BIGRAM_SALT), words[:, :-1]),
                         words[:, 1:])
    return words, valid, bigrams, valid[:, 1:]


@keras.saving.register_keras_serializable(package="resic_tf")
class NGramEmbedding(keras.layers.Layer):
    """The wide branch: character ids -> the average embedding of the text's hashed character
    n-grams, `(batch, output_dim)` (fastText's bag of subwords, built in the graph).

    Every n-gram of each size in `ngram_sizes` that lies wholly within the text (a text shorter
    than n has none of size n) is hashed from its character ids (`ngram_hashes`) into one of
    `num_buckets` rows of one embedding table; the output is the mean of their rows. It costs a
    gather and a mean, nothing beside the deep branch, and sees word-like units that a 3-wide
    convolution reaches only after several blocks.

    With `num_hashes` 2, each n-gram is also hashed a second time (`rehash`) and its vector is
    the mean of its two rows (hash embeddings, Svenstrup et al. 2017): two n-grams sharing one
    row still differ by the other, so a table of the same size loses less to collisions.

    The table is stored divided by `rate_multiplier` and multiplied back when used: Adam's steps
    do not depend on a gradient's scale, so the table trains `rate_multiplier` times faster than
    the deep branch at the same learning rate. On korean-hate-speech the branch alone reached
    its best macro-F1 in 2 epochs at a 10x rate and needed over 10 at 1x (docs/RESULTS.md);
    fastText trains its table at 0.1-1.0 with SGD.

    Args:
        num_buckets: int, rows of the embedding table (hash buckets).
        output_dim: int, embedding width.
        ngram_sizes: n-gram lengths in characters. Defaults to 1, 2, 3, 4.
        rate_multiplier: float > 0, the table's learning-rate multiplier. Defaults to 10.
        num_hashes: 1 or 2, rows looked up per n-gram. Defaults to 1.
        pooling: "mean" (every n-gram inside the text counts the same) or "weighted" (a softmax
            over the text's n-grams of a learned score per bucket, zero at first, so training
            starts from the mean and can let telling n-grams outweigh common ones, as IDF does
            for TF-IDF). Defaults to "mean".
        word_ngrams: 0 (character n-grams only), 1 (also each whole word) or 2 (also each pair
            of adjacent words): fastText's word and word-bigram features (`word_hashes`), hashed
            into the same table and averaged with the character n-grams. Defaults to 0.
        separator_ids: ids that end a word (the vocabulary's whitespace). Defaults to none.

    Call arguments:
        ids: int `(batch, steps)`, 0 pads.
        padding_mask: optional bool `(batch, steps)`; without it, a text ends at its last
            non-zero id (`PaddingMask`).
    """

    def __init__(self, num_buckets: int, output_dim: int, ngram_sizes=(1, 2, 3, 4),
                 rate_multiplier: float = 10.0, num_hashes: int = 1, pooling: str = "mean",
                 word_ngrams: int = 0, separator_ids=(), **kwargs):
        super().__init__(**kwargs)
        self.word_ngrams = check_scalar(word_ngrams, "word_ngrams", int, min_val=0, max_val=2)
        self.separator_ids = tuple(separator_ids) and check_int_sequence(separator_ids,
                                                                          "separator_ids")
        self.num_buckets = check_scalar(num_buckets, "num_buckets", int, min_val=1)
        self.num_hashes = check_scalar(num_hashes, "num_hashes", int, min_val=1, max_val=2)
        self.output_dim = check_scalar(output_dim, "output_dim", int, min_val=1)
        self.ngram_sizes = check_int_sequence(ngram_sizes, "ngram_sizes")
        self.rate_multiplier = check_scalar(rate_multiplier, "rate_multiplier", float,
                                            min_val=0.0, include_boundaries="neither")
        self.pooling = check_choice(pooling, "pooling", NGRAM_POOLINGS)
        limit = 0.05 / self.rate_multiplier  # the used table starts in [-0.05, 0.05]
        self.embedding = keras.layers.Embedding(
            self.num_buckets, self.output_dim, name="embedding",
            embeddings_initializer=keras.initializers.RandomUniform(-limit, limit))
        self.scores = None if self.pooling == "mean" else keras.layers.Embedding(
            self.num_buckets, 1, name="scores", embeddings_initializer="zeros")

    def build(self, input_shape):
        self.embedding.build(input_shape)
        if self.scores is not None:
            self.scores.build(input_shape)

    def buckets(self, ids, padding_mask=None):
        """The bucket of every n-gram (all sizes, then the words and word bigrams when
        `word_ngrams` asks, for the first hash, then all for the second), `(batch, features)`,
        and whether it lies within the text (bool, same shape)."""
        hashes, inside = text_ngram_hashes(ids, self.ngram_sizes, padding_mask)
        hashes, inside = [hashes], [inside]
        if self.word_ngrams:
            words, valid, bigrams, pairs = word_hashes(ids, self.separator_ids,
                                                       self.word_ngrams)
            hashes.append(words)
            inside.append(valid)
            if bigrams is not None:
                hashes.append(bigrams)
                inside.append(pairs)
        hashes, inside = ops.concatenate(hashes, axis=1), ops.concatenate(inside, axis=1)
        if self.num_hashes == 2:
            hashes = ops.concatenate([hashes, rehash(hashes)], axis=1)
            inside = ops.concatenate([inside, inside], axis=1)
        return ops.mod(hashes, self.num_buckets), inside

    def call(self, ids, padding_mask=None):
        buckets, inside = self.buckets(ids, padding_mask)
        buckets = ops.cast(buckets, "int32")
        vectors = self.embedding(buckets)
        if self.scores is None:
            return masked_average(vectors, inside) * self.rate_multiplier
        scores = ops.squeeze(self.scores(buckets), -1) * self.rate_multiplier
        # A row with no n-gram gets a uniform softmax times no weight: 0, as the mean gives.
        weights = ops.softmax(ops.where(inside, scores, -1e9), axis=1) * \
            ops.cast(inside, scores.dtype)
        return ops.sum(weights[..., None] * vectors, axis=1) * self.rate_multiplier

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets,
                "output_dim": self.output_dim, "ngram_sizes": list(self.ngram_sizes),
                "rate_multiplier": self.rate_multiplier, "num_hashes": self.num_hashes,
                "pooling": self.pooling, "word_ngrams": self.word_ngrams,
                "separator_ids": list(self.separator_ids)}


MIX_EPSILON = 1e-9  # added to probabilities before a log, so an exact 0 stays finite


def _geometric(parts):
    """`softmax(sum of power * log(probabilities))` over `(power, probabilities)` pairs: a
    log-linear (product-of-experts) mix of classifiers, the form a logistic regression on their
    log-probabilities fits (`resic_tf.fusion.fit_powers`)."""
    logits = sum(power * ops.log(probs + MIX_EPSILON) for power, probs in parts)
    return ops.softmax(logits, axis=-1)


def _load_with_defaults(layer, store) -> None:
    """Assign the variables `store` holds, in order, and keep the initial values of any newer
    ones: a model saved before a variable existed (a 0.13 `LateFusion` had its share only, a
    0.13 shallow mix was a `keras.layers.Average` with no variable) loads unchanged."""
    variables = layer._trainable_variables + layer._non_trainable_variables
    keys = [] if store is None else list(store.keys())
    if len(keys) > len(variables):
        raise ValueError(f"Layer '{layer.name}' expected at most {len(variables)} variables, "
                         f"but received {len(keys)} variables during loading.")
    for i in range(len(keys)):
        variables[i].assign(store[f"{i}"])


@keras.saving.register_keras_serializable(package="resic_tf")
class LateFusion(keras.layers.Layer):
    """An exit's served probabilities under late fusion, from its deep head's `deep` and the
    shallow classifier's `wide`: the arithmetic mix `(1 - share) * deep + share * wide` (the
    default), or, once `geometric` is 1, the log-linear mix `softmax(deep_power * log(deep) +
    log(wide))`; in training the deep exit's own `deep`.

    The deep exit and the wide branch's classifier (fastText's bag of n-grams, `NGramEmbedding`
    and a dense softmax) each learn from their own loss and are averaged only when predicting,
    as an ensemble is: trained jointly, the wide branch memorises the training rows within an
    epoch and the deep exits stop learning (docs/RESULTS.md, "Late fusion").

    `share`, `geometric` and `deep_power` are (non-trainable) weights of the layer, chosen after
    training on validation rows (`resic_tf.fusion`), saved with the model and served. Both mixes
    are computed and `geometric` selects one, so the served graph has no branch. Under the
    log-linear mix `wide` is itself a log-linear mix of the shallow classifiers (`ShallowMix`):
    its normalising constant cancels in the softmax, so every exit equals
    `softmax(deep_power * log(deep) + wide_power * log(wide) + linear_power * log(linear))`.

    Args:
        wide_weight: float in [0, 1], the wide classifier's initial share. Defaults to 0.5.
        log_linear: bool, whether the layer can serve the log-linear mix (a model with a linear
            branch; without one the layer has its share only and serves the arithmetic mix,
            with none of the other's ops in the graph). Defaults to False.

    Call arguments:
        deep: `(batch, classes)` probabilities of the deep exit.
        wide: `(batch, classes)` probabilities of the shallow (wide) classifier.
        training: bool; True returns `deep` unchanged, so the exit's loss trains the deep
            branch alone.
    """

    def __init__(self, wide_weight: float = 0.5, log_linear: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.wide_weight = check_scalar(wide_weight, "wide_weight", float, min_val=0.0,
                                        max_val=1.0)
        self.log_linear = check_scalar(log_linear, "log_linear", bool)

    def build(self, deep_shape, wide_shape=None):
        self.share = self.add_weight(shape=(), name="share", trainable=False,
                                     initializer=keras.initializers.Constant(self.wide_weight))
        if self.log_linear:
            self.geometric = self.add_weight(shape=(), name="geometric", trainable=False,
                                             initializer="zeros")
            self.deep_power = self.add_weight(shape=(), name="deep_power", trainable=False,
                                              initializer="ones")

    def call(self, deep, wide, training=None):
        if training:
            return deep
        wide = ops.cast(wide, deep.dtype)
        share = ops.cast(self.share, deep.dtype)
        arithmetic = (1.0 - share) * deep + share * wide
        if not self.log_linear:
            return arithmetic
        geometric = ops.cast(self.geometric, deep.dtype)
        product = _geometric([(ops.cast(self.deep_power, deep.dtype), deep), (1.0, wide)])
        return (1.0 - geometric) * arithmetic + geometric * product

    def load_own_variables(self, store):
        _load_with_defaults(self, store)

    def compute_output_shape(self, deep_shape, wide_shape=None):
        return deep_shape

    def get_config(self):
        return {**super().get_config(), "wide_weight": self.wide_weight,
                "log_linear": self.log_linear}


@keras.saving.register_keras_serializable(package="resic_tf")
class ShallowMix(keras.layers.Layer):
    """A task's shallow classifier (late fusion's exit 0) with a linear branch: the mean of the
    wide and linear classifiers' probabilities (the default), or, once `geometric` is 1,
    `softmax(wide_power * log(wide) + linear_power * log(linear))` (`LateFusion`).

    `geometric` and `powers` (`(2,)`: wide, linear) are non-trainable weights chosen after
    training (`resic_tf.fusion.calibrate_mix`), saved and served with the model; a model saved
    by 0.13 (a `keras.layers.Average` here) loads with the mean.

    Call arguments:
        inputs: `[wide, linear]`, each `(batch, classes)` probabilities.
    """

    def build(self, input_shape=None):
        self.geometric = self.add_weight(shape=(), name="geometric", trainable=False,
                                         initializer="zeros")
        self.powers = self.add_weight(shape=(2,), name="powers", trainable=False,
                                      initializer="ones")

    def call(self, inputs):
        wide, linear = inputs
        linear = ops.cast(linear, wide.dtype)
        geometric = ops.cast(self.geometric, wide.dtype)
        powers = ops.cast(self.powers, wide.dtype)
        product = _geometric([(powers[0], wide), (powers[1], linear)])
        return (1.0 - geometric) * 0.5 * (wide + linear) + geometric * product

    def load_own_variables(self, store):
        _load_with_defaults(self, store)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


def derive_probabilities(fine, coarse_of, num_classes: int):
    """`(batch, num_classes)` coarse probabilities from `(batch, fine classes)` ones: each coarse
    class sums the fine classes inside it (`coarse_of[f]` is fine class f's coarse class)."""
    inside = ops.one_hot(ops.convert_to_tensor(list(coarse_of), "int32"), num_classes,
                         dtype=fine.dtype)
    return ops.matmul(fine, inside)


@keras.saving.register_keras_serializable(package="resic_tf")
class DerivedLabels(keras.layers.Layer):
    """A coarse task's exit probabilities derived from a finer task's at the same exit, in
    inference; in training the coarse exit's own probabilities pass unchanged, so its own loss
    still trains its head (`resic_tf.nesting`).

    Args:
        coarse_of: the coarse class id of each fine class.
        num_classes: the coarse task's classes.

    Call arguments:
        fine: `(batch, fine classes)` probabilities of the finer task's exit.
        own: `(batch, num_classes)` probabilities of the coarse task's own exit.
        training: bool; True returns `own`.
    """

    def __init__(self, coarse_of, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_scalar(num_classes, "num_classes", int, min_val=1)
        self.coarse_of = [check_scalar(c, "coarse_of", int, min_val=0,
                                       max_val=self.num_classes - 1) for c in coarse_of]

    def call(self, fine, own, training=None):
        if training:
            return own
        return derive_probabilities(fine, self.coarse_of, self.num_classes)

    def compute_output_shape(self, fine_shape, own_shape=None):
        return (fine_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "coarse_of": list(self.coarse_of),
                "num_classes": self.num_classes}
