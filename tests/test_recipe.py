"""Issue 9: the training recipe's levers, each checked on exact hand-computed values: the wide
n-gram branch's hashing, the exit loss (label smoothing, class weights), the class weights and
the learning-rate schedule; and the recipes `resic train` applies."""
from __future__ import annotations

import dataclasses
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import dev_texts
from resic_tf.config import RECIPES, ResICConfig, TrainConfig
from resic_tf.layers import (MAX_WORD_CHARS, InternalClassifier, NGramEmbedding, ngram_hashes,
                             word_hashes)
from resic_tf.losses import ExitLoss, class_weights
from resic_tf.model import block_name, build_model
from resic_tf.run import Run
from resic_tf.training import learning_rate, make_optimizer
from resic_tf.validation import InvalidValueError
from resic_tf.vocabulary import separator_ids

P = 2**31 - 1  # the hash's modulus


def h(n: int, ids) -> int:
    """The n-gram hash, by hand: start at n, then h = (h * 1000003 + id + 1) mod P per id."""
    value = n
    for i in ids:
        value = (value * 1_000_003 + i + 1) % P
    return value


# ---------------------------------------------------------------------------------------------
# the wide branch
# ---------------------------------------------------------------------------------------------

def test_ngram_hashes_equal_the_hand_computed_polynomial():
    ids = np.array([[5, 6, 7, 0], [9, 0, 0, 0]], np.int32)
    got = ngram_hashes(ids, 2).numpy()
    assert got[0].tolist() == [h(2, [5, 6]), h(2, [6, 7]), h(2, [7, 0]), h(2, [0, 0])]
    assert got[1, 0] == h(2, [9, 0])
    assert ngram_hashes(ids, 1).numpy()[0, 0] == 1_000_009 == h(1, [5])
    # large ids do not overflow: the products stay in int64
    big = np.full((1, 4), 2**20, np.int32)
    assert ngram_hashes(big, 4).numpy()[0, 0] == h(4, [2**20] * 4)


def test_ngram_embedding_averages_the_ngrams_inside_the_text():
    keras.utils.set_random_seed(0)
    layer = NGramEmbedding(num_buckets=97, output_dim=3, ngram_sizes=(1, 2))
    ids = np.array([[5, 6, 7, 0, 0], [4, 0, 0, 0, 0]], np.int32)
    buckets, inside = layer.buckets(ids)
    assert buckets.shape == (2, 10)
    assert inside.numpy().tolist() == [
        [True, True, True, False, False, True, True, False, False, False],  # 3 unigrams, 2 bigrams
        [True, False, False, False, False, False, False, False, False, False]]
    assert buckets.numpy()[0, :3].tolist() == [h(1, [i]) % 97 for i in (5, 6, 7)]
    assert buckets.numpy()[0, 5:7].tolist() == [h(2, [5, 6]) % 97, h(2, [6, 7]) % 97]
    out = layer(ids).numpy()
    table = layer.embedding.embeddings.numpy() * layer.rate_multiplier  # stored divided by it
    assert layer.rate_multiplier == 10.0 and np.abs(table).max() <= 0.05
    want = table[[h(1, [5]) % 97, h(1, [6]) % 97, h(1, [7]) % 97, h(2, [5, 6]) % 97,
                  h(2, [6, 7]) % 97]].mean(0)
    # float32 sums in another order: an absolute tolerance for entries near 0
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[1], table[h(1, [4]) % 97], rtol=1e-5, atol=1e-7)
    # padding beyond the text changes nothing
    np.testing.assert_allclose(layer(np.pad(ids, [[0, 0], [0, 7]])).numpy(), out, rtol=1e-5,
                               atol=1e-7)
    restored = NGramEmbedding.from_config(layer.get_config())
    assert restored.ngram_sizes == (1, 2) and restored.num_buckets == 97
    # the multiplier speeds Adam up on the table: one step moves the output ~10x further
    slow, fast = (NGramEmbedding(97, 3, (1,), rate_multiplier=r) for r in (1.0, 10.0))
    moved = []
    for layer_ in (slow, fast):
        layer_(ids)
        layer_.embedding.embeddings.assign(np.zeros((97, 3), np.float32))
        optimizer = keras.optimizers.Adam(0.01)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer_(ids))
        optimizer.apply(tape.gradient(loss, layer_.trainable_variables),
                        layer_.trainable_variables)
        moved.append(np.abs(layer_(ids).numpy()).max())
    np.testing.assert_allclose(moved, [0.01, 0.1], rtol=1e-3)
    with pytest.raises(ValueError, match=r"^`ngram_sizes` must hold integers >= 1. "
                                         r"Received: ngram_sizes=\[0, 2\]$"):
        NGramEmbedding(10, 2, ngram_sizes=(0, 2))


def test_two_hashes_average_both_rows_of_every_ngram():
    keras.utils.set_random_seed(0)
    layer = NGramEmbedding(num_buckets=97, output_dim=3, ngram_sizes=(1, 2), num_hashes=2)
    ids = np.array([[5, 6, 7, 0, 0]], np.int32)
    buckets, inside = layer.buckets(ids)
    assert buckets.shape == (1, 20)
    one_hash = [True, True, True, False, False, True, True, False, False, False]
    assert inside.numpy()[0].tolist() == one_hash + one_hash  # unigrams, bigrams; twice
    # the second hash of h: (h * 48271 + 11) mod (2**31 - 1); h(1, [5]) = 1_000_009
    assert (1_000_009 * 48271 + 11) % P == 1_000_009 * 48271 + 11 - 22 * P == 1_026_794_216
    grams = [h(1, [5]), h(1, [6]), h(1, [7]), h(2, [5, 6]), h(2, [6, 7])]
    rows = [g % 97 for g in grams] + [(g * 48271 + 11) % P % 97 for g in grams]
    assert buckets.numpy()[0, [0, 1, 2, 5, 6, 10, 11, 12, 15, 16]].tolist() == rows
    assert buckets.numpy()[0, 10] == 1_026_794_216 % 97
    out = layer(ids).numpy()[0]
    table = layer.embedding.embeddings.numpy() * layer.rate_multiplier
    np.testing.assert_allclose(out, table[rows].mean(0), rtol=1e-5, atol=1e-7)
    assert NGramEmbedding.from_config(layer.get_config()).num_hashes == 2
    with pytest.raises(ValueError, match=r"Received: num_hashes=3"):
        NGramEmbedding(10, 2, num_hashes=3)


