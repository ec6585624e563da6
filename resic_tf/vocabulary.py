"""Character vocabulary and the in-graph character split and length.

Length is the number of Unicode code points of the raw text (invalid UTF-8 bytes count as one
U+FFFD each), computed by the same TensorFlow decode that feeds the model (`ResICPreprocessor`)
in training, calibration and serving.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from resic_tf.io import atomic_write_text, read_json
from resic_tf.validation import InvalidValueError, check_scalar

PAD_ID, OOV_ID = 0, 1
PAD_TOKEN, OOV_TOKEN = "", "[UNK]"


class CharVocabulary:
    """Characters of the training texts, most frequent first; id 0 pads, id 1 is out-of-vocabulary."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise InvalidValueError(f"Vocabulary entries must be single characters. Received: {bad[:5]}")
        if len(set(chars)) != len(chars):
            raise InvalidValueError("Vocabulary entries must be distinct.")
        self.chars = chars

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1, max_size: int | None = None,
              ) -> "CharVocabulary":
        """Count characters; keep those seen at least `min_freq` times (ties broken by code point)."""
        check_scalar(min_freq, "min_freq", int, min_val=1)
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
        # JSON, not one char per line: newline and other control characters are vocabulary too.
        atomic_write_text(path, json.dumps({"pad_id": PAD_ID, "oov_id": OOV_ID,
                                            "chars": self.chars}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharVocabulary":
        d = read_json(path)
        if not isinstance(d, dict) or not isinstance(d.get("chars"), list):
            raise InvalidValueError(f"{path}: not a vocabulary file (no \"chars\" list)")
        return cls(d["chars"])


def split_chars(texts):
    """Ragged `(batch, None)` tensor of single characters; invalid UTF-8 becomes U+FFFD."""
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    return tf.strings.unicode_split(texts, "UTF-8", errors="replace")


def char_lengths(texts):
    """Character length of each raw text, int32, counted by the same decode the encoder uses."""
    return tf.cast(split_chars(texts).row_lengths(), tf.int32)


def text_lengths(texts: Sequence[str], batch_size: int = 4096) -> np.ndarray:
    """Character lengths exactly as the encoder and the served graph count them."""
    out = [char_lengths(list(texts[i:i + batch_size])).numpy()
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices that put `texts` shortest first (stable: equal lengths keep input order), for
    callers that batch by length and return results in input order."""
    return np.argsort(text_lengths(texts), kind="stable")
