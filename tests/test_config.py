"""ResICConfig: derived sizes, JSON round trip and argument validation."""
from __future__ import annotations

import json

import pytest

from resic_tf.config import ResICConfig

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
                                     "loss_weighting", "bn_momentum"}


def test_json_keeps_korean_labels_readable():
    cfg = ResICConfig(tasks={"t": ["혐오", "없음"]}, vocab_size=10)
    assert '"혐오"' in cfg.to_json()
    assert ResICConfig.from_json(cfg.to_json()).tasks == {"t": ("혐오", "없음")}


def test_config_is_frozen():
    cfg = make()
    with pytest.raises(AttributeError):
        cfg.arch = "resic34"


INTEGER = "must be an integer. Received: "


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
     r"`blocks` must be >= 1. Received: blocks=0"),
    ({"filters": (8, 0, 8, 8)}, ValueError, r"`filters` must be >= 1. Received: filters=0"),
    ({"filters": (8, -3, 8, 8)}, ValueError, r"`filters` must be >= 1. Received: filters=-3"),
    ({"filters": (8, True, 8, 8)}, TypeError, f"`filters` {INTEGER}filters=True"),
    ({"filters": (8, "64", 8, 8)}, TypeError, f"`filters` {INTEGER}filters='64'"),
    ({"filters": (8, 2.5, 8, 8)}, TypeError, f"`filters` {INTEGER}filters=2.5"),
    ({"filters": (8, None, 8, 8)}, TypeError, r"Received: filters=None"),
    ({"vocab_size": 2}, ValueError, r"`vocab_size` must be >= 3. Received: vocab_size=2"),
    ({"vocab_size": "50"}, TypeError, f"`vocab_size` {INTEGER}vocab_size='50'"),
    ({"vocab_size": True}, TypeError, r"Received: vocab_size=True"),
    ({"max_len": 0}, ValueError, r"`max_len` must be >= 1. Received: max_len=0"),
    ({"max_len": 132.0}, TypeError, f"`max_len` {INTEGER}max_len=132.0"),
    ({"embedding_dim": 0}, ValueError, r"`embedding_dim` must be >= 1. Received: embedding_dim=0"),
    ({"cbam_reduction": False}, TypeError, r"Received: cbam_reduction=False"),
    ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\). Received: dropout=1.0"),
    ({"dropout": -0.1}, ValueError, r"Received: dropout=-0.1"),
    ({"dropout": "0.2"}, TypeError,
     r"`dropout` must be a number in \[0, 1\). Received: dropout='0.2'"),
    ({"dropout": True}, TypeError, r"Received: dropout=True"),
    ({"tasks": {}}, ValueError, r"`tasks` must be a non-empty mapping"),
    ({"tasks": [("hate", ["a", "b"])]}, ValueError, r"`tasks` must be a non-empty mapping"),
    ({"tasks": {"hate-speech": ["a", "b"]}}, ValueError,
     r"Task names must be identifiers .* Received: task name 'hate-speech'"),
    ({"tasks": {"hate": ["a"]}}, ValueError,
     r"Task 'hate' needs at least 2 distinct class labels. Received: \['a'\]"),
    ({"tasks": {"hate": ["a", "a"]}}, ValueError, r"Received: \['a', 'a'\]"),
])
def test_invalid_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        make(**overrides)


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