def test_word_features_hash_whole_words_and_bigrams_by_hand():
    # ids 3 and 9 are whitespace: words "5 6", "7" and "5 6" again, then padding
    ids = np.array([[5, 6, 3, 7, 9, 3, 5, 6, 0, 0], [3, 3, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    words, valid, bigrams, pairs = word_hashes(ids, (3, 9), word_ngrams=2)
    w56, w7 = h(101, [5, 6]), h(101, [7])  # ngram_hashes' rule started from 101
    assert w7 == (101 * 1_000_003 + 8) % P == 101_000_311
    assert words.numpy()[0, :3].tolist() == [w56, w7, w56]
    assert valid.numpy().tolist() == [[True] * 3 + [False] * 7, [False] * 10]  # no word: none
    assert bigrams.numpy()[0, :2].tolist() == [h(202, [w56, w7]), h(202, [w7, w56])]
    assert pairs.numpy().tolist() == [[True] * 2 + [False] * 7, [False] * 9]
    assert word_hashes(ids, (3, 9), word_ngrams=1)[2] is None
    # a word is hashed by its first MAX_WORD_CHARS ids
    long_a = np.array([[4] * MAX_WORD_CHARS + [5]], np.int32)
    long_b = np.array([[4] * MAX_WORD_CHARS + [6]], np.int32)
    assert word_hashes(long_a, (), 1)[0].numpy()[0, 0] == \
        word_hashes(long_b, (), 1)[0].numpy()[0, 0] == h(101, [4] * MAX_WORD_CHARS)
    assert separator_ids(["a", " ", "b", "\t", "\u3000"]) == (3, 5, 6)  # ids start at 2


def test_word_features_join_the_character_ngrams_in_the_mean():
    keras.utils.set_random_seed(0)
    layer = NGramEmbedding(num_buckets=97, output_dim=3, ngram_sizes=(1,), word_ngrams=2,
                           separator_ids=(3,))
    ids = np.array([[5, 6, 3, 7, 0, 0]], np.int32)
    buckets, inside = layer.buckets(ids)
    # 6 unigram slots, 6 word slots, 5 bigram slots; inside: 4 characters, 2 words, 1 bigram
    assert buckets.shape == (1, 17) and int(inside.numpy().sum()) == 7
    rows = [h(1, [i]) % 97 for i in (5, 6, 3, 7)] + \
        [h(101, [5, 6]) % 97, h(101, [7]) % 97, h(202, [h(101, [5, 6]), h(101, [7])]) % 97]
    out = layer(ids).numpy()[0]
    table = layer.embedding.embeddings.numpy() * layer.rate_multiplier
    np.testing.assert_allclose(out, table[rows].mean(0), rtol=1e-5, atol=1e-7)
    # padding beyond the text changes nothing; the config round-trips
    np.testing.assert_allclose(layer(np.pad(ids, [[0, 0], [0, 9]])).numpy()[0], out, rtol=1e-5,
                               atol=1e-7)
    restored = NGramEmbedding.from_config(layer.get_config())
    assert (restored.word_ngrams, restored.separator_ids) == (2, (3,))
    with pytest.raises(ValueError, match=r"Received: word_ngrams=3"):
        NGramEmbedding(10, 2, word_ngrams=3)


def test_weighted_pooling_is_a_softmax_of_the_learned_scores_by_hand():
    layer = NGramEmbedding(num_buckets=97, output_dim=2, ngram_sizes=(1,), rate_multiplier=2.0,
                           pooling="weighted")
    ids = np.array([[5, 6, 0], [0, 0, 0]], np.int32)
    start = layer(ids).numpy()  # scores start at zero: the plain mean
    mean = NGramEmbedding(97, 2, (1,), rate_multiplier=2.0)
    mean(ids)
    mean.embedding.embeddings.assign(layer.embedding.embeddings)
    np.testing.assert_allclose(start, mean(ids).numpy(), rtol=1e-6)
    table = np.zeros((97, 2), np.float32)
    a, b = h(1, [5]) % 97, h(1, [6]) % 97
    table[a], table[b] = [1.0, 0.0], [0.0, 1.0]
    scores = np.zeros((97, 1), np.float32)
    scores[a] = np.log(3.0) / 2.0  # stored divided by the rate multiplier, 2
    layer.embedding.embeddings.assign(table / 2.0)
    layer.scores.embeddings.assign(scores)
    # weights softmax([log 3, 0]) = [3/4, 1/4] over the two unigrams; times rows (1,0), (0,1)
    np.testing.assert_allclose(layer(ids).numpy()[0], [0.75, 0.25], rtol=1e-6)
    # an empty text pools its one padding step, as the mean does: row h(1, [0])
    np.testing.assert_allclose(layer(ids).numpy()[1], table[h(1, [0]) % 97], atol=1e-7)
    assert NGramEmbedding.from_config(layer.get_config()).pooling == "weighted"
    with pytest.raises(ValueError, match=r"Received: pooling='max'"):
        NGramEmbedding(10, 2, pooling="max")


def test_exit_head_joins_the_wide_features_before_its_dense_layer():
    head = InternalClassifier(2, dropout=0.0)
    x = np.ones((1, 3, 4), np.float32)
    context = np.full((1, 5), 2.0, np.float32)
    head(x, context=context)
    kernel, bias = head.dense.kernel.numpy(), head.dense.bias.numpy()
    assert kernel.shape == (9, 2)
    logits = np.concatenate([np.ones(4), np.full(5, 2.0)]) @ kernel + bias
    np.testing.assert_allclose(head(x, context=context).numpy()[0],
                               np.exp(logits) / np.exp(logits).sum(), rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tiny_run):
    return Run.load(tiny_run)


def test_default_runs_have_a_wide_branch_that_feeds_every_exit(trained):
    config = trained.config
    # the recipe leaves the table to the data: a small corpus gets 65,536 buckets at 10x
    assert RECIPES["default"]["ngram_buckets"] is None
    assert (config.ngram_buckets, config.ngram_rate) == (65536, 10.0)
    model = trained.model
    wide = model.backbone.get_layer("ngram_embedding")
    assert wide.num_buckets == config.ngram_buckets
    channels = [c for n, c in zip(config.stage_blocks, config.filters) for _ in range(n)]
    assert config.wide_fusion == RECIPES["default"]["wide_fusion"] == model.wide_fusion
    context = 0 if model.late_fusion else config.ngram_dim  # late: the deep heads see no table
    for task in config.tasks:
        widths = [head.dense.kernel.shape[0] for head in model.exit_heads(task)]
        assert widths == [c + context for c in channels]
    # the wide features move the LC: zeroing the table changes its probabilities
    texts = dev_texts(16)
    before = model.predict(texts, verbose=0)["hate_lc"]
    table = wide.embedding.embeddings
    saved = table.numpy()
    table.assign(np.zeros_like(saved))
    try:
        after = model.predict(texts, verbose=0)["hate_lc"]
    finally:
        table.assign(saved)
    assert np.abs(before - after).max() > 1e-4


def test_the_table_follows_the_number_of_training_rows():
    from resic_tf.config import LARGE_CORPUS_ROWS, default_ngram_table
    assert LARGE_CORPUS_ROWS == 80_000
    assert default_ngram_table(79_999) == {"ngram_buckets": 65_536, "ngram_rate": 10.0}
    assert default_ngram_table(80_000) == {"ngram_buckets": 262_144, "ngram_rate": 1.0}
    assert default_ngram_table(0) == default_ngram_table(7_106)
    with pytest.raises(InvalidValueError, match=r"Received: train_rows=-1"):
        default_ngram_table(-1)


def test_configs_before_0_4_have_no_wide_branch_and_old_recipes():
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10)
    assert config.ngram_buckets == 65536 and config.ngram_sizes == (1, 2, 3, 4)
    assert ResICConfig.from_json(config.to_json()) == config
    old = config.to_dict()
    for key in ("ngram_buckets", "ngram_dim", "ngram_sizes"):
        del old[key]
    assert ResICConfig.from_dict(old).ngram_buckets == 0
    assert build_model(ResICConfig.from_dict(old)).backbone.wide(np.ones((1, 2), np.int32)) \
        is None
    with pytest.raises(InvalidValueError, match=r"^`ngram_sizes` must be distinct. "
                                                r"Received: ngram_sizes=\[2, 2\]$"):
        ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, ngram_sizes=(2, 2))
    tc = TrainConfig(data="d.tsv", text_col="x", label_cols=("t",))
    assert (tc.optimizer, tc.schedule) == ("adamw", "cosine")
    before = tc.to_dict()
    for key in ("optimizer", "weight_decay", "schedule", "warmup", "label_smoothing",
                "class_weighting"):
        del before[key]
    old_tc = TrainConfig.from_dict(before)
    assert (old_tc.optimizer, old_tc.schedule, old_tc.label_smoothing,
            old_tc.class_weighting) == ("adam", "constant", 0.0, "none")


# ---------------------------------------------------------------------------------------------
# the loss, the class weights, the schedule
# ---------------------------------------------------------------------------------------------

def test_exit_loss_smooths_and_weighs_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], np.float32)
    labels = np.array([0, 2])
    plain = ExitLoss()(labels, probs).numpy()
    np.testing.assert_allclose(plain, (-math.log(0.7) - math.log(0.5)) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        plain, keras.losses.SparseCategoricalCrossentropy()(labels, probs).numpy(), rtol=1e-6)
    eps = 0.3
    row0 = (1 - eps) * -math.log(0.7) + eps * -(math.log(0.7) + math.log(0.2) + math.log(0.1)) / 3
    row1 = (1 - eps) * -math.log(0.5) + eps * -(2 * math.log(0.25) + math.log(0.5)) / 3
    np.testing.assert_allclose(ExitLoss(eps)(labels, probs).numpy(), (row0 + row1) / 2,
                               rtol=1e-6)
    weighted = ExitLoss(eps, class_weights=[2.0, 1.0, 0.5])(labels, probs).numpy()
    np.testing.assert_allclose(weighted, (2.0 * row0 + 0.5 * row1) / 2, rtol=1e-6)
    restored = ExitLoss.from_config(ExitLoss(eps, [2.0, 1.0, 0.5]).get_config())
    assert restored.label_smoothing == eps and restored.class_weights == [2.0, 1.0, 0.5]


