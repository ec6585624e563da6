"""Raw strings -> character ids, in TensorFlow ops: the classifier's preprocessor (keras-hub style).

`ResICPreprocessor` carries its vocabulary in its config, so a saved classifier predicts raw
strings after `keras.saving.load_model`. The same layer runs inside `tf.data` in training
(`text_dataset`) and inside the served SavedModel, so ids never differ between the two.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from resic_tf.validation import check_scalar
from resic_tf.vocabulary import OOV_TOKEN, PAD_ID, PAD_TOKEN, split_chars


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICPreprocessor(keras.layers.Layer):
    """Raw UTF-8 strings -> padded/truncated character ids.

    Args:
        chars: list of str, the vocabulary characters (ids 2..; 0 pads, 1 is out-of-vocabulary).
        max_len: int, output length; longer texts keep their first `max_len` characters, shorter
            ones are padded with 0 at the end.

    Call arguments:
        x: string tensor of shape `(batch,)`.
        y, sample_weight: optional, passed through (so the layer maps a labelled `tf.data`
            dataset as keras-hub preprocessors do).

    Output: `(batch, max_len)` int32 ids, or `(ids, y, sample_weight)` when labels are given.
    """

    def __init__(self, chars: Sequence[str], max_len: int, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.chars = list(chars)
        self.max_len = check_scalar(max_len, "max_len", int, min_val=1)
        self.lookup = keras.layers.StringLookup(vocabulary=self.chars, mask_token=PAD_TOKEN,
                                                oov_token=OOV_TOKEN, num_oov_indices=1,
                                                name="char_lookup")

    def build(self, input_shape=None):
        self.built = True  # the lookup table is made in __init__; nothing depends on the shape

    def call(self, x, y=None, sample_weight=None):
        chars = split_chars(x)[:, : self.max_len]
        ids = chars.with_flat_values(self.lookup(chars.flat_values))
        ids = tf.cast(ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_len]), tf.int32)
        if y is None and sample_weight is None:
            return ids
        return keras.utils.pack_x_y_sample_weight(ids, y, sample_weight)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_len)

    def get_config(self):
        return {**super().get_config(), "chars": self.chars, "max_len": self.max_len}


def string_dataset(texts, labels=None, batch_size: int = 32, shuffle: bool = False,
                   seed: int | None = None, sample_weight=None) -> tf.data.Dataset:
    """Batches of raw UTF-8 strings (and labels), in input order unless `shuffle` (reshuffled
    every epoch). Map a `ResICPreprocessor` over it, or give it to `ResICClassifier.fit`,
    `evaluate` or `predict`, which do so inside `tf.data`."""
    if not isinstance(texts, tf.Tensor):
        texts = list(texts)
        texts = tf.constant([t if isinstance(t, bytes) else str(t).encode("utf-8") for t in texts],
                            tf.string, shape=[len(texts)])
    data = keras.utils.pack_x_y_sample_weight(texts, labels, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        ds = ds.shuffle(int(texts.shape[0]), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


def text_dataset(texts: Sequence[str], preprocessor: ResICPreprocessor, batch_size: int,
                 targets: Mapping | None = None, shuffle: bool = False,
                 seed: int = 0) -> tf.data.Dataset:
    """`string_dataset` with the preprocessor mapped over it: batches of character ids (and
    `targets`, a dict of output name -> int array), prefetched."""
    ds = string_dataset(texts, None if targets is None else dict(targets), batch_size, shuffle,
                        seed)
    return ds.map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).prefetch(tf.data.AUTOTUNE)
