"""Issue 8: length-adaptive, padding-invariant Res-IC. Padding never influences a prediction (nor
a training step); batches are grouped by length and padded to their own longest text; the
SavedModel pads each request batch; old fixed-length runs keep working."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import dev_texts
from resic_tf.config import ResICConfig, TrainConfig
from resic_tf.export import warmup_texts_from
from resic_tf.flops import block_flops, exit_flops, forward_flops, wide_flops
from resic_tf.layers import (CBAM, InternalClassifier, PaddingMask, ResidualBlock,
                             SequenceConv1D, downsample_mask, masked_average)
from resic_tf.model import build_model
from resic_tf.preprocessor import ResICPreprocessor, string_dataset
from resic_tf.run import Run, predict_exits
from resic_tf.validation import InvalidTypeError
from resic_tf.vocabulary import text_lengths

TOL = 1e-5


def pad_to(ids: np.ndarray, steps: int) -> np.ndarray:
    """`ids` with zero columns added (or trailing padding removed) to `steps` columns."""
    out = np.zeros((ids.shape[0], steps), np.int32)
    keep = min(steps, ids.shape[1])
    assert not ids[:, keep:].any(), "would cut real characters"
    out[:, :keep] = ids[:, :keep]
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


# ---------------------------------------------------------------------------------------------
# the layers, on hand-made values
# ---------------------------------------------------------------------------------------------

def test_padding_mask_follows_the_last_real_id_and_keeps_one_step_for_empty_texts():
    ids = np.array([[5, 3, 0, 0], [0, 0, 0, 0], [2, 0, 4, 0], [1, 1, 1, 1]], np.int32)
    mask = PaddingMask()(ids).numpy()
    assert mask.dtype == bool
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False],
                             [True, True, True, False], [True, True, True, True]]
    assert downsample_mask(mask, 2).tolist() == [[True, False], [True, False], [True, True],
                                                 [True, True]]
    assert downsample_mask(mask, 1) is mask and downsample_mask(None, 2) is None


def test_masked_average_counts_real_steps_only():
    x = np.array([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]], np.float32)
    mask = np.array([[True, True, False]])
    assert masked_average(x, mask).numpy().tolist() == [[2.0, 3.0]]
    # a row with no real step (only a hand-made mask can say so) averages to 0, not NaN
    assert masked_average(x, np.zeros((1, 3), bool)).numpy().tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("training", [False, True])
def test_layers_ignore_whatever_lies_in_the_padding(training):
    """Garbage in the padded steps and any padded length: the real steps' outputs do not move,
    in inference and in training (batch statistics over real steps only)."""
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 12, 1])
    x = rng.normal(size=(4, 12, 6)).astype("float32")
    mask = np.arange(12)[None, :] < lengths[:, None]
    x = np.where(mask[..., None], x, 0.0).astype("float32")
    garbage = rng.normal(scale=50.0, size=(4, 21, 6)).astype("float32")
    x_long = garbage.copy()
    x_long[:, :12] = x
    mask_long = np.arange(21)[None, :] < lengths[:, None]
    x_long = np.where(mask_long[..., None], x_long, garbage)  # the padding holds garbage

    block = ResidualBlock(8, strides=2, padding="centered")
    cbam, head = CBAM(reduction=2), InternalClassifier(3, dropout=0.0)
    short = block(x, padding_mask=mask, training=training).numpy()
    long = block(x_long, padding_mask=mask_long, training=training).numpy()
    assert short.shape == (4, 6, 8) and long.shape == (4, 11, 8)
    out_mask = mask[:, ::2]
    np.testing.assert_allclose(long[:, :6], short, atol=TOL)
    assert not long[:, 6:].any() and not short[~out_mask].any()  # padded steps are zero

    np.testing.assert_allclose(cbam(long, padding_mask=mask_long[:, ::2]).numpy()[:, :6],
                               cbam(short, padding_mask=out_mask).numpy(), atol=TOL)
    np.testing.assert_allclose(head(long, padding_mask=mask_long[:, ::2]).numpy(),
                               head(short, padding_mask=out_mask).numpy(), atol=TOL)
    peak = InternalClassifier(3, dropout=0.0, pooling="average_max")  # padding (-1) >= real steps
    np.testing.assert_allclose(peak(-1.0 - long, padding_mask=mask_long[:, ::2]).numpy(),
                               peak(-1.0 - short, padding_mask=out_mask).numpy(), atol=TOL)
    # without a mask the padding takes part: the first release's behaviour
    assert np.abs(head(long).numpy() - head(short).numpy()).max() > 1e-3


def test_centered_padding_keeps_strided_windows_in_place_where_same_shifts_them():
    """TF's "same" shifts a stride-2 window by one step when the length is even: the output of
    the same text would depend on its batch's padded length. "centered" never does."""
    x = np.zeros((1, 9, 1), np.float32)
    x[0, :5, 0] = [1, 2, 3, 4, 5]
    for padding, invariant in (("centered", True), ("same", False)):
        block = ResidualBlock(1, strides=2, padding=padding)
        block.build((None, None, 1))
        block.conv1.kernel.assign(np.array([1.0, 10.0, 100.0]).reshape(3, 1, 1))
        odd = block.conv1(x if block._pad is None else np.pad(x, ((0, 0), block._pad, (0, 0))))
        x10 = np.pad(x, ((0, 0), (0, 1), (0, 0)))
        even = block.conv1(x10 if block._pad is None else np.pad(x10, ((0, 0), block._pad,
                                                                         (0, 0))))
        same = np.allclose(odd.numpy()[0, :3, 0], even.numpy()[0, :3, 0])
        assert same is invariant, padding
        if invariant:  # output j is centred on input 2j: 1*x[2j-1] + 10*x[2j] + 100*x[2j+1]
            assert odd.numpy()[0, :3, 0].tolist() == [210.0, 432.0, 54.0]