def test_class_weights_by_hand():
    labels = [0] * 6 + [1] * 3 + [2]  # counts 6, 3, 1 of 10
    assert class_weights(labels, 3, "none") == [1.0, 1.0, 1.0]
    # balanced: n / (K n_c) = 10/18, 10/9, 10/3; mean over rows (6*10/18 + 3*10/9 + 10/3)/10 = 1
    np.testing.assert_allclose(class_weights(labels, 3, "balanced"), [10 / 18, 10 / 9, 10 / 3])
    raw = np.sqrt([10 / 18, 10 / 9, 10 / 3])
    np.testing.assert_allclose(class_weights(labels, 3, "sqrt"),
                               raw / ((raw * [6, 3, 1]).sum() / 10))
    # a class never seen in training gets the largest weight
    got = class_weights([0, 0, 1], 3, "balanced")
    assert got[2] == max(got) and np.isclose(2 * got[0] + got[1], 3)


def test_cosine_schedule_values_at_given_steps():
    tc = TrainConfig(data="d.tsv", text_col="x", label_cols=("t",), epochs=4,
                     learning_rate=1e-3, warmup=0.1)
    schedule = learning_rate(tc, steps_per_epoch=25)  # 100 steps, 10 of warm-up
    values = {s: float(schedule(s)) for s in (0, 5, 10, 55, 100)}
    np.testing.assert_allclose([values[0], values[5], values[10]], [0.0, 5e-4, 1e-3], atol=1e-9)
    np.testing.assert_allclose(values[55], 1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)),
                               rtol=1e-5)
    np.testing.assert_allclose(values[100], 0.0, atol=1e-9)
    constant = dataclasses.replace(tc, schedule="constant", optimizer="adam")
    assert learning_rate(constant, 25) == 1e-3
    assert type(make_optimizer(constant, 25)) is keras.optimizers.Adam
    adamw = make_optimizer(tc, 25)
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == 0.01


