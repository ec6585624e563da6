"""TF-IDF of character n-grams in TensorFlow ops: the features of a linear branch.

The model users fit before any deep one, TF-IDF + a linear classifier, counts every n-gram of
its vocabulary exactly; the wide branch hashes n-grams into shared rows instead, and over those
hashed n-grams the same linear model loses 3-6 points of macro-F1 on korean-hate-speech
(docs/RESULTS.md, session 16). `TfidfNGrams` gives each of the n-grams found in the most
training texts a column of its own (`adapt`) and computes a text's weights in the graph, as
scikit-learn's `TfidfVectorizer(sublinear_tf=True)` does (sublinear term frequency, smoothed
inverse document frequency, L2 norm), so that a served model computes them from raw strings.
`LinearHead` is the logistic regression over them and `fit_linear` fits it (full batch:
the problem is convex) on `tfidf_matrix`. A model with `ResICConfig.linear_ngrams` holds one
`TfidfNGrams` in its backbone and one `LinearHead` per task, fitted before the deep branch
trains (`resic_tf.training.train_linear_branch`).
"""
from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from resic_tf.layers import text_ngram_hashes
from resic_tf.validation import InvalidValueError, check_int_sequence, check_scalar

NO_NGRAM = 2 ** 62  # the vocabulary's empty columns: above every hash, so sorted last