@pytest.mark.parametrize("channels, kernel_size", [(512, 3), (600, 3), (512, 4), (8, 3)])
def test_sequence_conv_equals_keras_conv_with_the_same_weights(channels, kernel_size):
    """Wide convolutions run as shifted matrix products (faster on CPU for the last stage's few
    steps): values and gradients equal Keras's Conv1D, odd and even kernels, any length."""
    rng = np.random.default_rng(1)
    ours = SequenceConv1D(5, kernel_size, padding="same", use_bias=True)
    keras_conv = keras.layers.Conv1D(5, kernel_size, padding="same", use_bias=True)
    ours.build((None, None, channels))
    keras_conv.build((None, None, channels))
    keras_conv.set_weights([rng.normal(size=w.shape).astype("float32")
                            for w in keras_conv.get_weights()])
    ours.set_weights(keras_conv.get_weights())
    for steps in (1, 4, 9):
        x = tf.constant(rng.normal(size=(3, steps, channels)).astype("float32"))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            a, b = ours(x), keras_conv(x)
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5)
        np.testing.assert_allclose(tape.gradient(a, ours.kernel), tape.gradient(b, keras_conv.kernel),
                                   atol=1e-3, rtol=1e-5)
        np.testing.assert_allclose(tape.gradient(a, x), tape.gradient(b, x), atol=1e-3, rtol=1e-5)
    ops_used = {op.type for op in tf.function(ours).get_concrete_function(
        tf.TensorSpec([None, None, channels])).graph.get_operations()}
    wide = channels >= 512
    assert ("MatMul" in ops_used) is wide and ("Conv2D" in ops_used) is not wide
    assert ours.get_config()["matmul_min_channels"] == 512
    assert type(keras.layers.deserialize(keras.layers.serialize(ours))) is SequenceConv1D


# ---------------------------------------------------------------------------------------------
# the model on real texts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny run (trained 2 epochs by `resic train`: length-adaptive by default)."""
    return Run.load(tiny_run)


def test_new_runs_are_length_adaptive_and_take_any_length(trained):
    assert trained.config.length_adaptive is True
    assert trained.model.backbone.length_adaptive is True
    assert tuple(trained.model.input.shape) == (None, None)
    assert trained.model.preprocessor.pad_to_max_len is False
    ids = trained.model.preprocessor(tf.constant(["ab", "abcdef", ""])).numpy()
    assert ids.shape == (3, 6)  # padded to the batch's longest text
    assert trained.model.preprocessor(tf.constant([""])).numpy().shape == (1, 1)
    assert trained.model.preprocessor(tf.constant(["x" * 500])).numpy().shape == (1, 132)


