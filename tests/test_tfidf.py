"""`TfidfNGrams`: TF-IDF of character n-grams in the graph, against hand-computed values and an
independent count of real texts' n-grams."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from conftest import dev_texts, write_rows
from resic_tf.layers import ngram_hashes
from resic_tf.tfidf import NO_NGRAM, LinearHead, TfidfNGrams, fit_linear, tfidf_matrix
from resic_tf.validation import InvalidValueError


def test_weights_by_hand():
    # Unigrams of two texts: "2 3 2" and "2 4" (ids). Texts with id 2: both; with 3 or 4: one.
    # idf(2) = ln(3/3) + 1 = 1, idf(3) = idf(4) = ln(3/2) + 1 = 1.405465.
    ids = np.array([[2, 3, 2, 0], [2, 4, 0, 0]], np.int32)
    layer = TfidfNGrams(10, ngram_sizes=(1,), min_count=1)
    assert layer.adapt([ids]) == {"texts": 2, "seen": 3, "columns": 3}
    columns, weights = (np.asarray(v) for v in layer(ids))
    idf = math.log(1.5) + 1
    # text 0: id 2 twice (sublinear tf 1 + ln 2, idf 1), id 3 once: norm sqrt((1 + ln 2)^2 +
    # idf^2); each of the two occurrences of id 2 carries half of its value
    norm0 = math.sqrt((1 + math.log(2)) ** 2 + idf ** 2)
    np.testing.assert_allclose(weights[0], [(1 + math.log(2)) / norm0 / 2, idf / norm0,
                                            (1 + math.log(2)) / norm0 / 2, 0], rtol=1e-6)
    norm1 = math.sqrt(1 + idf ** 2)
    np.testing.assert_allclose(weights[1], [1 / norm1, idf / norm1, 0, 0], rtol=1e-6)
    # columns follow the sorted hashes: h(2) < h(3) < h(4)
    assert columns.tolist() == [[0, 1, 0, 0], [0, 2, 0, 0]]
    # an id never seen in training (5) weighs 0; an empty text has no weight at all
    columns, weights = (np.asarray(v) for v in layer(np.array([[5, 3, 0], [0, 0, 0]], np.int32)))
    np.testing.assert_allclose(weights, [[0, 1, 0], [0, 0, 0]], atol=1e-7)
    assert np.isfinite(weights).all()


def test_adapt_keeps_the_ngrams_of_the_most_texts():
    ids = np.array([[2, 3, 0], [2, 4, 0], [2, 3, 5], [6, 0, 0]], np.int32)
    h = {i: int(np.asarray(ngram_hashes(np.array([[i]]), 1))[0, 0]) for i in (2, 3, 4, 5, 6)}
    # texts per id: 2 -> 3, 3 -> 2, 4, 5, 6 -> 1
    layer = TfidfNGrams(4, ngram_sizes=(1,), min_count=2)
    assert layer.adapt([ids[:2], ids[2:]]) == {"texts": 4, "seen": 5, "columns": 2}
    assert np.asarray(layer.ngrams).tolist() == sorted([h[2], h[3]]) + [NO_NGRAM] * 2
    np.testing.assert_allclose(np.asarray(layer.idf),
                               [math.log(5 / 4) + 1, math.log(5 / 3) + 1, 0, 0], rtol=1e-6)
    # trimmed to its filled columns: the same weights for every text
    trimmed = layer.trimmed()
    assert trimmed.max_ngrams == 2 and trimmed.name == layer.name
    assert np.asarray(trimmed.ngrams).tolist() == sorted([h[2], h[3]])
    for got, want in zip(trimmed(ids), layer(ids)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    none = TfidfNGrams(4, ngram_sizes=(1,), min_count=9)
    assert none.adapt([ids])["columns"] == 0 and none.trimmed().max_ngrams == 1  # one, empty
    # at most 2 columns, min_count 1: id 2, id 3, then the tie among 4, 5, 6 goes to the
    # smallest hash; the rows' order does not matter
    small = TfidfNGrams(3, ngram_sizes=(1,), min_count=1)
    small.adapt([ids[::-1]])
    smallest = min(h[4], h[5], h[6])
    assert np.asarray(small.ngrams).tolist() == sorted([h[2], h[3], smallest])
    with pytest.raises(InvalidValueError, match="Received: min_count=0"):
        TfidfNGrams(4, min_count=0)


def test_real_texts_match_an_independent_count_and_padding_does_not_matter(tmp_path):
    """Real reviews: each text's weights summed by column equal TF-IDF computed from Python's
    Counter over the same n-gram hashes, whatever the batch is padded to; and the layer saves
    and loads inside a model."""
    import keras
    import tensorflow as tf

    from resic_tf.preprocessor import ResICPreprocessor
    from resic_tf.vocabulary import CharVocabulary

    train, texts = dev_texts(200), dev_texts(20, start=200)
    to_ids = ResICPreprocessor(CharVocabulary.build(train).chars, max_len=132)
    layer = TfidfNGrams(5000, min_count=2)
    stats = layer.adapt([to_ids(tf.constant(train[:128])), to_ids(tf.constant(train[128:]))])
    assert stats["texts"] == 200 and 0 < stats["columns"] <= 5000
    known = {int(v): i for i, v in enumerate(np.asarray(layer.ngrams)) if v != NO_NGRAM}
    idf = np.asarray(layer.idf)
    ids = np.asarray(to_ids(tf.constant(texts)))
    columns, weights = (np.asarray(v) for v in layer(ids))
    for row, text_ids in enumerate(ids):
        n = int((text_ids != 0).sum())
        counts = Counter(int(np.asarray(ngram_hashes(text_ids[None, k:k + size], size))[0, 0])
                         for size in (1, 2, 3, 4) for k in range(n - size + 1))
        expected = {known[h]: (1 + math.log(c)) * idf[known[h]] for h, c in counts.items()
                    if h in known}
        norm = math.sqrt(sum(v * v for v in expected.values())) or 1.0
        got = Counter()
        for c, w in zip(columns[row], weights[row]):
            got[int(c)] += float(w)
        got = {c: w for c, w in got.items() if w}
        assert got.keys() == expected.keys()
        for c, v in expected.items():
            assert got[c] == pytest.approx(v / norm, rel=1e-5)
    # padded to 132 steps: the same weights on the text's own n-grams, none elsewhere
    padded = np.pad(ids, [[0, 0], [0, 132 - ids.shape[1]]])
    inputs = keras.Input((None,), dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    c2, w2 = (np.asarray(v) for v in loaded(padded))
    steps = ids.shape[1]
    for k in range(4):  # the layout is one block of `steps` per n-gram size
        np.testing.assert_allclose(w2[:, k * 132:k * 132 + steps], weights[:, k * steps:(k + 1) *
                                                                           steps], atol=1e-6)
        assert (w2[:, k * 132 + steps:(k + 1) * 132] == 0).all()
        assert (c2[:, k * 132:k * 132 + steps] == columns[:, k * steps:(k + 1) * steps]).all()


def test_fit_linear_reaches_the_hand_computed_optimum():
    """Two texts, each one n-gram of weight 1, classes 0 and 1, C = 1: by symmetry the kernel is
    [[a, -a], [-a, a]] and the objective log(1 + e^-2a) + a^2 / C (mean cross-entropy + |W|^2 /
    (2 C n), n = 2) is least where a = C / (1 + e^2a): a = 0.33742 (the fixed point below). The
    wrong class then gets probability 1 / (1 + e^2a) = a."""
    a = 0.3
    for _ in range(100):
        a = 1 / (1 + math.exp(2 * a))
    head = LinearHead(2, 2)
    columns, weights = np.array([[0, 0], [1, 0]]), np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    result = fit_linear(head, tfidf_matrix([(columns, weights)], 2), [0, 1], C=1.0, steps=500)
    assert result["gradient_norm"] < 1e-4
    assert result["objective"] == pytest.approx(math.log(1 + math.exp(-2 * a)) + a * a, abs=1e-6)
    np.testing.assert_allclose(np.asarray(head.kernel), [[a, -a], [-a, a]], atol=1e-5)
    np.testing.assert_allclose(np.asarray(head(columns, weights)), [[1 - a, a], [a, 1 - a]],
                               atol=1e-5)
    with pytest.raises(InvalidValueError, match="one row per label"):
        fit_linear(head, tfidf_matrix([(columns, weights)], 2), [0, 1, 1])


def test_tfidf_matrix_sums_a_texts_occurrences_across_batches():
    """Two batches (texts 0-1, then text 2): repeated columns of a text summed into one entry,
    zero weights left out, rows numbered across batches."""
    first = (np.array([[3, 1, 3], [0, 0, 0]]), np.array([[0.25, 0.5, 0.25], [0, 0, 0]]))
    second = (np.array([[2, 2, 0]]), np.array([[0.5, 0.5, 0.0]]))
    x = tf.sparse.reorder(tfidf_matrix([first, second], 4))
    assert tuple(x.shape) == (3, 4)
    assert np.asarray(x.indices).tolist() == [[0, 1], [0, 3], [2, 2]]
    np.testing.assert_allclose(np.asarray(x.values), [0.5, 0.5, 1.0])
    with pytest.raises(InvalidValueError, match="same shape"):
        tfidf_matrix([(np.zeros((1, 2)), np.zeros((1, 3)))], 4)


def test_linear_branch_fits_real_texts_and_reloads(tmp_path):
    """TF-IDF + logistic regression on 300 real training texts (hate): near its optimum after
    300 steps, above the majority class on its own rows, and the same probabilities after the
    model is saved and loaded."""
    import keras
    import tensorflow as tf

    from resic_tf.data import load_labelled_texts
    from resic_tf.preprocessor import ResICPreprocessor
    from resic_tf.vocabulary import CharVocabulary

    data = load_labelled_texts(write_rows(tmp_path / "train.tsv", 300), "comments", ["hate"])
    classes = sorted(set(data.labels["hate"]))
    y = np.array([classes.index(c) for c in data.labels["hate"]])
    to_ids = ResICPreprocessor(CharVocabulary.build(data.texts).chars, max_len=132)
    ids = to_ids(tf.constant(data.texts))
    features = TfidfNGrams(20_000)
    features.adapt([ids])
    columns, weights = (np.asarray(v) for v in features(ids))
    head = LinearHead(len(classes), 20_000)
    result = fit_linear(head, tfidf_matrix([(columns, weights)], 20_000), y, C=10.0)
    assert result["gradient_norm"] < 1e-3
    probs = np.asarray(head(columns, weights))
    assert (probs.argmax(-1) == y).mean() > np.bincount(y).max() / len(y) + 0.2
    inputs = keras.Input((None,), dtype="int32")
    model = keras.Model(inputs, head(*features(inputs)))
    model.save(tmp_path / "linear.keras")
    loaded = keras.saving.load_model(tmp_path / "linear.keras")
    np.testing.assert_allclose(np.asarray(loaded(np.asarray(ids))), probs, atol=1e-6)
