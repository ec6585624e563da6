"""Res-IC building blocks as small, registered Keras layers.

Papers: He et al., "Deep Residual Learning for Image Recognition" (https://arxiv.org/abs/1512.03385);
Woo et al., "CBAM: Convolutional Block Attention Module" (https://arxiv.org/abs/1807.06521).
All three layers load with `keras.saving.load_model` without `custom_objects`.
"""
from __future__ import annotations

import keras
from keras import ops

from resic_tf.validation import check_scalar


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

    Call arguments:
        inputs: `(batch, steps, channels)`.
        training: bool, batch-norm mode.

    Output shape: `(batch, ceil(steps / strides), filters)`.
    """

    def __init__(self, filters: int, strides: int = 1, kernel_size: int = 3,
                 bn_momentum: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.filters = check_scalar(filters, "filters", int, min_val=1)
        self.strides = check_scalar(strides, "strides", int, min_val=1)
        self.kernel_size = check_scalar(kernel_size, "kernel_size", int, min_val=1)
        self.bn_momentum = check_scalar(bn_momentum, "bn_momentum", float, min_val=0.0,
                                        max_val=1.0, include_boundaries="neither")
        conv = lambda k, s, name: keras.layers.Conv1D(  # noqa: E731
            self.filters, k, strides=s, padding="same", use_bias=False,
            kernel_initializer="he_normal", name=name)
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
        shape = self.conv1.compute_output_shape(input_shape)
        self.bn1.build(shape)
        self.conv2.build(shape)
        self.bn2.build(shape)
        if self.use_projection:
            self.proj_conv.build((*input_shape[:-2], shape[-2], input_shape[-1]))
            self.proj_bn.build(shape)

    def call(self, inputs, training=None):
        x = ops.relu(self.bn1(self.conv1(inputs), training=training))
        x = self.bn2(self.conv2(x), training=training)
        shortcut = inputs
        if self.use_projection:
            shortcut = self.proj_bn(self.proj_conv(inputs[:, :: self.strides, :]),
                                    training=training)
        return ops.relu(x + shortcut)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "kernel_size": self.kernel_size, "bn_momentum": self.bn_momentum}


@keras.saving.register_keras_serializable(package="resic_tf")
class CBAM(keras.layers.Layer):
    """Convolutional Block Attention Module for sequences: channel, then temporal attention.

    Channel attention: a shared MLP (C -> C/reduction -> C) on the average- and max-pooled
    features, summed, sigmoid. Temporal attention: a conv over the per-step channel mean and
    channel max, sigmoid. Pooling runs over all steps, padding included.

    Args:
        reduction: int, channel MLP reduction ratio (hidden size is at least 1). Defaults to 16.
        kernel_size: int, temporal-attention conv kernel. Defaults to 7.

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

    def call(self, inputs):
        mlp = lambda v: self.mlp_out(self.mlp_hidden(v))  # noqa: E731
        channel = ops.sigmoid(mlp(ops.mean(inputs, axis=1)) + mlp(ops.max(inputs, axis=1)))
        x = inputs * ops.expand_dims(channel, 1)
        pooled = ops.concatenate([ops.mean(x, axis=-1, keepdims=True),
                                  ops.max(x, axis=-1, keepdims=True)], axis=-1)
        return x * ops.sigmoid(self.temporal_conv(pooled))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction,
                "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="resic_tf")
class InternalClassifier(keras.layers.Layer):
    """Exit head: global average pooling over all steps, dropout, dense softmax.

    Args:
        num_classes: int, classes of the task.
        dropout: float in [0, 1), active in training only. Defaults to 0.2.

    Input shape: `(batch, steps, channels)`. Output shape: `(batch, num_classes)`, float32
    probabilities.
    """

    def __init__(self, num_classes: int, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_scalar(num_classes, "num_classes", int, min_val=1)
        self.dropout = check_scalar(dropout, "dropout", float, min_val=0.0, max_val=1.0,
                                    include_boundaries="left")
        self.drop = keras.layers.Dropout(self.dropout, name="dropout")
        self.dense = keras.layers.Dense(self.num_classes, activation="softmax", name="dense",
                                        dtype="float32")

    def build(self, input_shape):
        self.dense.build((input_shape[0], input_shape[-1]))

    def call(self, inputs, training=None):
        return self.dense(self.drop(ops.mean(inputs, axis=1), training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dropout": self.dropout}