def test_compile_gives_every_exit_its_tasks_loss(trained):
    model = build_model(trained.config, trained.vocabulary)
    model.compile(label_smoothing=0.1, class_weights={"hate": [1.0, 2.0, 3.0]})
    losses = model.loss
    assert set(losses) == set(model.output_names)
    assert all(losses[n].class_weights == [1.0, 2.0, 3.0] for n in model.exit_names("hate"))
    assert all(losses[n].class_weights is None and losses[n].label_smoothing == 0.1
               for n in model.exit_names("bias"))
    with pytest.raises(InvalidValueError, match=r"needs one weight per class \(3\)"):
        model.compile(class_weights={"hate": [1.0, 2.0]})
    with pytest.raises(InvalidValueError, match=r"names tasks \['risk'\]"):
        model.compile(class_weights={"risk": [1.0, 2.0]})


def test_the_default_recipe_is_what_the_configs_default_to():
    """Every setting of `resic train`'s default recipe is the configs' own default, but those
    that need the training rows: the n-gram table's size, nested label sets, and (since 0.14)
    the linear branch (its vocabulary is adapted on them) with the wide stage before it."""
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10)
    tc = TrainConfig(data="d.tsv", text_col="x", label_cols=("t",))
    from resic_tf.config import default_ngram_table
    for key, value in RECIPES["default"].items():
        if key == "ngram_buckets":  # left to the data; by hand, a config gets the small table
            assert value is None
            assert (config.ngram_buckets, config.ngram_rate) == tuple(default_ngram_table(0).values())
            continue
        if key == "nested_tasks":  # found in the data ("auto"); by hand, a config has none
            assert value == "auto" and dict(config.nested_tasks) == {}
            continue
        if key in ("linear_ngrams", "wide_epochs"):  # by hand: neither
            assert (value, getattr(config if hasattr(config, key) else tc, key)) == (
                {"linear_ngrams": 1_000_000, "wide_epochs": 25}[key], 0)
            continue
        assert getattr(config if hasattr(config, key) else tc, key) == value, key


def test_paper_recipe_trains_the_papers_model(tmp_path, real_tsv):
    from resic_tf.cli import main
    out = tmp_path / "paper"
    assert main(["train", "--data", str(real_tsv), "--text-col", "comments", "--label-cols",
                 "hate", "--filters", "4,4,4,4", "--epochs", "1", "--recipe", "paper",
                 "--label-smoothing", "0.1", "--out", str(out), "--quiet"]) == 0
    run = Run.load(out)
    assert run.config.ngram_buckets == 0
    assert "ngram_embedding" not in [layer.name for layer in run.model.backbone.layers]
    tc = run.train_config
    assert (tc.optimizer, tc.schedule, tc.class_weighting) == ("adam", "constant", "none")
    assert run.config.exit_pooling == "average" and dict(run.config.nested_tasks) == {}
    assert tc.learning_rate == 1e-3
    assert tc.label_smoothing == 0.1  # a flag overrides the recipe


def evaluated_loss(run, texts, y, **compile_kwargs):
    """The loss `evaluate` reports for the run's weights compiled with `compile_kwargs`, and the
    model."""
    model = build_model(run.config, run.vocabulary)
    model.set_weights(run.model.get_weights())
    model.compile(**compile_kwargs)
    return model.evaluate(texts, y, verbose=0, return_dict=True)["loss"], model


