"""Character vocabulary and the in-graph text -> character ids encoder.

The encoder is made of TensorFlow string ops and a Keras `StringLookup`, so exactly the same code
runs in the `tf.data` training pipeline and inside the served SavedModel. Length is the number of
Unicode code points of the raw text (invalid UTF-8 bytes count as one U+FFFD each), and it is
computed by the same decode that feeds the model.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

PAD_ID, OOV_ID = 0, 1
PAD_TOKEN, OOV_TOKEN = "", "[UNK]"


class CharVocabulary:
    """Characters of the training texts, most frequent first; id 0 pads, id 1 is out-of-vocabulary."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ValueError(f"Vocabulary entries must be single characters. Received: {bad[:5]}")
        if len(set(chars)) != len(chars):
            raise ValueError("Vocabulary entries must be distinct.")
        self.chars = chars

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1, max_size: int | None = None,
              ) -> "CharVocabulary":
        """Count characters; keep those seen at least `min_freq` times (ties broken by code point)."""
        if min_freq < 1:
            raise ValueError(f"`min_freq` must be >= 1. Received: min_freq={min_freq}")
        counts = Counter()
        for text in texts:
            counts.update(text)
        chars = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                 if n >= min_freq]
        if max_size is not None:
            chars = chars[:max(0, max_size - 2)]
        return cls(chars)

    @property
    def size(self) -> int:
        return len(self.chars) + 2

    def save(self, path: str | os.PathLike) -> None:
        from resic_tf.io import atomic_write_text
        # JSON, not one char per line: newline and other control characters are vocabulary too.
        atomic_write_text(path, json.dumps({"pad_id": PAD_ID, "oov_id": OOV_ID,
                                            "chars": self.chars}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharVocabulary":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f)["chars"])


def split_chars(texts):
    """Ragged `(batch, None)` tensor of single characters; invalid UTF-8 becomes U+FFFD."""
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    return tf.strings.unicode_split(texts, "UTF-8", errors="replace")


def char_lengths(texts):
    """Character length of each raw text, int32, counted by the same decode the encoder uses."""
    return tf.cast(split_chars(texts).row_lengths(), tf.int32)


@keras.saving.register_keras_serializable(package="resic_tf")
class CharEncoder(keras.layers.Layer):
    """Raw UTF-8 strings -> padded/truncated character ids, all in TensorFlow ops.

    Args:
        chars: list of str, the vocabulary characters (ids 2..).
        max_len: int, output length; longer texts are truncated (the first `max_len` characters
            are kept), shorter ones padded with 0 at the end.

    Call arguments:
        texts: string tensor of shape `(batch,)`.

    Output shape: `(batch, max_len)`, int32.
    """

    def __init__(self, chars: Sequence[str], max_len: int, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.chars = list(chars)
        self.max_len = int(max_len)
        self.lookup = keras.layers.StringLookup(vocabulary=self.chars, mask_token=PAD_TOKEN,
                                                oov_token=OOV_TOKEN, num_oov_indices=1,
                                                name="char_lookup")

    def lengths(self, texts):
        """Character length of each raw text (before truncation), int32."""
        return char_lengths(texts)

    def call(self, texts):
        chars = split_chars(texts)[:, : self.max_len]
        ids = chars.with_flat_values(self.lookup(chars.flat_values))
        return tf.cast(ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_len]), tf.int32)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_len)

    def get_config(self):
        return {**super().get_config(), "chars": self.chars, "max_len": self.max_len}


def text_lengths(texts: Sequence[str], batch_size: int = 4096) -> np.ndarray:
    """Character lengths exactly as the encoder and the served graph count them."""
    out = [char_lengths(list(texts[i:i + batch_size])).numpy()
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def text_dataset(texts: Sequence[str], encoder: CharEncoder, batch_size: int,
                 targets=None, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """`tf.data` pipeline: (shuffle) -> batch -> encode in graph -> prefetch.

    `targets`, if given, is a dict of output name -> int array and the dataset yields
    `(char_ids, targets)`; otherwise it yields `char_ids` alone, in input order.
    """
    texts = tf.constant([t.encode("utf-8") for t in texts], dtype=tf.string, shape=[len(texts)])
    ds = tf.data.Dataset.from_tensor_slices(texts if targets is None else (texts, dict(targets)))
    if shuffle:
        ds = ds.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if targets is None:
        ds = ds.map(encoder, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda x, y: (encoder(x), y), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