@keras.saving.register_keras_serializable(package="resic_tf")
class TfidfNGrams(keras.layers.Layer):
    """Character ids -> every character n-gram's vocabulary column and TF-IDF weight:
    `(batch, features)` int32 columns and float32 weights.

    A text's TF-IDF vector is the sum of its weights at their columns: an n-gram that occurs
    `c` times in the text has `c` entries of `(1 + ln c) * idf / c / norm` each, so they sum to
    scikit-learn's sublinear term frequency `1 + ln c` times the n-gram's `idf`, divided by the
    vector's L2 norm. An n-gram without a column (not in the vocabulary), or not wholly within
    the text, has weight 0 (and column 0); a text with no known n-gram has all-zero weights.
    The vocabulary and IDF are non-trainable weights set by `adapt` from the training texts
    (`idf = ln((1 + texts) / (1 + texts with the n-gram)) + 1`), saved and served with the
    model.

    Args:
        max_ngrams: int, columns: the n-grams found in the most training texts (ties go to the
            smaller hash, so the vocabulary does not depend on the order of the rows).
        ngram_sizes: n-gram lengths in characters (`resic_tf.layers.text_ngram_hashes`).
            Defaults to 1, 2, 3, 4.
        min_count: int, the fewest training texts an n-gram needs for a column (scikit-learn's
            `min_df`). Defaults to 2.

    Call arguments:
        ids: int `(batch, steps)`, 0 pads.
        padding_mask: optional bool `(batch, steps)`; without it, a text ends at its last
            non-zero id.
    """

    def __init__(self, max_ngrams: int, ngram_sizes=(1, 2, 3, 4), min_count: int = 2,
                 **kwargs):
        super().__init__(**kwargs)
        self.max_ngrams = check_scalar(max_ngrams, "max_ngrams", int, min_val=1)
        self.ngram_sizes = check_int_sequence(ngram_sizes, "ngram_sizes")
        self.min_count = check_scalar(min_count, "min_count", int, min_val=1)

    def build(self, input_shape=None):
        self.ngrams = self.add_weight(shape=(self.max_ngrams,), dtype="int64", name="ngrams",
                                      trainable=False,
                                      initializer=keras.initializers.Constant(NO_NGRAM))
        self.idf = self.add_weight(shape=(self.max_ngrams,), dtype="float32", name="idf",
                                   trainable=False, initializer="zeros")

    def adapt(self, batches: Iterable) -> dict[str, int]:
        """Set the vocabulary and IDF from `batches` (an iterable of `(batch, steps)` character
        ids of the training texts). Returns the texts read, the distinct n-grams seen and the
        columns filled."""
        if not self.built:
            self.build()
        texts, per_text = 0, []
        for ids in batches:
            hashes, inside = (np.asarray(v) for v in text_ngram_hashes(ids, self.ngram_sizes))
            rows = np.broadcast_to(np.arange(len(hashes))[:, None], hashes.shape)[inside]
            # each text's distinct n-grams (the document frequency counts a text once)
            per_text.append(np.unique(np.stack([rows + texts, hashes[inside]], 1), axis=0)[:, 1])
            texts += len(hashes)
        values, counts = np.unique(np.concatenate(per_text or [np.zeros(0, np.int64)]),
                                   return_counts=True)
        keep = np.lexsort((values, -counts))[:self.max_ngrams]  # most texts first
        keep = np.sort(keep[counts[keep] >= self.min_count])  # values are sorted: so is keep
        empty = self.max_ngrams - len(keep)
        self.ngrams.assign(np.concatenate([values[keep], np.full(empty, NO_NGRAM, np.int64)]))
        idf = np.log((1 + texts) / (1 + counts[keep])) + 1
        self.idf.assign(np.concatenate([idf, np.zeros(empty)]).astype(np.float32))
        return {"texts": int(texts), "seen": int(len(values)), "columns": int(len(keep))}

    def trimmed(self) -> "TfidfNGrams":
        """A copy of this adapted layer with only its filled columns (at least one), so that a
        generous `max_ngrams` costs nothing where the training texts fill less of it."""
        filled = int(np.sum(np.asarray(self.ngrams) != NO_NGRAM))
        copy = TfidfNGrams(max(1, filled), self.ngram_sizes, self.min_count, name=self.name)
        copy.build()
        copy.ngrams.assign(np.asarray(self.ngrams)[:copy.max_ngrams])
        copy.idf.assign(np.asarray(self.idf)[:copy.max_ngrams])
        return copy

    def call(self, ids, padding_mask=None):
        hashes, inside = text_ngram_hashes(ids, self.ngram_sizes, padding_mask)
        known = tf.convert_to_tensor(self.ngrams)
        flat = tf.reshape(hashes, [-1])
        column = tf.minimum(tf.searchsorted(known, flat, out_type=tf.int64),
                            self.max_ngrams - 1)
        found = tf.equal(tf.gather(known, column), flat)
        column = tf.reshape(column, tf.shape(hashes))
        used = tf.logical_and(inside, tf.reshape(found, tf.shape(hashes)))
        # Occurrences of the same column in a text: equal keys in the row, sorted once.
        keys = tf.where(used, column, -1)
        ordered = tf.sort(keys, axis=1)
        count = tf.cast(tf.searchsorted(ordered, keys, side="right") -
                        tf.searchsorted(ordered, keys, side="left"), "float32")
        term = (1.0 + tf.math.log(count)) * tf.gather(tf.convert_to_tensor(self.idf), column)
        weights = tf.where(used, term / count, 0.0)
        # ||v||^2 = sum over distinct n-grams of term^2 = sum over occurrences of term^2 / c
        norm = tf.sqrt(tf.reduce_sum(tf.where(used, term * term / count, 0.0), axis=1,
                                     keepdims=True))
        weights = weights / tf.maximum(norm, 1e-12)
        return tf.cast(tf.where(used, column, 0), "int32"), weights

    def compute_output_spec(self, ids, padding_mask=None):
        steps = None if ids.shape[1] is None else len(self.ngram_sizes) * ids.shape[1]
        shape = (ids.shape[0], steps)
        return (keras.KerasTensor(shape, dtype="int32"), keras.KerasTensor(shape, dtype="float32"))

    def get_config(self):
        return {**super().get_config(), "max_ngrams": self.max_ngrams,
                "ngram_sizes": list(self.ngram_sizes), "min_count": self.min_count}