def test_self_distillation_by_hand():
    from resic_tf.losses import self_distillation
    lc = np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)
    ic1 = np.array([[0.25, 0.75], [0.9, 0.1]], np.float32)
    ic2 = np.array([[0.5, 0.5], [0.5, 0.5]], np.float32)
    kl1 = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    kl2 = (0.0 + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    got = self_distillation(lc, [ic1, ic2], [0.5, 1.0])
    np.testing.assert_allclose(float(got), 0.5 * kl1 + kl2, rtol=1e-5)
    # the teacher gets no gradient; the student does
    lc_v, ic_v = tf.Variable(lc), tf.Variable(ic1)
    with tf.GradientTape(persistent=True) as tape:
        loss = self_distillation(lc_v, [ic_v], [1.0])
    assert tape.gradient(loss, lc_v) is None
    assert np.abs(tape.gradient(loss, ic_v).numpy()).max() > 0.1


def test_distillation_adds_to_the_training_loss(trained):
    texts = dev_texts(16)
    y = {"bias": np.arange(16) % 3, "hate": np.arange(16) % 3}
    results = {w: evaluated_loss(trained, texts, y, distillation=w) for w in (0.0, 2.0)}
    losses, model = {w: r[0] for w, r in results.items()}, results[2.0][1]
    ids = model.preprocessor(tf.constant(texts))
    out = model(ids, training=False)
    from resic_tf.config import loss_weights
    from resic_tf.losses import self_distillation
    w = loss_weights(model.tasks, model.num_exits)
    extra = sum(float(self_distillation(out[names[-1]], [out[n] for n in names[:-1]],
                                        [w[n] for n in names[:-1]]))
                for names in (model.exit_names(t) for t in model.tasks))
    assert extra > 1e-3
    np.testing.assert_allclose(losses[2.0] - losses[0.0], 2.0 * extra, rtol=1e-3)
    assert model.get_compile_config()["distillation"] == 2.0


# ---------------------------------------------------------------------------------------------
# `resic baselines`: the run beside what a user would pick instead, on the same rows
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory, demo_dir):
    """A copy of the tiny run, evaluated on 60 dev rows."""
    import shutil

    from conftest import write_rows
    from resic_tf.cli import main
    run = tmp_path_factory.mktemp("cmp") / "run"
    shutil.copytree(tiny_run, run)
    test = write_rows(run.parent / "test60.tsv", 60, source="dev.tsv")
    assert main(["evaluate", str(run), "--data", str(test)]) == 0
    return run, test


def test_baselines_command_prints_stored_figures_without_the_extra(evaluated_run, monkeypatch,
                                                                    capsys, tmp_path):
    from resic_tf import baselines
    from resic_tf.cli import main
    run, test = evaluated_run
    monkeypatch.setattr(baselines, "available", lambda: False)
    stored = tmp_path / "b.json"
    stored.write_text('{"source": "measured by hand", "scores": [{"task": "hate", "model": '
                      '"fastText", "accuracy": 0.5, "macro_f1": 0.25}]}', encoding="utf-8")
    assert main(["baselines", str(run), "--data", str(test), "--stored", str(stored)]) == 0
    out = capsys.readouterr().out
    assert "baselines not installed" in out and "measured by hand" in out
    assert "| hate | fastText | 0.5000 | 0.2500 |  |" in out
    scores = json.loads((run / "run.json").read_text(encoding="utf-8"))["scores"]
    lc = scores["test60/hate_lc_macro_f1"]
    assert f"| hate | Res-IC (LC) | {scores['test60/hate_lc_accuracy']:.4f} | {lc:.4f} |" in out
    assert "| bias | Res-IC (LC) |" in out and "GATE" not in out  # not calibrated: no gate


def test_baselines_are_fitted_on_the_runs_own_training_rows(evaluated_run, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("fasttext")
    from resic_tf import baselines
    from resic_tf.config import TrainConfig
    from resic_tf.data import load_labelled_texts, split_train_val
    run, test = evaluated_run
    seen = {}
    real = baselines.fit_baselines

    def spy(train, test_, tasks, seed):
        seen["texts"], seen["seed"] = list(train.texts), seed
        return real(train, test_, tasks, seed)

    monkeypatch.setattr(baselines, "fit_baselines", spy)
    scores, source = baselines.compare_run(run, test)
    tc = TrainConfig.load(run / "train_config.json")
    want = split_train_val(load_labelled_texts(tc.data, tc.text_col, tc.label_cols),
                           tc.val_split, tc.seed)[0]
    assert seen["texts"] == list(want.texts) and seen["seed"] == tc.seed
    assert f"{len(want)} training rows" in source
    models = {(s.task, s.model) for s in scores}
    assert {("hate", baselines.TFIDF), ("bias", baselines.FASTTEXT)} <= models
    assert all(0.0 <= s.macro_f1 <= 1.0 for s in scores)


def test_wide_loss_trains_the_wide_branchs_own_classifiers(trained):
    texts = dev_texts(16)
    y = {"bias": np.arange(16) % 3, "hate": (np.arange(16) + 1) % 3}
    # (a late-fusion model always trains its wide classifiers: wide_loss 0 means 1 there)
    results = {w: evaluated_loss(trained, texts, y, wide_loss=w) for w in (0.5, 1.0)}
    losses, model = {w: r[0] for w, r in results.items()}, results[0.5][1]
    assert [h.name for h in model.wide_heads] == ["bias_wide", "hate_wide"]
    wide = model.backbone.wide(model.preprocessor(tf.constant(texts)))
    extra = sum(float(keras.losses.SparseCategoricalCrossentropy()(y[t], head(wide)))
                for t, head in zip(model.tasks, model.wide_heads))
    np.testing.assert_allclose(losses[1.0] - losses[0.5], 0.5 * extra, rtol=1e-3)
    # the heads are saved with the model
    assert {w.path for h in trained.model.wide_heads for w in h.weights} == \
        {"bias_wide/kernel", "bias_wide/bias", "hate_wide/kernel", "hate_wide/bias"}


# ---------------------------------------------------------------------------------------------
# NFC and NFD Hangul give the same characters, ids, lengths and predictions
# ---------------------------------------------------------------------------------------------

def test_conjoining_jamo_compose_into_syllables_by_hand():
    from resic_tf.vocabulary import compose_hangul, split_chars
    # 각 = U+AC00 + (0 * 21 + 0) * 28 + 1; 닭 = U+AC00 + (3 * 21 + 0) * 28 + 9 = U+B2ED
    cps = tf.ragged.constant([[0x1100, 0x1161, 0x11A8, ord("x")], [0x1103, 0x1161, 0x11B0],
                              [0x1100], [0x1161, 0x1100], [0x1100, 0x1161], []], tf.int32)
    assert compose_hangul(cps).to_list() == [[0xAC01, ord("x")], [0xB2ED], [0x1100],
                                             [0x1161, 0x1100], [0xAC00], []]
    # the round trip: every precomposed syllable survives NFD and comes back whole
    import unicodedata
    syllables = "".join(chr(c) for c in range(0xAC00, 0xD7A4))
    nfd = unicodedata.normalize("NFD", syllables)
    assert len(nfd) > 2 * len(syllables)
    got = split_chars(tf.constant([nfd])).flat_values.numpy()
    assert [c.decode("utf-8") for c in got] == list(syllables)


def test_nfd_text_gets_the_nfc_ids_length_and_prediction(trained):
    import unicodedata

    from resic_tf.vocabulary import text_lengths
    texts = dev_texts(12)
    nfd = [unicodedata.normalize("NFD", t) for t in texts]
    assert sum(len(a) != len(b) for a, b in zip(texts, nfd)) >= 10  # the forms really differ
    pre = trained.model.preprocessor
    np.testing.assert_array_equal(pre(tf.constant(nfd)).numpy(), pre(tf.constant(texts)).numpy())
    np.testing.assert_array_equal(text_lengths(nfd), text_lengths(texts))
    a, b = trained.model.predict(texts, verbose=0), trained.model.predict(nfd, verbose=0)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6


# ---------------------------------------------------------------------------------------------
# late fusion: the wide branch as a classifier of its own, averaged into every exit
# ---------------------------------------------------------------------------------------------

def test_late_fusion_mixes_in_inference_and_passes_the_deep_exit_in_training():
    from resic_tf.layers import LateFusion
    deep = np.array([[0.2, 0.8], [1.0, 0.0]], np.float32)
    wide = np.array([[0.6, 0.4], [0.0, 1.0]], np.float32)
    fusion = LateFusion(0.25)
    np.testing.assert_allclose(fusion(deep, wide), [[0.3, 0.7], [0.75, 0.25]], rtol=1e-6)
    np.testing.assert_array_equal(fusion(deep, wide, training=True), deep)
    assert LateFusion.from_config(fusion.get_config()).wide_weight == 0.25
    with pytest.raises(ValueError, match=r"Received: wide_weight=1.5$"):
        LateFusion(1.5)
    with pytest.raises(ValueError, match=r"Received: wide_fusion='early'"):
        ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, wide_fusion="early")


