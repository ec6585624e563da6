"""ResICConfig and TrainConfig: derived sizes, exit names, Eq. 1 weights, JSON round trip and
argument validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from resic_tf.config import (ResICConfig, TrainConfig, exit_label, exit_names, loss_weights)
from resic_tf.validation import InvalidTypeError, InvalidValueError, UserError

TASKS = {"bias": ["gender", "none", "others"], "hate": ["hate", "none", "offensive"]}


def make(**overrides) -> ResICConfig:
    kwargs = {"tasks": TASKS, "vocab_size": 50, **overrides}
    return ResICConfig(**kwargs)


@pytest.mark.parametrize("arch, blocks, n_ics", [
    ("resic18", (2, 2, 2, 2), 7),
    ("resic34", (3, 4, 6, 3), 15),
])
def test_arch_sizes_and_exit_names(arch, blocks, n_ics):
    cfg = make(arch=arch)
    assert cfg.stage_blocks == blocks
    assert cfg.blocks is None  # the arch's blocks are not copied into the saved config
    assert cfg.num_blocks == n_ics + 1
    assert cfg.num_ics == n_ics
    assert cfg.exit_names("hate") == [f"hate_ic{i}" for i in range(1, n_ics + 1)] + ["hate_lc"]
    assert cfg.output_names == cfg.exit_names("bias") + cfg.exit_names("hate")
    with pytest.raises(KeyError, match="Unknown task 'nope'; tasks are \\['bias', 'hate'\\]"):
        cfg.exit_names("nope")


def test_blocks_override_and_label_normalisation():
    cfg = ResICConfig(tasks={"t": [0, 1, 10]}, vocab_size=3, filters=[4, 8], blocks=[1, 1])
    assert cfg.tasks == {"t": ("0", "1", "10")}  # labels are strings, order kept
    assert cfg.filters == (4, 8) and cfg.blocks == (1, 1)
    assert cfg.num_ics == 1 and cfg.exit_names("t") == ["t_ic1", "t_lc"]


@pytest.mark.parametrize("overrides", [
    {},
    {"arch": "resic34", "filters": (4, 8, 8, 16), "max_len": 40, "embedding_dim": 3,
     "dropout": 0.5, "cbam_reduction": 2, "loss_weighting": "uniform"},
    {"filters": (4, 8), "blocks": (1, 3), "dropout": 0},
])
def test_json_round_trip(overrides, tmp_path):
    cfg = make(**overrides)
    text = cfg.to_json()
    again = ResICConfig.from_json(text)
    assert again == cfg
    assert json.dumps(json.loads(again.to_json()), sort_keys=True) == \
        json.dumps(json.loads(text), sort_keys=True)
    cfg.save(tmp_path / "config.json")
    assert ResICConfig.load(tmp_path / "config.json") == cfg
    # Every field is in the JSON, so nothing falls back to a default that could change later.
    assert set(json.loads(text)) == {"tasks", "vocab_size", "arch", "filters", "blocks",
                                     "max_len", "embedding_dim", "dropout", "cbam_reduction",
                                     "loss_weighting", "bn_momentum", "length_adaptive",
                                     "ngram_buckets", "ngram_dim", "ngram_sizes", "ngram_rate",
                                     "ngram_hashes", "ngram_pooling", "wide_fusion",
                                     "wide_weight", "exit_pooling", "linear_ngrams",
                                     "nested_tasks", "jamo_embedding"}


def test_json_keeps_korean_labels_readable():
    cfg = ResICConfig(tasks={"t": ["혐오", "없음"]}, vocab_size=10)
    assert '"혐오"' in cfg.to_json()
    assert ResICConfig.from_json(cfg.to_json()).tasks == {"t": ("혐오", "없음")}


def test_config_is_frozen():
    cfg = make()
    with pytest.raises(AttributeError):
        cfg.arch = "resic34"


INTEGER = "must be an integer. Received: "
HOLD = "must hold integers. Received: "


@pytest.mark.parametrize("overrides, error, match", [
    ({"arch": "resic50"}, ValueError,
     r"`arch` must be one of \['resic18', 'resic34'\]. Received: arch='resic50'"),
    ({"loss_weighting": "linear"}, ValueError,
     r"`loss_weighting` must be one of \['paper', 'uniform'\]. Received: loss_weighting='linear'"),
    ({"filters": (8, 8, 8)}, ValueError,
     r"`filters` needs one value per stage \(4 for blocks=\[2, 2, 2, 2\]\). "
     r"Received: filters=\[8, 8, 8\]"),
    ({"arch": "resic34", "filters": (8, 8)}, ValueError,
     r"\(4 for blocks=\[3, 4, 6, 3\]\)"),
    ({"blocks": (1, 1)}, ValueError, r"needs one value per stage \(2 for blocks=\[1, 1\]\)"),
    ({"filters": (8,), "blocks": (1,)}, ValueError,
     r"at least 2 residual blocks in all .* Received: blocks=\[1\]"),
    ({"filters": (8, 8), "blocks": (0, 2)}, ValueError,
     r"^`blocks` must hold integers >= 1. Received: blocks=\[0, 2\]$"),
    ({"filters": (8, 0, 8, 8)}, ValueError,
     r"^`filters` must hold integers >= 1. Received: filters=\[8, 0, 8, 8\]$"),
    ({"filters": (8, -3, 8, 8)}, ValueError,
     r"^`filters` must hold integers >= 1. Received: filters=\[8, -3, 8, 8\]$"),
    ({"filters": (8, True, 8, 8)}, TypeError, rf"^`filters` {HOLD}filters=\[8, True, 8, 8\]$"),
    ({"filters": (8, "64", 8, 8)}, TypeError, rf"^`filters` {HOLD}filters=\[8, '64', 8, 8\]$"),
    ({"filters": (8, 2.5, 8, 8)}, TypeError, rf"^`filters` {HOLD}filters=\[8, 2.5, 8, 8\]$"),
    ({"filters": (8, None, 8, 8)}, TypeError, r"Received: filters=\[8, None, 8, 8\]"),
    ({"filters": "64"}, TypeError,
     r"^`filters` must be a sequence of integers. Received: filters='64'$"),
    ({"filters": ()}, ValueError, r"^`filters` must not be empty. Received: filters=\(\)$"),
    ({"vocab_size": 2}, ValueError, r"^`vocab_size` must be >= 3. Received: vocab_size=2$"),
    ({"vocab_size": "50"}, TypeError, f"^`vocab_size` {INTEGER}vocab_size='50'$"),
    ({"vocab_size": True}, TypeError, r"Received: vocab_size=True"),
    ({"max_len": 0}, ValueError, r"^`max_len` must be >= 1. Received: max_len=0$"),
    ({"max_len": 132.0}, TypeError, f"^`max_len` {INTEGER}max_len=132.0$"),
    ({"embedding_dim": 0}, ValueError,
     r"^`embedding_dim` must be >= 1. Received: embedding_dim=0$"),
    ({"cbam_reduction": False}, TypeError, r"Received: cbam_reduction=False"),
    ({"dropout": 1.0}, ValueError, r"^`dropout` must be in \[0, 1\). Received: dropout=1.0$"),
    ({"dropout": -0.1}, ValueError, r"Received: dropout=-0.1"),
    ({"dropout": "0.2"}, TypeError, r"^`dropout` must be a number. Received: dropout='0.2'$"),
    ({"dropout": True}, TypeError, r"Received: dropout=True"),
    ({"dropout": float("nan")}, ValueError,
     r"^`dropout` must be a number, not NaN. Received: dropout=nan$"),
    ({"bn_momentum": 1.0}, ValueError,
     r"^`bn_momentum` must be in \(0, 1\). Received: bn_momentum=1.0$"),
    ({"bn_momentum": 0}, ValueError,
     r"^`bn_momentum` must be in \(0, 1\). Received: bn_momentum=0.0$"),
    ({"tasks": {}}, ValueError, r"`tasks` must be a non-empty mapping"),
    ({"tasks": [("hate", ["a", "b"])]}, ValueError, r"`tasks` must be a non-empty mapping"),
    ({"tasks": {"hate-speech": ["a", "b"]}}, ValueError,
     r"Task names must be identifiers .* Received: task name 'hate-speech'"),
    ({"tasks": {"hate": ["a"]}}, ValueError,
     r"Task 'hate' needs at least 2 distinct class labels. Received: \['a'\]"),
    ({"tasks": {"hate": ["a", "a"]}}, ValueError, r"Received: \['a', 'a'\]"),
])
def test_invalid_arguments(overrides, error, match):
    with pytest.raises(error, match=match) as info:
        make(**overrides)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys():
    d = make().to_dict()
    d["colour"] = "blue"
    d["depth"] = 3
    with pytest.raises(ValueError, match=r"Unknown ResICConfig keys \['colour', 'depth'\]; "
                                         r"known keys are \['arch', 'blocks', "):
        ResICConfig.from_dict(d)


def test_from_json_validates_like_the_constructor():
    d = make().to_dict()
    d["filters"] = [8, 8]
    with pytest.raises(ValueError, match="`filters` needs one value per stage"):
        ResICConfig.from_json(json.dumps(d))


def test_tasks_are_read_only_and_their_order_counts():
    a = ResICConfig(tasks={"x": ["1", "2"], "y": ["a", "b"]}, vocab_size=5)
    b = ResICConfig(tasks={"y": ["a", "b"], "x": ["1", "2"]}, vocab_size=5)
    assert a != b  # task order orders the outputs
    assert list(ResICConfig.from_json(a.to_json()).tasks) == ["x", "y"]
    assert a == ResICConfig.from_json(a.to_json())
    assert hash(a) == hash(ResICConfig.from_json(a.to_json()))
    with pytest.raises(TypeError):
        a.tasks["z"] = ("p", "q")


# ---------------------------------------------------------------------------------------------
# Exit names and the paper's Eq. 1, made in one place
# ---------------------------------------------------------------------------------------------

def test_exit_label_and_exit_names():
    assert [exit_label(i, 4) for i in range(4)] == ["ic1", "ic2", "ic3", "lc"]
    assert exit_label(0, 2) == "ic1" and exit_label(1, 2) == "lc"
    assert exit_names("hate", 3) == ["hate_ic1", "hate_ic2", "hate_lc"]
    cfg = make(arch="resic34")
    assert cfg.exit_names("bias") == exit_names("bias", 16)


def test_loss_weights_follow_eq_1():
    # N = 3 internal classifiers: ic_i weighs i/3, the LC 1
    assert loss_weights(["a", "b"], 4) == {
        "a_ic1": 1 / 3, "a_ic2": 2 / 3, "a_ic3": 1.0, "a_lc": 1.0,
        "b_ic1": 1 / 3, "b_ic2": 2 / 3, "b_ic3": 1.0, "b_lc": 1.0}
    assert loss_weights({"t": None}, 2) == {"t_ic1": 1.0, "t_lc": 1.0}  # N = 1: i/N = 1
    assert loss_weights(["t"], 3, "uniform") == {"t_ic1": 1.0, "t_ic2": 1.0, "t_lc": 1.0}
    with pytest.raises(InvalidValueError, match=r"^`loss_weighting` must be one of \['paper', "
                                                r"'uniform'\]. Received: loss_weighting='x'$"):
        loss_weights(["t"], 3, "x")


# ---------------------------------------------------------------------------------------------
# TrainConfig (moved here from resic_tf.training)
# ---------------------------------------------------------------------------------------------

def small_tc(data: Path, **overrides) -> TrainConfig:
    kwargs = {"data": str(data), "text_col": "comments", "label_cols": ("bias", "hate"),
              "val_split": 0.25, "epochs": 1, "batch_size": 16, "seed": 7, **overrides}
    return TrainConfig(**kwargs)


@pytest.mark.parametrize("overrides, match", [
    ({"label_cols": ()}, r"^At least one label column is needed. Received: label_cols=\(\)$"),
    ({"label_cols": ("hate", "hate")}, "Text and label columns must be distinct"),
    ({"label_cols": ("comments",)}, r"^Text and label columns must be distinct. Received: "
                                    r"text_col='comments', label_cols=\['comments'\]$"),
    ({"epochs": 0}, r"^`epochs` must be >= 1. Received: epochs=0$"),
    ({"min_char_freq": 0}, r"^`min_char_freq` must be >= 1. Received: min_char_freq=0$"),
    ({"seed": -1}, r"^`seed` must be >= 0. Received: seed=-1$"),
    ({"learning_rate": 0.0}, r"^`learning_rate` must be > 0. Received: learning_rate=0.0$"),
    ({"select": "worst"}, r"`select` must be one of \['best', 'last'\]. Received: select='worst'"),
    ({"strategy": "tpu"}, r"`strategy` must be one of \['auto', 'default', 'mirrored', "
                          r"'multiworker'\]. Received: strategy='tpu'"),
    ({"val_split": 0.0}, r"^`val_split` must be in \(0, 1\). Received: val_split=0.0$"),
    ({"ema": 1.0}, r"^`ema` must be in \[0, 1\). Received: ema=1.0$"),
])
def test_train_config_validation(overrides, match):
    with pytest.raises(InvalidValueError, match=match):
        small_tc(Path("x.tsv"), **overrides)


@pytest.mark.parametrize("overrides, match", [
    ({"batch_size": True}, r"^`batch_size` must be an integer. Received: batch_size=True$"),
    ({"batch_size": 2.5}, r"^`batch_size` must be an integer. Received: batch_size=2.5$"),
    ({"epochs": "3"}, r"^`epochs` must be an integer. Received: epochs='3'$"),
    ({"learning_rate": "0.1"}, r"^`learning_rate` must be a number. Received: "
                               r"learning_rate='0.1'$"),
])
def test_train_config_type_errors(overrides, match):
    with pytest.raises(InvalidTypeError, match=match):
        small_tc(Path("x.tsv"), **overrides)


def test_train_config_round_trip(tmp_path):
    tc = small_tc(Path("x.tsv"), val_data="dev.tsv", select="last")
    again = TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict())))
    assert again == tc and again.label_cols == ("bias", "hate")
    tc.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == tc
    # a single label column may be given as a string; val_split is not checked with val_data
    assert small_tc(Path("x.tsv"), label_cols="hate").label_cols == ("hate",)
    assert small_tc(Path("x.tsv"), val_data="dev.tsv", val_split=0.0).val_split == 0.0
    with pytest.raises(ValueError, match=r"Unknown TrainConfig keys \['colour'\]"):
        TrainConfig.from_dict({**tc.to_dict(), "colour": "blue"})


def test_truncated_config_files_raise_one_line_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "tasks": {\n', encoding="utf-8")
    with pytest.raises(InvalidValueError) as info:
        ResICConfig.load(path)
    assert str(info.value) == (f"{path}: not valid JSON (Expecting property name enclosed in "
                               "double quotes at line 3, column 1); the file is truncated or "
                               "corrupt")
    path = tmp_path / "train_config.json"
    path.write_text('{"data": "x.tsv", "text_col"', encoding="utf-8")
    with pytest.raises(InvalidValueError) as info:
        TrainConfig.load(path)
    assert str(info.value) == (f"{path}: not valid JSON (Expecting ':' delimiter at line 1, "
                               "column 29); the file is truncated or corrupt")


def test_linear_branch_settings():
    """`wide_weight` left out: 0.5 (chosen again per exit after training), or the fixed thirds
    2/3 with a linear branch; a linear branch needs late fusion, and an old config has none."""
    assert make().wide_weight == 0.5 and make().linear_ngrams == 0
    cfg = make(linear_ngrams=1000)
    assert cfg.wide_weight == pytest.approx(2 / 3)
    assert ResICConfig.from_json(cfg.to_json()) == cfg
    assert make(linear_ngrams=1000, wide_weight=0.5).wide_weight == 0.5
    with pytest.raises(InvalidValueError, match=r"needs wide_fusion='late' and ngram_buckets > "
                                                r"0. Received: linear_ngrams=1000, "
                                                r"wide_fusion='features'"):
        make(linear_ngrams=1000, wide_fusion="features")
    with pytest.raises(InvalidValueError, match="ngram_buckets=0"):
        make(linear_ngrams=1000, ngram_buckets=0)
    with pytest.raises(InvalidValueError, match="linear_ngrams"):
        make(linear_ngrams=-1)
    legacy = {k: v for k, v in make().to_dict().items() if k != "linear_ngrams"}
    assert ResICConfig.from_dict(legacy).linear_ngrams == 0
    with pytest.raises(InvalidValueError, match="linear_c"):
        TrainConfig(data="x", text_col="t", label_cols=("a",), linear_c=0.0)