def test_predictions_do_not_depend_on_padding_or_batch_mates(trained):
    model = trained.model
    texts = dev_texts(40)
    ids = model.preprocessor(tf.constant(texts)).numpy()
    lengths = text_lengths(texts)
    assert lengths.min() < 20 and ids.shape[1] >= 60  # short texts share a long batch
    own = model.predict_on_batch(ids)
    for steps in (ids.shape[1] + 1, 77 if ids.shape[1] < 77 else ids.shape[1] + 9, 132):
        assert max_diff(model.predict_on_batch(pad_to(ids, steps)), own) < TOL, steps
    # each text alone, padded to its own length: no batch-mates, no padding at all
    for i in (int(np.argmin(lengths)), int(np.argmax(lengths)), 7):
        alone = model.predict_on_batch(ids[i:i + 1, :max(1, lengths[i])])
        assert max_diff(alone, {k: v[i:i + 1] for k, v in own.items()}) < TOL
    # the outputs are not constant: the comparison above means something
    assert np.ptp(own[model.output_names[-1]], axis=0).max() > 1e-3


def test_empty_text_is_one_padding_step_with_finite_probabilities(trained):
    model = trained.model
    alone = model.predict_on_batch(np.zeros((1, 1), np.int32))
    in_batch = model.predict([dev_texts(1)[0], "", "ㅋㅋ"], verbose=0)
    for name, p in alone.items():
        assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(in_batch[name][1], p[0], atol=TOL)
    padded = model.predict_on_batch(np.zeros((1, 132), np.int32))
    assert max_diff(padded, alone) < TOL


def test_predict_groups_by_length_and_returns_input_order(trained):
    model = trained.model
    texts = dev_texts(50)
    got = model.predict(texts, batch_size=8, verbose=0)
    one_by_one = [model.predict_on_batch(model.preprocessor(tf.constant([t]))) for t in texts]
    want = {k: np.concatenate([o[k] for o in one_by_one]) for k in got}
    assert max_diff(got, want) < TOL
    exits = predict_exits(model, texts, batch_size=8)
    np.testing.assert_allclose(exits["hate"][:, -1], got["hate_lc"], atol=TOL)


def test_a_training_step_does_not_depend_on_padding(trained):
    """One SGD step on the same rows padded to their own length or to 132 moves every weight
    (batch-norm moving statistics included) the same way."""
    texts = dev_texts(24)
    config = trained.config

    def one_step(steps):
        keras.utils.set_random_seed(4)
        model = build_model(config, trained.vocabulary)
        model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=None)
        ids = model.preprocessor(tf.constant(texts)).numpy()
        y = {n: np.arange(len(texts)) % 3 for n in model.output_names}
        model.train_on_batch(ids if steps is None else pad_to(ids, steps), y)
        return {w.path: w.numpy() for w in model.weights}, ids.shape[1]

    own, steps = one_step(None)
    padded, _ = one_step(132)
    moving = [k for k in own if "moving_mean" in k]
    assert moving and max(np.abs(own[k]).max() for k in moving) > 1e-3  # the step did something
    for k in own:
        np.testing.assert_allclose(own[k], padded[k], atol=1e-4, err_msg=k)
    assert steps < 132


def test_fixed_and_adaptive_models_share_weights(trained):
    fixed_config = dataclasses.replace(trained.config, length_adaptive=False)
    fixed = build_model(fixed_config, trained.vocabulary)
    fixed.set_weights(trained.model.get_weights())
    assert [w.shape for w in fixed.weights] == [w.shape for w in trained.model.weights]
    assert tuple(fixed.input.shape) == (None, 132) and fixed.preprocessor.pad_to_max_len
    # a fixed model sees padding: its outputs differ from the masked model's with the weights
    texts = dev_texts(8)
    assert max_diff(fixed.predict(texts, verbose=0), trained.model.predict(texts, verbose=0)) \
        > 1e-3


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------

