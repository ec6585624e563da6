"""ResICPreprocessor (raw strings -> character ids, in TF ops), the string datasets, and the
classifier that carries the preprocessor: predicts raw strings, saves and reloads with it."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import DEMO_DIR
from resic_tf.config import ResICConfig
from resic_tf.data import encode_labels, load_labelled_texts, sorted_labels
from resic_tf.metrics import macro_f1
from resic_tf.model import ResICClassifier, build_model
from resic_tf.preprocessor import ResICPreprocessor, string_dataset, text_dataset
from resic_tf.validation import InvalidValueError
from resic_tf.vocabulary import OOV_ID, PAD_ID, CharVocabulary, char_lengths

# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def test_preprocessor_exact_ids_truncation_padding_and_oov():
    # ids: 0 pad, 1 OOV, then the vocabulary in order: 안 2, 녕 3, 😀 4, a 5, 👍 6
    preprocessor = ResICPreprocessor(["안", "녕", "😀", "a", "👍"], max_len=4, pad_to_max_len=True)
    texts = ["안녕a", "😀x안녕하세요", "", "a👍🏽", "ㅋ"]
    ids = preprocessor(tf.constant(texts)).numpy()
    expected = [
        [2, 3, 5, PAD_ID],          # padded at the end
        [4, OOV_ID, 2, 3],          # truncated to the first 4 characters; x is OOV
        [PAD_ID] * 4,               # empty text
        [5, 6, OOV_ID, PAD_ID],     # the skin-tone modifier is its own code point
        [OOV_ID, PAD_ID, PAD_ID, PAD_ID],
    ]
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.int32
    # lengths are counted by the same decode, before truncation
    np.testing.assert_array_equal(char_lengths(tf.constant(texts)), [3, 7, 0, 3, 1])
    assert preprocessor.compute_output_shape((None,)) == (None, 4)
    # length-adaptive (the default): padded to the batch's longest text, capped at max_len
    adaptive = ResICPreprocessor(preprocessor.chars, max_len=4)
    np.testing.assert_array_equal(adaptive(tf.constant(texts)), expected)
    np.testing.assert_array_equal(adaptive(tf.constant(["안", "ㅋ녕", ""])),
                                  [[2, 0], [OOV_ID, 3], [0, 0]])
    np.testing.assert_array_equal(adaptive(tf.constant(["", ""])), [[0], [0]])  # one step
    assert adaptive(tf.constant([], tf.string)).shape == (0, 1)
    assert adaptive.compute_output_shape((None,)) == (None, None)
    assert preprocessor.trainable is False


def test_preprocessor_ids_from_code_points_at_the_search_edges():
    """Ids come from a binary search over the vocabulary's sorted code points: the smallest and
    largest code points, those outside both ends and between keys, and an empty vocabulary."""
    chars = ["z", "\x01", "\U0010fffd", "가"]  # ids 2..5, not in code point order
    texts = ["\x01z가\U0010fffd", "\x00{\U0010fffe"]
    ids = ResICPreprocessor(chars, max_len=8)(tf.constant(texts))
    np.testing.assert_array_equal(ids.numpy(), [[3, 2, 5, 4], [OOV_ID, OOV_ID, OOV_ID, PAD_ID]])
    empty = ResICPreprocessor([], max_len=3)(tf.constant(["ab", ""])).numpy()
    np.testing.assert_array_equal(empty, [[OOV_ID, OOV_ID], [PAD_ID, PAD_ID]])


def test_preprocessor_round_trips_texts_of_a_real_vocabulary():
    texts = ["정말 재밌어요 ㅋㅋ", "hello 😀", "mixed 한글 👍🏽 and ascii", ""]
    vocab = CharVocabulary.build(texts)
    preprocessor = ResICPreprocessor(vocab.chars, max_len=32)
    ids = preprocessor(tf.constant(texts)).numpy()
    id_to_char = {i + 2: c for i, c in enumerate(vocab.chars)}
    decoded = ["".join(id_to_char[i] for i in row if i != PAD_ID) for row in ids]
    assert decoded == texts
    assert OOV_ID not in ids


def test_preprocessor_config_round_trip():
    preprocessor = ResICPreprocessor(["가", "b"], max_len=7, name="pre")
    config = preprocessor.get_config()
    assert config["chars"] == ["가", "b"] and config["max_len"] == 7
    clone = ResICPreprocessor.from_config(config)
    assert clone.chars == ["가", "b"] and clone.max_len == 7 and clone.name == "pre"
    np.testing.assert_array_equal(clone(tf.constant(["가bz"])), [[2, 3, 1]])
    fixed = ResICPreprocessor.from_config({**config, "pad_to_max_len": True})
    np.testing.assert_array_equal(fixed(tf.constant(["가bz"])), [[2, 3, 1, 0, 0, 0, 0]])
    again = keras.layers.deserialize(keras.layers.serialize(preprocessor))  # registered
    assert type(again) is ResICPreprocessor


def test_preprocessor_passes_labels_and_sample_weights_through():
    preprocessor = ResICPreprocessor(["a", "b"], max_len=2)
    x = tf.constant(["ab", "b"])
    ids, y = preprocessor(x, tf.constant([1, 0]))
    np.testing.assert_array_equal(ids, [[2, 3], [3, 0]])
    np.testing.assert_array_equal(y, [1, 0])
    ids, y, sw = preprocessor(x, {"t": tf.constant([1, 0])}, tf.constant([0.5, 2.0]))
    np.testing.assert_array_equal(y["t"], [1, 0])
    np.testing.assert_allclose(sw, [0.5, 2.0])


def test_preprocessor_checks_max_len():
    with pytest.raises(InvalidValueError, match=r"^`max_len` must be >= 1. Received: max_len=0$"):
        ResICPreprocessor(["a"], 0)


def test_text_dataset_keeps_order_and_targets():
    preprocessor = ResICPreprocessor(["a", "b"], max_len=3, pad_to_max_len=True)
    texts = ["a", "bb", "ab", "ba", "c"]
    ds = text_dataset(texts, preprocessor, batch_size=2, targets={"t_lc": np.arange(5)})
    xs, ys = zip(*[(x.numpy(), y["t_lc"].numpy()) for x, y in ds])
    assert [len(x) for x in xs] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(xs),
                                  [[2, 0, 0], [3, 3, 0], [2, 3, 0], [3, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(np.concatenate(ys), np.arange(5))
    inputs_only = np.concatenate([x.numpy() for x in text_dataset(texts, preprocessor, 4)])
    np.testing.assert_array_equal(inputs_only, np.concatenate(xs))


def test_string_dataset_order_shuffle_and_bytes():
    texts = ["한", b"b", "c", "d", "e", "f"]
    batches = list(string_dataset(texts, np.arange(6), batch_size=4))
    assert [b[0].numpy().tolist() for b in batches] == \
        [["한".encode(), b"b", b"c", b"d"], [b"e", b"f"]]
    assert np.concatenate([b[1].numpy() for b in batches]).tolist() == list(range(6))
    shuffled = string_dataset(texts, np.arange(6), batch_size=6, shuffle=True, seed=3)
    epoch1, epoch2 = ([int(v) for v in next(iter(shuffled))[1]] for _ in range(2))
    assert sorted(epoch1) == list(range(6))  # a permutation ...
    assert epoch1 != list(range(6)) or epoch2 != list(range(6))  # ... that is shuffled
    assert epoch1 != epoch2  # and reshuffled every epoch
    only = next(iter(string_dataset(["x"], batch_size=2)))
    assert isinstance(only, tf.Tensor) and only.numpy().tolist() == [b"x"]


# ---------------------------------------------------------------------------------------------
# The classifier carries its preprocessor
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    """A two-block classifier with a preprocessor, trained one epoch on 96 real rows."""
    rows = load_labelled_texts(DEMO_DIR / "train.tsv", "comments", ["bias", "hate"])
    train, val = rows.subset(range(96)), rows.subset(range(96, 136))
    tasks = {c: sorted_labels(rows.labels[c]) for c in ("bias", "hate")}
    vocab = CharVocabulary.build(train.texts)
    config = ResICConfig(tasks=tasks, vocab_size=vocab.size, filters=(4, 4), blocks=(1, 1),
                         max_len=48, embedding_dim=4)
    keras.utils.set_random_seed(5)
    model = build_model(config, vocab)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    model.fit(train.texts, encode_labels(train, tasks), batch_size=16, epochs=1, verbose=0)
    return model, vocab, val, tasks


def test_predict_raw_strings_equals_predicting_preprocessed_ids(small):
    model, vocab, val, _ = small
    assert isinstance(model.preprocessor, ResICPreprocessor)
    assert model.preprocessor.chars == vocab.chars and model.preprocessor.max_len == 48
    texts = val.texts + ["", "😀 완전 새로운 글자들 ☃", "x" * 500]
    from_strings = model.predict(texts, batch_size=7, verbose=0)
    ids = model.preprocessor(tf.constant(texts)).numpy()
    from_ids = model.predict(ids, batch_size=7, verbose=0)
    assert set(from_strings) == set(from_ids) == set(model.output_names)
    for name in from_ids:
        assert from_strings[name].shape == (len(texts), 3)
        np.testing.assert_allclose(from_strings[name], from_ids[name], rtol=0, atol=1e-6)
    # every accepted form of raw text gives the same numbers
    for form in (np.array(texts), tuple(texts), tf.constant(texts),
                 [t.encode("utf-8") for t in texts]):
        again = model.predict(form, verbose=0)
        np.testing.assert_allclose(again["hate_lc"], from_ids["hate_lc"], rtol=0, atol=1e-6)


def test_saved_classifier_reloads_with_its_preprocessor_and_exit_metrics(small, tmp_path):
    model, vocab, val, tasks = small
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # no custom_objects
    assert type(loaded) is ResICClassifier and type(loaded.preprocessor) is ResICPreprocessor
    assert loaded.preprocessor.chars == vocab.chars and loaded.preprocessor.max_len == 48
    before = model.predict(val.texts, verbose=0)
    after = loaded.predict(val.texts, verbose=0)
    for name in before:  # identical up to float rounding (oneDNN may reorder sums)
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(after[name].argmax(-1), before[name].argmax(-1))
    # compiled again with the per-exit metrics, so `evaluate` reports them
    labels = encode_labels(val, tasks)
    result = loaded.evaluate(val.texts, labels, batch_size=16, verbose=0, return_dict=True)
    for name in loaded.output_names:
        assert f"{name}_macro_f1" in result and f"{name}_accuracy" in result
    y = labels["hate"]
    assert result["hate_lc_macro_f1"] == pytest.approx(
        macro_f1(y, after["hate_lc"].argmax(-1), 3), abs=1e-6)
    assert result["hate_lc_accuracy"] == pytest.approx(
        np.mean(after["hate_lc"].argmax(-1) == y), abs=1e-6)
    assert loaded.get_compile_config()["loss_weights"] == model.get_compile_config()["loss_weights"]


def test_model_without_preprocessor_refuses_strings():
    config = ResICConfig(tasks={"t": ["a", "b"]}, vocab_size=5, filters=(4, 4), blocks=(1, 1),
                         max_len=8, embedding_dim=2)
    model = build_model(config)
    assert model.preprocessor is None
    with pytest.raises(InvalidValueError) as info:
        model.predict(["abc"], verbose=0)
    assert str(info.value) == (
        "This model has no preprocessor, so it takes character ids, not strings; build it with "
        "`build_model(config, vocabulary)` or attach a ResICPreprocessor")
    ids = np.array([[2, 3, 4, 1, 0, 0, 0, 0]], np.int32)
    assert model.predict(ids, verbose=0)["t_lc"].shape == (1, 2)  # ids still work
    with pytest.raises(InvalidValueError) as info:
        build_model(config, ["a", "b"])
    assert str(info.value) == ("The vocabulary has 4 ids (padding and OOV included) but the "
                               "config says vocab_size=5")
    with_chars = build_model(config, ["a", "b", "c"])  # a plain list of characters is enough
    assert with_chars.preprocessor.chars == ["a", "b", "c"]
