"""Character vocabulary and the in-graph character split and length.

Length is the number of Unicode code points of the raw text (invalid UTF-8 bytes count as one
U+FFFD each; a conjoining-jamo Hangul syllable counts as one, as in NFC), computed by the same
TensorFlow decode that feeds the model (`ResICPreprocessor`) in training, calibration and
serving.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

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
        """Count characters (`count_chars`); keep those seen at least `min_freq` times (ties
        broken by code point)."""
        return cls.from_counts(count_chars(list(texts)), min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_freq: int = 1,
                    max_size: int | None = None) -> "CharVocabulary":
        """The vocabulary of character counts (most frequent first, ties by code point), e.g.
        summed over the chunks of a file too large to hold."""
        check_scalar(min_freq, "min_freq", int, min_val=1)
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


_JAMO = re.compile("[\u1100-\u11ff]")
# Conjoining jamo (Unicode 3.12): a syllable is U+AC00 + (L * 21 + V) * 28 + T.
_L0, _V0, _T0, _S0 = 0x1100, 0x1161, 0x11A7, 0xAC00


def separator_ids(chars: Sequence[str]) -> tuple[int, ...]:
    """The ids of the whitespace among a vocabulary's characters (`CharVocabulary.chars`): the
    characters that end a word for the wide branch's word features (`layers.word_hashes`)."""
    return tuple(i + OOV_ID + 1 for i, c in enumerate(chars) if c.isspace())


def jamo_of(chars: Sequence[str]) -> list[list[int]]:
    """`[initial, medial, final]` jamo numbers of every character id (padding and OOV first, as
    `CharVocabulary` numbers them): a precomposed Hangul syllable U+AC00 + (L * 21 + V) * 28 + T
    has initial L + 1 (1-19), medial V + 1 (1-21) and final T + 1 (1-28, 1 = none); any other
    character, padding and OOV have [0, 0, 0]."""
    out = [[0, 0, 0], [0, 0, 0]]
    for ch in chars:
        s = ord(ch) - _S0 if len(ch) == 1 else -1
        out.append([s // 588 + 1, s % 588 // 28 + 1, s % 28 + 1] if 0 <= s < 11172 else [0, 0, 0])
    return out


def compose_hangul(code_points):
    """Ragged `(batch, None)` int32 code points with every conjoining-jamo sequence L V (T)
    composed into its precomposed syllable, as NFC does; everything else unchanged. So a text
    in NFD (macOS file names, some web sources) gives the same characters, ids, length and
    prediction as its NFC form, in training and in the served graph (integer ops only)."""
    c = code_points.flat_values
    rows = code_points.value_rowids()

    def ahead(k):  # the code point k places on in the same row, else -1
        nxt = tf.concat([c, tf.fill([k], -1)], 0)[k:]
        same = tf.concat([rows, tf.fill([k], tf.constant(-1, rows.dtype))], 0)[k:] == rows
        return tf.where(same, nxt, -1)

    def between(x, lo, hi):
        return (x >= lo) & (x <= hi)

    next1, next2 = ahead(1), ahead(2)
    start = between(c, _L0, _L0 + 18) & between(next1, _V0, _V0 + 20)
    with_t = start & between(next2, _T0 + 1, _T0 + 27)
    syllable = _S0 + ((c - _L0) * 21 + (next1 - _V0)) * 28 + tf.where(with_t, next2 - _T0, 0)
    merged = tf.where(start, syllable, c)
    behind = lambda x, k: tf.concat([tf.zeros([k], tf.bool), x], 0)[:tf.size(x)]  # noqa: E731
    keep = ~(behind(start, 1) | behind(with_t, 2))
    return tf.ragged.boolean_mask(code_points.with_flat_values(merged),
                                  code_points.with_flat_values(keep))


def count_chars(texts: Sequence[str], batch_size: int = 4096) -> Counter:
    """How often each character occurs in `texts`, counted as the model splits them
    (`split_chars`: conjoining jamo composed, invalid UTF-8 as U+FFFD), so every training
    character has its own id. Texts without conjoining jamo (almost all) are counted in Python,
    ~50x faster than the TensorFlow split, which only the others need."""
    counts = Counter()
    for i in range(0, len(texts), batch_size):
        batch = texts[i:i + batch_size]
        joined = "".join(batch)
        if not _JAMO.search(joined):
            try:
                joined.encode("utf-8")  # a lone surrogate would be U+FFFD in the graph
                counts.update(joined)
                continue
            except UnicodeEncodeError:
                pass
        flat = split_chars([t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t
                            for t in batch]).flat_values.numpy()
        counts.update(c.decode("utf-8") for c in flat)
    return counts


def code_points(texts):
    """Ragged `(batch, None)` int32 code point of each character: invalid UTF-8 becomes U+FFFD,
    and conjoining Hangul jamo are composed into syllables (`compose_hangul`). What the
    encoder looks its ids up from."""
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    return compose_hangul(tf.strings.unicode_decode(texts, "UTF-8", errors="replace"))


def split_chars(texts):
    """Ragged `(batch, None)` tensor of single characters (`code_points`, each as a string)."""
    points = code_points(texts)
    chars = tf.strings.unicode_encode(tf.expand_dims(points.flat_values, 1), "UTF-8")
    return points.with_flat_values(chars)


def char_lengths(texts):
    """Character length of each raw text, int32, counted by the same decode the encoder uses."""
    return tf.cast(code_points(texts).row_lengths(), tf.int32)


def text_lengths(texts: Sequence[str], batch_size: int = 4096) -> np.ndarray:
    """Character lengths exactly as the encoder and the served graph count them."""
    out = [char_lengths(list(texts[i:i + batch_size])).numpy()
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices that put `texts` shortest first (stable: equal lengths keep input order), for
    callers that batch by length and return results in input order."""
    return np.argsort(text_lengths(texts), kind="stable")