def test_training_batches_group_by_length_reshuffle_and_cover_every_row():
    texts = dev_texts(400)
    lengths = text_lengths(texts)
    ds = string_dataset(texts, np.arange(len(texts)), batch_size=16, shuffle=True, seed=0,
                        by_length=True, window=5)
    epochs = [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(2)]
    for batches in epochs:
        rows = np.concatenate([y for _, y in batches])
        assert sorted(rows.tolist()) == list(range(len(texts)))  # every row once
    first = [y.tolist() for _, y in epochs[0]]
    second = [y.tolist() for _, y in epochs[1]]
    assert first != second  # a fresh shuffle every epoch
    padded = np.mean([lengths[y].max() for _, y in epochs[0]])
    random = string_dataset(texts, np.arange(len(texts)), batch_size=16, shuffle=True, seed=0)
    padded_random = np.mean([lengths[y.numpy()].max() for _, y in random])
    assert padded < 0.75 * padded_random
    # batches are not in length order: short and long ones come mixed
    longest = [lengths[y].max() for _, y in epochs[0]]
    assert longest != sorted(longest)


def test_evaluation_batches_are_sorted_by_length_stably():
    texts = ["aaa", "b", "cc", "d", "eeee", ""]
    ds = string_dataset(texts, np.arange(6), batch_size=4, by_length=True)
    rows = np.concatenate([y.numpy() for _, y in ds]).tolist()
    assert rows == [5, 1, 3, 2, 0, 4]


def test_serving_pads_each_request_batch(trained, tmp_path):
    from resic_tf.export import export_run
    # in memory (no path): calibrating writes nothing into the shared session run
    run = Run(trained.config, trained.train_config, trained.vocabulary, trained.model,
              trained.validation)
    run.calibrate(min_support=2)
    path = export_run(run, tmp_path / "m", version=1)
    loaded = tf.saved_model.load(str(path))
    all_exits = loaded.signatures["all_exits"]
    texts = dev_texts(30)
    long = max(texts, key=len) * 3
    together = all_exits(text=tf.constant(texts + [long]))["hate_probabilities"].numpy()
    for i in (0, 5, 17):
        alone = all_exits(text=tf.constant([texts[i]]))["hate_probabilities"].numpy()
        np.testing.assert_allclose(alone[0], together[i], atol=TOL)
    keras_probs = predict_exits(run.model, texts + [long])["hate"]
    np.testing.assert_allclose(together, keras_probs, atol=TOL)


def test_warmup_texts_span_short_to_max_len():
    texts = ["a" * n for n in (3, 40, 5, 12, 9, 27)]
    got = warmup_texts_from(texts, max_len=50, n=4)
    lengths = [len(t) for t in got]
    assert got[0] == "" and lengths[1] == 3 and 40 in lengths
    assert lengths[-1] >= 50 and lengths[1:] == sorted(lengths[1:])
    assert warmup_texts_from([], max_len=50) == [""]


# ---------------------------------------------------------------------------------------------
# configs, old runs, FLOPs
# ---------------------------------------------------------------------------------------------

def test_config_records_the_kind_and_old_configs_are_fixed_length():
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10)
    assert config.length_adaptive is True
    assert ResICConfig.from_json(config.to_json()).length_adaptive is True
    old = config.to_dict()
    del old["length_adaptive"]
    assert ResICConfig.from_dict(old).length_adaptive is False
    with pytest.raises(InvalidTypeError, match=r"^`length_adaptive` must be True or False. "
                                               r"Received: length_adaptive=1$"):
        ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10, length_adaptive=1)


def test_training_batches_are_grouped_by_length_only_on_request():
    """Grouped batches trained less accurate models on korean-hate-speech: opt-in only."""
    adaptive = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=10)
    fixed = dataclasses.replace(adaptive, length_adaptive=False)
    auto = TrainConfig(data="d.tsv", text_col="x", label_cols=("t",))
    assert auto.batching == "auto"
    assert not auto.groups_by_length(adaptive) and not auto.groups_by_length(fixed)
    assert not dataclasses.replace(auto, batching="random").groups_by_length(adaptive)
    by_length = dataclasses.replace(auto, batching="by_length")
    assert by_length.groups_by_length(adaptive) and not by_length.groups_by_length(fixed)
    old = auto.to_dict()
    del old["batching"]  # train_config.json written before 0.3
    assert TrainConfig.from_dict(old).batching == "auto"
    with pytest.raises(ValueError, match=r"^`batching` must be one of \['auto', 'by_length', "
                                         r"'random'\]. Received: batching='sorted'$"):
        dataclasses.replace(auto, batching="sorted")