@keras.saving.register_keras_serializable(package="resic_tf")
class LinearHead(keras.layers.Layer):
    """A linear classifier over `TfidfNGrams`' output: softmax of `sum_f weights[f] *
    kernel[columns[f]] + bias`, `(batch, num_classes)` probabilities: the logistic regression a
    user fits on TF-IDF, in the graph. Fitted apart by `fit_linear` (convex: a full-batch
    optimiser reaches its optimum), not by the model's own loss.

    Args:
        num_classes: int.
        max_ngrams: int, the `TfidfNGrams` layer's columns.

    Call arguments:
        columns: int `(batch, features)`; weights: float `(batch, features)` (`TfidfNGrams`).
    """

    def __init__(self, num_classes: int, max_ngrams: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_scalar(num_classes, "num_classes", int, min_val=2)
        self.max_ngrams = check_scalar(max_ngrams, "max_ngrams", int, min_val=1)

    def build(self, columns_shape=None, weights_shape=None):
        self.kernel = self.add_weight(shape=(self.max_ngrams, self.num_classes), name="kernel",
                                      initializer="zeros")
        self.bias = self.add_weight(shape=(self.num_classes,), name="bias", initializer="zeros")

    def logits(self, columns, weights):
        rows = tf.gather(tf.convert_to_tensor(self.kernel), columns)  # (batch, features, classes)
        return tf.reduce_sum(rows * weights[..., None], axis=1) + self.bias

    def call(self, columns, weights):
        return tf.nn.softmax(self.logits(columns, weights))

    def compute_output_spec(self, columns, weights):
        return keras.KerasTensor((columns.shape[0], self.num_classes), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "max_ngrams": self.max_ngrams}


def tfidf_matrix(parts: Iterable, max_ngrams: int) -> tf.SparseTensor:
    """`(texts, max_ngrams)` TF-IDF matrix of `TfidfNGrams` outputs: `parts` is an iterable of
    its `(columns, weights)` for consecutive batches of texts; a text's occurrences of a column
    are summed into one entry (only the entries that exist are held: a few hundred per text)."""
    keys, values, texts = [], [], 0
    for columns, weights in parts:
        columns, weights = np.asarray(columns), np.asarray(weights, np.float32)
        if columns.shape != weights.shape:
            raise InvalidValueError(f"`columns` and `weights` need the same shape. Received: "
                                    f"columns {columns.shape}, weights {weights.shape}")
        rows, at = np.nonzero(weights)
        key, where = np.unique((rows.astype(np.int64) + texts) * max_ngrams +
                               columns[rows, at], return_inverse=True)
        keys.append(key)
        values.append(np.bincount(where.ravel(), weights[rows, at]).astype(np.float32))
        texts += len(columns)
    keys = np.concatenate(keys or [np.zeros(0, np.int64)])
    return tf.SparseTensor(np.stack([keys // max_ngrams, keys % max_ngrams], 1),
                           np.concatenate(values or [np.zeros(0, np.float32)]),
                           (texts, max_ngrams))


def fit_linear(head: LinearHead, features: tf.SparseTensor, labels, C: float = 10.0,
               steps: int = 300, learning_rate: float = 0.5) -> dict[str, float]:
    """Fit `head` by multinomial logistic regression on the training texts' TF-IDF matrix
    (`features`: `(texts, head.max_ngrams)`, `tfidf_matrix`; `labels`: class ids):
    scikit-learn's objective divided by `C` times the number of texts, the mean cross-entropy
    plus `|kernel|^2 / (2 C texts)` (the bias is not penalised), minimised by `steps` full-batch
    Adam steps from `learning_rate` on a cosine decay. Returns the final objective and the
    norm of its gradient."""
    check_scalar(C, "C", float, min_val=0.0, include_boundaries="neither")
    check_scalar(steps, "steps", int, min_val=1)
    labels = np.asarray(labels)
    n = len(labels)
    if tuple(features.shape) != (n, head.max_ngrams):
        raise InvalidValueError(f"`features` needs one row per label and {head.max_ngrams} "
                                f"columns. Received: features {tuple(features.shape)}, {n} labels")
    if not head.built:
        head.build()
    y = tf.constant(labels, tf.int32)
    kernel = tf.Variable(tf.zeros((head.max_ngrams, head.num_classes)))
    bias = tf.Variable(tf.zeros((head.num_classes,)))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate,
                                                                             steps))

    def gradients():
        with tf.GradientTape() as tape:
            logits = tf.sparse.sparse_dense_matmul(features, kernel) + bias
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) + \
                tf.reduce_sum(kernel * kernel) / (2.0 * C * n)
        return loss, tape.gradient(loss, [kernel, bias])

    @tf.function(autograph=False)
    def step():
        optimizer.apply_gradients(zip(gradients()[1], [kernel, bias]))

    for _ in range(steps):
        step()
    head.kernel.assign(kernel)
    head.bias.assign(bias)
    loss, grads = gradients()
    return {"objective": float(loss),
            "gradient_norm": float(tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in grads])))}
