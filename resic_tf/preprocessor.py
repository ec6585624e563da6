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
from resic_tf.vocabulary import OOV_ID, PAD_ID, char_lengths, code_points


@keras.saving.register_keras_serializable(package="resic_tf")
class ResICPreprocessor(keras.layers.Layer):
    """Raw UTF-8 strings -> padded/truncated character ids.

    Args:
        chars: list of str, the vocabulary characters (ids 2..; 0 pads, 1 is out-of-vocabulary).
        max_len: int, the truncation cap: longer texts keep their first `max_len` characters.
        pad_to_max_len: bool. False (length-adaptive models): each batch is padded with 0 to its
            own longest text, at least 1 step (an empty batch or all-empty texts give one
            padding step). True (fixed-length models, runs before 0.3): always `max_len` steps.
            Defaults to False.

    Call arguments:
        x: string tensor of shape `(batch,)`.
        y, sample_weight: optional, passed through (so the layer maps a labelled `tf.data`
            dataset as keras-hub preprocessors do).

    Output: `(batch, steps)` int32 ids, or `(ids, y, sample_weight)` when labels are given.
    """

    def __init__(self, chars: Sequence[str], max_len: int, pad_to_max_len: bool = False,
                 **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.chars = list(chars)
        self.max_len = check_scalar(max_len, "max_len", int, min_val=1)
        self.pad_to_max_len = check_scalar(pad_to_max_len, "pad_to_max_len", bool)
        # Vocabulary characters are single code points: ids come from the code points by a
        # binary search in a constant (no lookup table, no per-character strings), so the
        # served graph holds no resource but the model's weights and can be frozen.
        points = [ord(c) for c in self.chars]
        order = sorted(range(len(points)), key=points.__getitem__)
        self._points = [points[i] for i in order]
        self._ids = [i + OOV_ID + 1 for i in order]  # 0 pads, 1 is out-of-vocabulary

    def build(self, input_shape=None):
        self.built = True  # the lookup table is made in __init__; nothing depends on the shape

    def call(self, x, y=None, sample_weight=None):
        points = code_points(x)[:, : self.max_len]
        ids = points.with_flat_values(self.lookup(points.flat_values))
        if self.pad_to_max_len:
            ids = ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_len])
        else:
            ids = ids.to_tensor(default_value=PAD_ID)
            ids = tf.pad(ids, [[0, 0], [0, tf.maximum(1 - tf.shape(ids)[1], 0)]])
        ids = tf.cast(ids, tf.int32)
        if y is None and sample_weight is None:
            return ids
        return keras.utils.pack_x_y_sample_weight(ids, y, sample_weight)

    def lookup(self, points):
        """Code points (int32, any shape) -> ids (int32): the vocabulary's id of each, 1 for
        the others."""
        if not self._points:
            return tf.fill(tf.shape(points), tf.constant(OOV_ID, tf.int32))
        keys = tf.constant(self._points, tf.int32)
        flat = tf.reshape(points, [-1])
        at = tf.minimum(tf.searchsorted(keys, flat), len(self._points) - 1)
        ids = tf.where(tf.gather(keys, at) == flat, tf.gather(tf.constant(self._ids, tf.int32), at),
                       OOV_ID)
        return tf.reshape(ids, tf.shape(points))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_len if self.pad_to_max_len else None)

    def get_config(self):
        return {**super().get_config(), "chars": self.chars, "max_len": self.max_len,
                "pad_to_max_len": self.pad_to_max_len}

    @classmethod
    def from_config(cls, config):
        # Preprocessors saved before 0.3 have no "pad_to_max_len": they fed fixed-length models.
        return cls(**{"pad_to_max_len": True, **config})


def string_dataset(texts, labels=None, batch_size: int = 32, shuffle: bool = False,
                   seed: int | None = None, sample_weight=None, by_length: bool = False,
                   window: int = 64) -> tf.data.Dataset:
    """Batches of raw UTF-8 strings (and labels). Map a `ResICPreprocessor` over it, or give it
    to `ResICClassifier.fit`, `evaluate` or `predict`, which do so inside `tf.data`.

    Order: input order, or with `shuffle` a fresh shuffle every epoch. `by_length` groups texts
    of similar length into a batch, so that a length-adaptive model pads each batch only to its
    own longest text: without `shuffle` all rows are sorted by length (stable: equal lengths keep
    input order); with it, every epoch reshuffles the rows, sorts each window of
    `window * batch_size` rows by length, batches it and shuffles the batches (`window` of them),
    so batches differ from epoch to epoch and short and long ones come in random order.
    """
    if not isinstance(texts, tf.Tensor):
        texts = list(texts)
        texts = tf.constant([t if isinstance(t, bytes) else str(t).encode("utf-8") for t in texts],
                            tf.string, shape=[len(texts)])
    data = keras.utils.pack_x_y_sample_weight(texts, labels, sample_weight)
    if by_length and not shuffle:
        data = tf.nest.map_structure(lambda t: tf.gather(t, _length_order(texts)), data)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        ds = ds.shuffle(int(texts.shape[0]), seed=seed, reshuffle_each_iteration=True)
    if not (by_length and shuffle):
        return ds.batch(batch_size)
    ds = window_batches(ds, batch_size, window, seed)
    # Every window but the last is whole batches: as many batches as plain batching makes.
    # Known cardinality lets Keras count steps (progress bar, resuming after a crash).
    n_batches = -(-int(texts.shape[0]) // batch_size)
    return ds.apply(tf.data.experimental.assert_cardinality(n_batches))


def window_batches(ds: tf.data.Dataset, batch_size: int, window: int = 64,
                   seed: int | None = None) -> tf.data.Dataset:
    """Batches of similar length from a (shuffled) dataset of rows: each window of
    `window * batch_size` rows is sorted by text length and batched, and the batches are
    shuffled among `window` of them, so short and long batches come in random order."""
    window = check_scalar(window, "window", int, min_val=1)

    def sort_window(*rows):
        order = _length_order(rows[0])
        rows = tf.nest.map_structure(lambda t: tf.gather(t, order), rows)
        return tf.data.Dataset.from_tensor_slices(rows if len(rows) > 1 else rows[0]).batch(
            batch_size)

    ds = ds.batch(batch_size * window).flat_map(sort_window)
    return ds.shuffle(window, seed=None if seed is None else seed + 1,
                      reshuffle_each_iteration=True)


def _length_order(texts) -> tf.Tensor:
    """Indices that sort `texts` by character length, stable."""
    return tf.argsort(char_lengths(texts), stable=True)


def text_dataset(texts: Sequence[str], preprocessor: ResICPreprocessor, batch_size: int,
                 targets: Mapping | None = None, shuffle: bool = False,
                 seed: int = 0, by_length: bool = False) -> tf.data.Dataset:
    """`string_dataset` with the preprocessor mapped over it: batches of character ids (and
    `targets`, a dict of output name -> int array), prefetched."""
    ds = string_dataset(texts, None if targets is None else dict(targets), batch_size, shuffle,
                        seed, by_length=by_length)
    return ds.map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).prefetch(tf.data.AUTOTUNE)