@pytest.fixture(scope="module")
def late_model():
    """A small late-fusion model fitted for one epoch on 96 real comments."""
    from resic_tf.vocabulary import CharVocabulary
    texts = dev_texts(96)
    config = ResICConfig(tasks={"bias": ["none", "gender", "others"], "hate": ["a", "b", "c"]},
                         vocab_size=0 + len(CharVocabulary.build(texts).chars) + 2,
                         filters=(8, 8, 8, 8), dropout=0.0, ngram_buckets=512, ngram_dim=8,
                         wide_fusion="late", wide_weight=0.3)
    keras.utils.set_random_seed(0)
    model = build_model(config, CharVocabulary.build(texts))
    model.compile(optimizer="adam")
    y = {"bias": np.arange(96) % 3, "hate": (np.arange(96) // 2) % 3}
    model.fit(texts, y, epochs=1, batch_size=32, verbose=0)
    return config, model, texts, y


def test_late_fusion_exits_average_their_deep_head_with_the_wide_classifier(late_model):
    config, model, texts, _ = late_model
    assert model.late_fusion and model.wide_loss == 1.0  # compile trains the wide classifiers
    assert sorted(model.output_names) == sorted(n for t in config.tasks
                                                for n in config.exit_names(t))
    ids = model.preprocessor(tf.constant(texts[:12]))
    # training mode: every exit is its deep head alone (on batch-statistics features; the two
    # calls move BN's moving statistics, so inference-mode outputs are taken after them)
    trained, features = model(ids, training=True), model.backbone(ids, training=True)
    for t, task in enumerate(config.tasks):
        for k, name in enumerate(config.exit_names(task)):
            block = block_name(k + 1)
            np.testing.assert_allclose(trained[name], model.exit_heads(task)[k](
                features[block], padding_mask=features[f"{block}_padding_mask"]), atol=1e-6)
    served = model(ids, training=False)
    x, mask = model.backbone.stem(ids)
    wide = model.backbone.wide(ids, mask)
    for k in range(config.num_exits):
        x, mask = model.backbone.block(k, x, mask)
        for t, task in enumerate(config.tasks):
            name = config.exit_names(task)[k]
            head = model.exit_heads(task)[k]
            assert head.name == f"{name}_deep" and head.dense.kernel.shape[0] == 8  # no context
            deep = head(x, padding_mask=mask).numpy()
            wide_probs = model.wide_heads[t](wide).numpy()
            np.testing.assert_allclose(served[name], 0.7 * deep + 0.3 * wide_probs, atol=1e-6)
            np.testing.assert_allclose(model.exit_probabilities(task, k, x, mask, wide),
                                       served[name], atol=1e-6)


def test_late_fusion_trains_the_table_on_the_wide_loss_only(late_model):
    _, model, texts, y = late_model
    ids = model.preprocessor(tf.constant(texts[:32]))
    targets = model._targets({t: v[:32] for t, v in y.items()})
    table = model.backbone.get_layer("ngram_embedding").embedding.embeddings
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(ids, training=True)
        exits = sum(keras.losses.sparse_categorical_crossentropy(targets[n], outputs[n])
                    for n in outputs)
        total = model.compute_loss(ids, targets, outputs)
    exit_grad = tape.gradient(exits, table.value)
    assert exit_grad is None or float(tf.reduce_max(tf.abs(tf.convert_to_tensor(exit_grad)))) == 0
    assert float(tf.reduce_max(tf.abs(tf.convert_to_tensor(tape.gradient(total, table.value))))) > 0


def test_wide_stage_sgd_divides_the_tables_rate_by_its_multiplier_squared():
    from resic_tf.training import _WideStageSGD
    table, other = keras.Variable(np.ones((3, 2), np.float32)), keras.Variable(np.ones(2, np.float32))
    optimizer = _WideStageSGD(0.5, table, multiplier=10.0)
    optimizer.apply([tf.constant([[1.0, 2.0]] * 3), tf.constant([1.0, 2.0])], [table, other])
    # the table: 1 - 0.5 / 100 * g; anything else: plain SGD, 1 - 0.5 * g
    np.testing.assert_allclose(table.numpy(), [[0.995, 0.99]] * 3, rtol=1e-6)
    np.testing.assert_allclose(other.numpy(), [0.5, 0.0], atol=1e-7)


def test_wide_stage_trains_the_wide_branch_alone_then_freezes_it(real_tsv, tmp_path, monkeypatch):
    """`--wide-epochs`: the wide branch is trained first by SGD on its own loss (the deep
    branch untouched), then frozen: the deep fit and the saved model keep its weights."""
    from resic_tf import training
    from resic_tf.cli import main

    seen = {}
    stage = training.train_wide_stage

    def spy(model, *args, **kwargs):
        deep = model.backbone.get_layer("stem").weights[0].numpy()
        losses = stage(model, *args, **kwargs)
        seen.update(losses=losses, deep_moved=not np.array_equal(
            deep, model.backbone.get_layer("stem").weights[0].numpy()),
            wide=[w.numpy() for w in model.backbone.get_layer("ngram_embedding").weights +
                  [v for h in model.wide_heads for v in h.weights]],
            stem=model.backbone.get_layer("stem").weights[0].numpy())
        return losses

    monkeypatch.setattr(training, "train_wide_stage", spy)
    args = ["train", "--data", str(real_tsv), "--val-split", "0.2", "--text-col", "comments",
            "--label-cols", "bias,hate", "--filters", "8,8,8,8", "--blocks", "1,1,1,1",
            "--epochs", "2", "--batch-size", "32", "--seed", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run"), "--wide-epochs", "3",
                 "--wide-learning-rate", "4"]) == 0
    assert len(seen["losses"]) == 3 and seen["losses"][-1] < seen["losses"][0]
    assert not seen["deep_moved"]
    run = Run.load(tmp_path / "run")
    assert (run.train_config.wide_epochs, run.train_config.wide_learning_rate) == (3, 4.0)
    assert run.model.wide_frozen and run.model.wide_loss == 0.0  # saved frozen, so it stays
    saved = [w.numpy() for w in run.model.backbone.get_layer("ngram_embedding").weights +
             [v for h in run.model.wide_heads for v in h.weights]]
    for got, want in zip(saved, seen["wide"], strict=True):
        np.testing.assert_array_equal(got, want)  # frozen through the deep fit
    assert not np.array_equal(run.model.backbone.get_layer("stem").weights[0].numpy(),
                              seen["stem"])  # the deep branch trained after it
    # a model without late fusion has no wide stage: refused before the run directory exists
    assert main([*args, "--out", str(tmp_path / "features"), "--wide-epochs", "3",
                 "--wide-fusion", "features"]) == 2
    assert not (tmp_path / "features").exists()


def test_late_fusion_models_save_load_and_old_configs_stay_features(late_model, tmp_path):
    config, model, texts, _ = late_model
    assert ResICConfig.from_json(config.to_json()) == config
    model.save(tmp_path / "late.keras")
    loaded = keras.saving.load_model(tmp_path / "late.keras")
    assert loaded.wide_fusion == "late" and loaded.wide_weight == 0.3
    np.testing.assert_allclose(loaded.predict(texts[:8], verbose=0)["hate_lc"],
                               model.predict(texts[:8], verbose=0)["hate_lc"], atol=1e-6)
    assert loaded.get_layer("resic_backbone").ngram_hashes == config.ngram_hashes == 1
    old = {k: v for k, v in config.to_dict().items()
           if k not in ("wide_fusion", "wide_weight", "ngram_hashes", "ngram_pooling")}
    assert ResICConfig.from_dict(old).wide_fusion == "features"
    # written before 0.10: one hash, mean pooling
    assert (ResICConfig.from_dict(old).ngram_hashes, ResICConfig.from_dict(old).ngram_pooling) \
        == (1, "mean")
    assert RECIPES["paper"]["wide_fusion"] == "features"


def test_shares_are_chosen_per_exit_on_macro_f1_by_hand():
    from resic_tf.fusion import choose_shares
    labels = np.array([0, 1, 1, 0])
    wide = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])   # wrong on row 2
    deep = np.stack([np.array([[0.4, 0.6], [0.4, 0.6], [0.0, 1.0], [0.6, 0.4]]),  # wrong on 0
                     np.array([[0.5, 0.5]] * 4)], axis=1)              # no information
    # exit 1, class-0 probability of the mix: row 0 0.4 + 0.5w (right from w = 0.2), row 1
    # 0.4 - 0.2w (always right), row 2 0.6w against 1 - 0.6w (right up to w = 0.8), row 3
    # 0.6 + 0.1w (always right): every share in 0.2..0.8 is right on all four rows, and the tie
    # goes to the share nearest 0.5. Exit 2: any w > 0 copies the wide classifier's argmax (3 of
    # 4 right); w = 0 ties every row (class 0: 2 of 4). 0.5 again.
    assert choose_shares(labels, deep, wide) == [0.5, 0.5]
    # deep heads always wrong (0.95 on the wrong class), a wide classifier always right (0.85):
    # the mix is right where 0.05 + 0.8w > 0.95 - 0.8w, w > 0.5625: the nearest share is 0.6
    deep_wrong = np.stack([np.eye(2)[1 - labels] * 0.9 + 0.05] * 2, axis=1)
    assert choose_shares(labels, deep_wrong, np.eye(2)[labels] * 0.7 + 0.15) == [0.6, 0.6]