def test_old_preprocessor_configs_pad_to_max_len():
    pre = ResICPreprocessor(["a"], max_len=5)
    config = pre.get_config()
    assert config["pad_to_max_len"] is False
    del config["pad_to_max_len"]
    assert ResICPreprocessor.from_config(config).pad_to_max_len is True


def test_flops_are_counted_by_hand():
    config = ResICConfig(tasks={"t": ["a", "b", "c"]}, vocab_size=10, filters=(4, 8),
                         blocks=(1, 1), embedding_dim=2, cbam_reduction=2, ngram_buckets=0)
    # stem: 2*L*3*2*4 = 48L. Block 1 (4->4, L): convs 2*L*3*4*4*2 = 192L, CBAM MLP 4*(4*2+2*4)
    # = 64, temporal 2*L*7*2 = 28L. Block 2 (4->8, stride 2, L2 = ceil(L/2)): 2*L2*3*4*8 +
    # 2*L2*3*8*8 + projection 2*L2*4*8 = 640 L2, MLP 4*(8*4+4*8) = 256, temporal 28 L2.
    L = 9
    assert block_flops(config, L) == [48 * L, 192 * L + 64 + 28 * L, 668 * 5 + 256]
    heads = [2 * 4 * 3, 2 * 8 * 3]
    assert exit_flops(config, L) == [48 * L + 220 * L + 64 + heads[0],
                                     48 * L + 220 * L + 64 + 668 * 5 + 256 + heads[1]]
    assert forward_flops(config, L) == sum(block_flops(config, L)) + sum(heads)
    # a batch padded to 132 costs more than to a review's 35 characters
    assert forward_flops(config, 132) > 3.5 * forward_flops(config, 35)
    # the wide branch: L * 2 sizes * 5 dims of adds, and 5 more inputs to every head
    wide = dataclasses.replace(config, ngram_buckets=16, ngram_dim=5, ngram_sizes=(1, 2),
                               wide_fusion="features")
    assert wide_flops(wide, L) == 10 * L and wide_flops(config, L) == 0
    wide_heads = [2 * 9 * 3, 2 * 13 * 3]
    assert exit_flops(wide, L) == [a - h + 10 * L + w for a, h, w in
                                   zip(exit_flops(config, L), heads, wide_heads)]
    assert forward_flops(wide, L) == sum(block_flops(config, L)) + 10 * L + sum(wide_heads)
    # late fusion: the wide classifier once per row (5 inputs -> 3 classes: exit 0, which
    # costs the wide branch alone), then each exit's deep head on its own features (4 or 8
    # inputs) and the mix (3 flops per class)
    late = dataclasses.replace(wide, wide_fusion="late")
    assert wide_flops(late, L) == 10 * L + 2 * 5 * 3
    # two rows per n-gram: twice the adds; weighted pooling: a multiply beside each add
    assert wide_flops(dataclasses.replace(late, ngram_hashes=2), L) == 20 * L + 2 * 5 * 3
    assert wide_flops(dataclasses.replace(late, ngram_hashes=2, ngram_pooling="weighted"), L) \
        == 40 * L + 2 * 5 * 3
    late_heads = [2 * 4 * 3 + 9, 2 * 8 * 3 + 9]
    assert exit_flops(late, L) == [a - h + 10 * L + 2 * 5 * 3 + w for a, h, w in
                                   zip(exit_flops(config, L), heads, late_heads)]
    assert forward_flops(late, L) == sum(block_flops(config, L)) + 10 * L + 30 + sum(late_heads)
    # a linear branch: per n-gram occurrence (L * 2 sizes) 8 for its TF-IDF weight and a
    # multiply-add per class (3), and the mix of the two shallow classifiers (3 per class
    # arithmetic, 4 log-linear, 3 to blend the two: 10 per class), as is every exit's mix
    linear = dataclasses.replace(late, linear_ngrams=100)
    assert wide_flops(linear, L) == 10 * L + 30 + 2 * L * (8 + 2 * 3) + 10 * 3
    assert exit_flops(linear, L) == [e + 2 * L * (8 + 2 * 3) + 10 * 3 + 7 * 3 for e in
                                     exit_flops(late, L)]
