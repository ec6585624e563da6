"""Res-IC layers (table-driven, like keras' dense_test) and the model's exact structure."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from resic_tf.config import ResICConfig
from resic_tf.layers import CBAM, InternalClassifier, ResidualBlock
from resic_tf.model import block_name, build_backbone, build_model, exit_loss_weights
from resic_tf.validation import InvalidTypeError, InvalidValueError
from conftest import TINY_EXITS

# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

# (class, init kwargs, input shape, output shape, trainable weights, non-trainable weights,
#  parameter count computed by hand)
LAYER_CASES = [
    # conv1 3*8*8 + bn1 (2+2)*8 + conv2 3*8*8 + bn2 4*8 = 448; no projection (same shape)
    (ResidualBlock, {"filters": 8}, (2, 12, 8), (2, 12, 8), 6, 4, 448),
    # conv1 3*4*8 + bn 32 + conv2 3*8*8 + bn 32 + proj 1*4*8 + proj_bn 32 = 416
    (ResidualBlock, {"filters": 8, "strides": 2}, (2, 11, 4), (2, 6, 8), 9, 6, 416),
    (ResidualBlock, {"filters": 8, "strides": 2}, (2, 12, 4), (2, 6, 8), 9, 6, 416),
    # channel change alone also needs the projection
    (ResidualBlock, {"filters": 8}, (2, 12, 4), (2, 12, 8), 9, 6, 416),
    # conv1 5*4*4 + 16 + conv2 5*4*4 + 16 + proj 4*4 + 16 = 224
    (ResidualBlock, {"filters": 4, "strides": 2, "kernel_size": 5}, (2, 7, 4), (2, 4, 4), 9, 6,
     224),
    # hidden 32//16=2: (32*2+2) + (2*32+32) + temporal conv (7*2*1+1) = 177
    (CBAM, {}, (2, 10, 32), (2, 10, 32), 6, 0, 177),
    # hidden max(1, 8//16)=1: (8+1) + (8+8) + 15 = 40
    (CBAM, {}, (2, 10, 8), (2, 10, 8), 6, 0, 40),
    # hidden 8//4=2: (16+2) + (16+8) + (3*2+1) = 49
    (CBAM, {"reduction": 4, "kernel_size": 3}, (2, 10, 8), (2, 10, 8), 6, 0, 49),
    # dense 8*3 + 3 = 27
    (InternalClassifier, {"num_classes": 3}, (2, 10, 8), (2, 3), 2, 0, 27),
    (InternalClassifier, {"num_classes": 2, "dropout": 0.0}, (2, 5, 4), (2, 2), 2, 0, 10),
    # average and max joined: dense 16*3 + 3 = 51
    (InternalClassifier, {"num_classes": 3, "pooling": "average_max"}, (2, 10, 8), (2, 3), 2, 0,
     51),
]


@pytest.mark.parametrize("cls, kwargs, in_shape, out_shape, n_trainable, n_frozen, n_params",
                         LAYER_CASES)
def test_layer_shapes_and_weights(cls, kwargs, in_shape, out_shape, n_trainable, n_frozen,
                                  n_params):
    layer = cls(**kwargs)
    x = np.random.default_rng(0).normal(size=in_shape).astype("float32")
    y = layer(x, training=False)
    assert tuple(y.shape) == out_shape
    assert tuple(layer.compute_output_shape((None, *in_shape[1:]))) == (None, *out_shape[1:])
    assert len(layer.trainable_weights) == n_trainable
    assert len(layer.non_trainable_weights) == n_frozen
    assert layer.count_params() == n_params
    assert keras.backend.standardize_dtype(y.dtype) == "float32"


@pytest.mark.parametrize("cls, kwargs, in_shape", [(c[0], c[1], c[2]) for c in LAYER_CASES])
def test_layer_config_round_trip(cls, kwargs, in_shape):
    layer = cls(**kwargs, name="layer_under_test")
    x = np.random.default_rng(1).normal(size=in_shape).astype("float32")
    y = layer(x, training=False)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert type(clone) is cls
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)
    clone.build(in_shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x, training=False), y, rtol=1e-6, atol=1e-6)


POSITIVE = "must be >= 1. Received: "
INTEGER = "must be an integer. Received: "
Res, Head = ResidualBlock, InternalClassifier
Value, Type = InvalidValueError, InvalidTypeError


@pytest.mark.parametrize("cls, kwargs, error, message", [
    (Res, {"filters": 0}, Value, f"`filters` {POSITIVE}filters=0"),
    (Res, {"filters": -3}, Value, f"`filters` {POSITIVE}filters=-3"),
    (Res, {"filters": 2.5}, Type, f"`filters` {INTEGER}filters=2.5"),
    (Res, {"filters": None}, Type, f"`filters` {INTEGER}filters=None"),
    (Res, {"filters": "64"}, Type, f"`filters` {INTEGER}filters='64'"),
    (Res, {"filters": True}, Type, f"`filters` {INTEGER}filters=True"),
    (Res, {"filters": 8, "strides": 0}, Value, f"`strides` {POSITIVE}strides=0"),
    (Res, {"filters": 8, "kernel_size": "3"}, Type, f"`kernel_size` {INTEGER}kernel_size='3'"),
    (Res, {"filters": 8, "bn_momentum": 1.0}, Value,
     "`bn_momentum` must be in (0, 1). Received: bn_momentum=1.0"),
    (CBAM, {"reduction": 0}, Value, f"`reduction` {POSITIVE}reduction=0"),
    (CBAM, {"kernel_size": 2.5}, Type, f"`kernel_size` {INTEGER}kernel_size=2.5"),
    (Head, {"num_classes": 0}, Value, f"`num_classes` {POSITIVE}num_classes=0"),
    (Head, {"num_classes": 2, "pooling": "max"}, Value,
     "`pooling` must be one of ['average', 'average_max']. Received: pooling='max'"),
    (Head, {"num_classes": None}, Type, f"`num_classes` {INTEGER}num_classes=None"),
    (Head, {"num_classes": 2, "dropout": 1.0}, Value,
     "`dropout` must be in [0, 1). Received: dropout=1.0"),
    (Head, {"num_classes": 2, "dropout": -0.5}, Value,
     "`dropout` must be in [0, 1). Received: dropout=-0.5"),
    (Head, {"num_classes": 2, "dropout": None}, Type,
     "`dropout` must be a number. Received: dropout=None"),
    (Head, {"num_classes": 2, "dropout": "0.2"}, Type,
     "`dropout` must be a number. Received: dropout='0.2'"),
])
def test_bad_constructor_arguments(cls, kwargs, error, message):
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert type(info.value) is error
    assert str(info.value) == message


@pytest.mark.parametrize("steps", [11, 12])
def test_sliced_shortcut_equals_strided_1x1_conv(steps):
    """The oneDNN workaround (slice, then 1x1 conv) must compute what a strided 1x1 conv does."""
    block = ResidualBlock(8, strides=2)
    x = np.random.default_rng(2).normal(size=(2, steps, 4)).astype("float32")
    block(x)
    kernel = block.proj_conv.kernel
    sliced = block.proj_conv(x[:, ::2, :])
    strided = keras.ops.conv(x, kernel, strides=2, padding="same")  # even batch: safe
    assert tuple(sliced.shape) == (2, (steps + 1) // 2, 8)
    np.testing.assert_allclose(sliced, strided, rtol=1e-5, atol=1e-5)


def test_cbam_with_zero_weights_scales_by_a_quarter():
    # All weights zero: channel attention sigmoid(0 + 0) = 1/2, temporal sigmoid(0) = 1/2.
    cbam = CBAM(reduction=2)
    x = np.random.default_rng(3).normal(size=(2, 6, 4)).astype("float32")
    cbam(x)
    cbam.set_weights([np.zeros_like(w) for w in cbam.get_weights()])
    np.testing.assert_allclose(cbam(x), 0.25 * x, rtol=1e-6, atol=1e-6)


def test_internal_classifier_averages_over_all_steps_then_softmax():
    head = InternalClassifier(3, dropout=0.5)
    x = np.random.default_rng(4).normal(size=(2, 5, 4)).astype("float32")
    head(x)
    kernel, bias = (w.numpy() for w in head.dense.weights)
    logits = x.mean(axis=1) @ kernel + bias  # padding steps included in the mean
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    out = head(x, training=False)  # dropout is off at inference
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(out, axis=1), 1.0, rtol=1e-6)


def test_layers_save_and_load_without_custom_objects(tmp_path):
    inputs = keras.Input((12, 4))
    x = ResidualBlock(8, strides=2, name="res")(inputs)
    x = CBAM(4, name="cbam")(x)
    outputs = InternalClassifier(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(5).normal(size=(4, 12, 4)).astype("float32")
    path = tmp_path / "layers.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("res")) is ResidualBlock
    assert type(loaded.get_layer("cbam")) is CBAM
    assert type(loaded.get_layer("head")) is InternalClassifier
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), model.predict(data, verbose=0))


# ---------------------------------------------------------------------------------------------
# Model structure (two tasks, tiny filters; no training)
# ---------------------------------------------------------------------------------------------

TASKS = {"bias": ["gender", "none", "others"], "hate": ["hate", "none"]}
ARCHS = {
    # arch: (N internal classifiers, block output lengths for max_len 132, channels per block)
    "resic18": (7, [132, 132, 66, 66, 33, 33, 17, 17], [4, 4, 4, 4, 8, 8, 8, 8]),
    "resic34": (15, [132] * 3 + [66] * 4 + [33] * 6 + [17] * 3, [4] * 7 + [8] * 9),
}


def tiny_config(arch: str, **overrides) -> ResICConfig:
    kwargs = {"tasks": TASKS, "vocab_size": 20, "arch": arch, "filters": (4, 4, 8, 8),
              "embedding_dim": 4, "max_len": 132, **overrides}
    return ResICConfig(**kwargs)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def built(request):
    cfg = tiny_config(request.param)
    return cfg, build_model(cfg)


def test_output_names_and_shapes(built):
    cfg, model = built
    n, _, _ = ARCHS[cfg.arch]
    expected = {f"{task}_ic{i}" for task in TASKS for i in range(1, n + 1)} | \
        {f"{task}_lc" for task in TASKS}
    assert len(model.outputs) == 2 * (n + 1)
    assert set(model.output_names) == expected
    assert len(model.output_names) == len(expected)
    for name, tensor in model.output.items():
        task = name.rsplit("_", 1)[0]
        assert tuple(tensor.shape) == (None, len(TASKS[task])), name
    # A real forward pass: every exit gives a probability row per input.
    ids = np.random.default_rng(0).integers(0, 20, size=(2, 132)).astype("int32")
    probs = model(ids, training=False)
    assert set(probs) == expected
    for name, p in probs.items():
        assert tuple(p.shape) == (2, len(TASKS[name.rsplit("_", 1)[0]]))
        np.testing.assert_allclose(np.sum(p, axis=1), 1.0, rtol=1e-5)


def test_exit_loss_weights_follow_the_paper(built):
    cfg, model = built
    n, _, _ = ARCHS[cfg.arch]
    expected = {}
    for task in TASKS:
        expected.update({f"{task}_ic{i}": i / n for i in range(1, n + 1)})
        expected[f"{task}_lc"] = 1.0
    weights = exit_loss_weights(cfg)
    assert weights == pytest.approx(expected)
    assert set(weights) == set(model.output_names)
    assert weights[f"hate_ic{n}"] == 1.0 and weights["bias_ic1"] == pytest.approx(1 / n)
    uniform = exit_loss_weights(tiny_config(cfg.arch, loss_weighting="uniform"))
    assert uniform == {name: 1.0 for name in expected}
    model.compile()  # loss_weights="auto": Eq. 1 from the model's own tasks and depth
    assert model.get_compile_config()["loss_weights"] == pytest.approx(expected)


def test_backbone_blocks_and_cbam_count(built):
    cfg, model = built
    n, lengths, channels = ARCHS[cfg.arch]
    backbone = model.get_layer("resic_backbone")
    assert sum(isinstance(layer, CBAM) for layer in backbone.layers) == n + 1
    blocks = [layer for layer in backbone.layers if isinstance(layer, ResidualBlock)]
    assert len(blocks) == n + 1
    first_of_stage = np.cumsum((0, *cfg.stage_blocks[:-1]))  # stride 2 except in stage 1
    assert [b.strides for b in blocks] == [2 if i in first_of_stage[1:] else 1
                                           for i in range(n + 1)]
    # The backbone knows nothing of tasks: no classifier heads inside it.
    assert not any(isinstance(layer, InternalClassifier) for layer in backbone.layers)
    assert sum(isinstance(layer, InternalClassifier) for layer in model.layers) == 2 * (n + 1)


def test_block_output_shapes(built):
    cfg, _ = built
    n, lengths, channels = ARCHS[cfg.arch]
    backbone = build_backbone(dataclasses.replace(cfg, length_adaptive=False))
    names = [block_name(i) for i in range(1, n + 2)]
    # zero-padded names keep depth order when sorted; the wide branch's embedding comes last
    assert list(backbone.output) == names + ["ngram"]
    assert tuple(backbone.output["ngram"].shape) == (None, cfg.ngram_dim)
    assert names == sorted(names)
    shapes = [tuple(backbone.output[name].shape) for name in names]
    assert shapes == [(None, length, c) for length, c in zip(lengths, channels)]
    assert [backbone.block_output_shape(k) for k in range(n + 1)] == shapes
    assert backbone.num_blocks == n + 1
    # length-adaptive: any length; a padding mask per block beside its features
    adaptive = build_backbone(cfg)
    assert list(adaptive.output) == names + [f"{name}_padding_mask" for name in names] + \
        ["ngram"]
    assert [adaptive.block_output_shape(k) for k in range(n + 1)] == \
        [(None, None, c) for c in channels]
    ids = np.ones((2, 132), np.int32)
    out = adaptive(ids)
    assert [tuple(out[name].shape) for name in names] == \
        [(2, length, c) for length, c in zip(lengths, channels)]
    assert [tuple(out[f"{name}_padding_mask"].shape) for name in names] == \
        [(2, length) for length in lengths]


def test_backbone_stem_and_blocks_reproduce_the_functional_outputs(tiny_run):
    """The early-exit export walks the backbone piece by piece (`stem`, then `block(k)`); on the
    trained tiny run (real BatchNorm statistics) that walk must give every block's output."""
    import tensorflow as tf

    from conftest import DEMO_DIR

    model = keras.saving.load_model(tiny_run / "model.keras")
    backbone = model.backbone
    lines = (DEMO_DIR / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:24]
    texts = [line.split("\t")[0] for line in lines] + ["", "ㅋ", "가" * 400]
    ids = model.preprocessor(tf.constant(texts))
    expected = backbone(ids, training=False)
    outputs = model(ids, training=False)
    x, mask = backbone.stem(ids)
    wide = backbone.wide(ids, mask)
    np.testing.assert_allclose(wide, expected["ngram"], rtol=0, atol=1e-6)
    assert backbone.num_blocks == len(TINY_EXITS)
    for k in range(backbone.num_blocks):
        x, mask = backbone.block(k, x, mask)
        assert tuple(x.shape[::2]) == (len(texts), backbone.block_output_shape(k)[-1])
        np.testing.assert_allclose(x, expected[block_name(k + 1)], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(mask, expected[f"{block_name(k + 1)}_padding_mask"])
        for task in model.tasks:  # the k-th head of a task reads block k
            name = model.exit_names(task)[k]
            suffix = "_deep" if model.late_fusion else ""
            assert model.exit_heads(task)[k].name == name + suffix
            np.testing.assert_allclose(model.exit_probabilities(task, k, x, mask, wide),
                                       outputs[name], rtol=0, atol=1e-5)
    # inference mode matters: BatchNorm on batch statistics gives other numbers
    assert not np.allclose(backbone.stem(ids, training=True)[0], backbone.stem(ids)[0],
                           atol=1e-3)


def test_compile_refuses_mismatched_loss_weights():
    cfg = tiny_config("resic18", filters=(4, 4), blocks=(1, 1))
    model = build_model(cfg)
    other = ResICConfig(tasks={"bias": ["a", "b"], "sentiment": ["a", "b"]}, vocab_size=20,
                        filters=(4, 4), blocks=(1, 1))
    with pytest.raises(InvalidValueError) as info:
        model.compile(loss_weights=exit_loss_weights(other))
    assert str(info.value) == (
        "Loss-weight keys ['bias_ic1', 'bias_lc', 'sentiment_ic1', 'sentiment_lc'] do not match "
        "model outputs ['bias_ic1', 'bias_lc', 'hate_ic1', 'hate_lc']")
    assert not model.compiled


ODD_BATCH_SCRIPT = textwrap.dedent("""
    import numpy as np
    from resic_tf.config import ResICConfig
    from resic_tf.model import build_model

    cfg = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=20, filters=(8, 16, 32),
                      blocks=(1, 1, 1), max_len=132)
    model = build_model(cfg)
    model.compile()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (15, 132)).astype("int32")
    y = rng.integers(0, 2, 15)
    model.fit(x, {n: y for n in cfg.output_names}, batch_size=15, epochs=1, verbose=0)
    probs = model.predict(x, batch_size=15, verbose=0)
    assert all(p.shape == (15, 2) for p in probs.values())
    print("ODD-BATCH-OK")
""")


def test_odd_batch_with_stride_2_stages_does_not_crash():
    """Regression: a strided 1x1 Conv1D under oneDNN corrupts the heap on odd batches.

    With the strided projection this script aborts (malloc assertion / SIGSEGV) on TF 2.21 CPU;
    a subprocess turns that into a test failure instead of killing pytest.
    """
    proc = subprocess.run([sys.executable, "-c", ODD_BATCH_SCRIPT], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                       "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "ODD-BATCH-OK" in proc.stdout


def test_total_loss_weights_each_output_by_its_own_name():
    """Keras sorts output names (ic1, ic10, ic11, ..., ic2): a weight applied by position instead
    of by name would change the total. Recompute Eq. 1 by hand from the model's probabilities
    (features fusion: a late-fusion model adds its wide classifiers' loss, `test_recipe.py`)."""
    cfg = tiny_config("resic34", wide_fusion="features")
    model = build_model(cfg)
    model.compile()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 20, size=(6, 132)).astype("int32")
    labels = {"bias": rng.integers(0, 3, size=6), "hate": rng.integers(0, 2, size=6)}
    # Freshly initialised heads all predict about uniform, so every exit's loss is about log C
    # and any weighting gives the same total: bias each head differently to tell them apart.
    for k, name in enumerate(cfg.output_names):
        dense = model.get_layer(name).dense
        dense.bias.assign(np.linspace(0.0, 0.3 * k, dense.units).astype("float32"))
    y = {name: labels[name.rsplit("_", 1)[0]] for name in model.output_names}
    logs = model.evaluate(ids, y, batch_size=6, return_dict=True, verbose=0)
    probs = model.predict(ids, batch_size=6, verbose=0)
    weights = exit_loss_weights(cfg)
    total = 0.0
    for name, p in probs.items():
        ce = float(np.mean(-np.log(p[np.arange(6), y[name]])))
        assert logs[f"{name}_loss"] == pytest.approx(ce, rel=1e-4), name
        total += weights[name] * ce
    assert logs["loss"] == pytest.approx(total, rel=1e-4)
    # The check has teeth: pairing the weights with the sorted names by position gives another total.
    names = sorted(weights)
    by_position = sum(w * logs[f"{n}_loss"]
                      for w, n in zip([weights[k] for k in cfg.output_names], names))
    assert abs(by_position - total) > 1e-3


def test_backbone_and_classifier_reload_as_their_subclasses(tmp_path):
    from resic_tf.model import ResICBackbone, ResICClassifier

    cfg = tiny_config("resic18")
    model = build_model(cfg)
    model.compile()
    assert isinstance(model, ResICClassifier) and isinstance(model.backbone, ResICBackbone)
    assert list(model.backbone.pyramid_outputs) == [block_name(i) for i in range(1, 9)]
    config = model.get_config()
    assert config["tasks"] == {t: list(c) for t, c in TASKS.items()}
    assert config["backbone"]["config"]["blocks"] == [2, 2, 2, 2]
    assert (config["dropout"], config["loss_weighting"], config["preprocessor"]) == \
        (0.2, "paper", None)
    clone = ResICClassifier.from_config(json.loads(json.dumps(config)))
    assert type(clone) is ResICClassifier and type(clone.backbone) is ResICBackbone
    assert clone.count_params() == model.count_params()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded) is ResICClassifier and type(loaded.backbone) is ResICBackbone
    ids = np.random.default_rng(2).integers(0, 20, size=(3, 132)).astype("int32")
    expected, got = model.predict(ids, verbose=0), loaded.predict(ids, verbose=0)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_batchnorm_statistics_follow_the_data_within_a_few_dozen_steps(real_tsv):
    """Keras's default momentum 0.99 keeps inference-time variance near its initial 1.0 for
    ~600 steps while the stem's real variance is ~0.005 (embedding init +-0.05): every exit then
    predicts one class on validation data for the first epochs of a small run. With 0.9 the
    moving statistics match the data after 75 steps."""
    from resic_tf.data import load_labelled_texts
    from resic_tf.preprocessor import text_dataset
    from resic_tf.vocabulary import CharVocabulary

    rows = load_labelled_texts(real_tsv, "comments", ["hate"])
    vocab = CharVocabulary.build(rows.texts)
    cfg = ResICConfig(tasks={"hate": ["hate", "none", "offensive"]}, vocab_size=vocab.size,
                      filters=(4, 4), blocks=(1, 1), embedding_dim=8, length_adaptive=False)
    assert cfg.bn_momentum == 0.9
    model = build_model(cfg, vocab)
    model.compile()
    assert model.backbone.get_layer("stem_bn").momentum == 0.9
    assert model.backbone.get_layer("block01_residual").bn1.momentum == 0.9
    ids = np.concatenate([b.numpy() for b in text_dataset(rows.texts, model.preprocessor, 100)])
    y = {n: np.zeros(len(ids), np.int64) for n in model.output_names}
    model.fit(ids, y, batch_size=4, epochs=1, verbose=0)  # 300 rows: 75 steps
    stem = keras.Model(model.backbone.input, model.backbone.get_layer("stem_conv").output)
    data_var = np.var(stem.predict(ids, verbose=0), axis=(0, 1))
    moving_var = model.backbone.get_layer("stem_bn").moving_variance.numpy()
    ratio = moving_var / data_var
    assert np.all((ratio > 0.25) & (ratio < 4)), ratio  # with momentum 0.99: ratio ~ 100


def test_average_max_head_pools_real_steps_only_by_hand():
    """Steps [1, -2], [3, -5] and a padded [100, 100]: average [2, -3.5], max [3, -2]."""
    x = np.array([[[1.0, -2.0], [3.0, -5.0], [100.0, 100.0]]], np.float32)
    mask = np.array([[True, True, False]])
    head = InternalClassifier(2, dropout=0.0, pooling="average_max")
    head(x, padding_mask=mask)
    kernel = np.array([[1, 0], [0, 0], [0, 1], [1, 0]], np.float32)  # avg0 + max1 ; max0
    head.dense.set_weights([kernel, np.zeros(2, np.float32)])
    logits = np.array([2.0 + -2.0, 3.0])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(head(x, padding_mask=mask).numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(head(x[:, :2]).numpy()[0], expected, rtol=1e-6)  # no mask