def test_training_picks_each_exits_share_on_the_validation_rows(tiny_run):
    """What `resic train` recorded and saved equals the shares chosen again from the deep heads'
    and the wide classifier's predictions on the run's validation rows."""
    from resic_tf.fusion import choose_shares, set_shares, shares_of
    from resic_tf.run import predict_file
    run = Run.load(tiny_run)
    state = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))
    assert run.model.late_fusion and state["wide_shares"] == shares_of(run.model)
    passes = {}
    for w in (0.0, 1.0):
        set_shares(run.model, {t: [w] * run.model.num_exits for t in run.model.tasks})
        passes[w] = predict_file(run, run.validation)
    for task in run.model.tasks:
        assert state["wide_shares"][task] == choose_shares(
            passes[0.0].labels[task], passes[0.0].probs[task], passes[1.0].probs[task][:, -1])


def test_predict_exits_returns_the_wide_classifier_as_exit_0(tiny_run):
    """`predict_exits` of a late-fusion model adds `{task}_wide`: what every exit serves when the
    wide classifier's share is 1, computed by the n-gram branch alone."""
    from resic_tf.fusion import set_shares, shares_of
    from resic_tf.run import predict_exits
    run = Run.load(tiny_run)
    texts = run.validation.texts[:40]
    probs = predict_exits(run.model, texts, batch_size=16)
    assert set(probs) == {"bias", "hate", "bias_wide", "hate_wide"}
    kept = shares_of(run.model)
    set_shares(run.model, {t: [1.0] * run.model.num_exits for t in run.model.tasks})
    try:
        all_wide = predict_exits(run.model, texts, batch_size=7)
    finally:
        set_shares(run.model, kept)
    for task in run.model.tasks:
        np.testing.assert_allclose(all_wide[f"{task}_wide"], probs[f"{task}_wide"], atol=1e-6)
        for k in range(run.model.num_exits):
            np.testing.assert_allclose(all_wide[task][:, k], probs[f"{task}_wide"], atol=1e-6)
    assert predict_exits(run.model, [])["hate_wide"].shape == (0, len(run.model.tasks["hate"]))


def test_the_wide_branch_widens_for_tasks_with_many_classes():
    """`ngram_dim` None: 64, or 128 once a task has more than 64 classes; an explicit width wins,
    and the resolved width is what the config saves."""
    many = {"intent": [f"c{i}" for i in range(65)], "domain": ["a", "b"]}
    assert ResICConfig(tasks={"t": [f"c{i}" for i in range(64)]}, vocab_size=10).ngram_dim == 64
    config = ResICConfig(tasks=many, vocab_size=10)
    assert config.ngram_dim == 128
    assert ResICConfig.from_json(config.to_json()).ngram_dim == 128
    assert ResICConfig(tasks=many, vocab_size=10, ngram_dim=32).ngram_dim == 32


# ---------------------------------------------------------------------------------------------
# jamo embeddings
# ---------------------------------------------------------------------------------------------

def test_jamo_of_known_syllables():
    from resic_tf.vocabulary import jamo_of
    # 가 U+AC00: L0 V0 no final; 각 U+AC01: final 1; 힣 U+D7A3 = AC00 + (18*21 + 20)*28 + 27
    assert jamo_of(["가", "각", "힣", "a", "ㅋ", "😀"]) == [
        [0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 2], [19, 21, 28], [0, 0, 0], [0, 0, 0],
        [0, 0, 0]]
    # 한 = AC00 + (18*21 + 0)*28 + 4: initial ㅎ (19), medial ㅏ (1), final ㄴ (5)
    assert jamo_of(["한"])[2] == [19, 1, 5]


def test_stem_adds_each_syllables_jamo_vectors_by_hand(tmp_path):
    from resic_tf.layers import JAMO_ROWS, Stem
    from resic_tf.vocabulary import jamo_of
    chars = ["가", "각", "a"]
    stem = Stem(5, 2, 4, jamo=jamo_of(chars))
    ids = np.array([[2, 3, 4, 0]], np.int32)
    stem(ids, padding_mask=ids > 0)
    stem.embedding.set_weights([np.arange(10, dtype=np.float32).reshape(5, 2)])
    for table, n in zip(stem.jamo_embeddings, JAMO_ROWS):
        table.set_weights([np.tile(np.arange(n, dtype=np.float32)[:, None] * 100, (1, 2))])
    x = stem.embed(ids)
    # 가: own row 2 (4, 5) + initial 1, medial 1, final 1 (100 each) -> (304, 305)
    np.testing.assert_allclose(x.numpy()[0, :3], [[304, 305], [306 + 100, 307 + 100], [8, 9]])
    model = keras.Sequential([keras.Input((None,), dtype="int32"), stem])
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again(ids), model(ids), rtol=1e-6)
    assert again.layers[0].jamo == jamo_of(chars)
    with pytest.raises(InvalidValueError, match="`jamo` needs"):
        Stem(4, 2, 4, jamo=jamo_of(chars))  # one row short


def test_jamo_model_is_built_from_its_vocabulary():
    cfg = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=5, filters=(4, 4, 4, 4),
                      ngram_buckets=0, jamo_embedding=True)
    with pytest.raises(InvalidValueError, match="built from its vocabulary"):
        build_model(cfg)
    model = build_model(cfg, ["가", "각", "a"])
    names = [w.path for w in model.backbone.get_layer("stem").weights]
    assert any("jamo_final" in n for n in names)
    assert model.predict(["각가a", ""], verbose=0)["t_lc"].shape == (2, 2)
