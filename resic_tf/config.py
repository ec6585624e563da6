"""Frozen, JSON round-tripping configuration of a Res-IC model."""
from __future__ import annotations

import dataclasses
import json
import numbers
import types
from collections.abc import Mapping, Sequence
from typing import Any

ARCH_BLOCKS: dict[str, tuple[int, ...]] = {
    "resic18": (2, 2, 2, 2),
    "resic34": (3, 4, 6, 3),
}
LOSS_WEIGHTINGS = ("paper", "uniform")
DEFAULT_FILTERS = (64, 128, 256, 512)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class ResICConfig:
    """Everything needed to rebuild a Res-IC model, saved as `config.json` beside every run and export.

    Args:
        tasks: ordered mapping of task (label set) name to its sorted class labels.
        vocab_size: number of character ids, padding (0) and out-of-vocabulary (1) included.
        arch: "resic18" (blocks 2,2,2,2) or "resic34" (blocks 3,4,6,3).
        filters: filters per stage; each later stage usually doubles. Defaults to 64,128,256,512.
        blocks: residual blocks per stage; defaults to the arch's. Set it only for small experiments.
        max_len: characters per input; longer texts are truncated, shorter padded. Defaults to 132.
        embedding_dim: character embedding size. Defaults to 64.
        dropout: dropout rate in every internal classifier. Defaults to 0.2.
        cbam_reduction: channel-attention MLP reduction ratio. Defaults to 16.
        loss_weighting: "paper" (IC i weighs i/N, LC 1) or "uniform" (all 1). Defaults to "paper".
        bn_momentum: BatchNormalization momentum. Defaults to 0.9 (Keras's 0.99 keeps inference
            statistics near their initial values for ~600 steps, longer than small runs train).
    """

    tasks: Mapping[str, Sequence[str]]
    vocab_size: int
    arch: str = "resic18"
    filters: tuple[int, ...] = DEFAULT_FILTERS
    blocks: tuple[int, ...] | None = None
    max_len: int = 132
    embedding_dim: int = 64
    dropout: float = 0.2
    cbam_reduction: int = 16
    loss_weighting: str = "paper"
    bn_momentum: float = 0.9

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.arch not in ARCH_BLOCKS:
            raise ValueError(
                f"`arch` must be one of {sorted(ARCH_BLOCKS)}. Received: arch={self.arch!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"`loss_weighting` must be one of {list(LOSS_WEIGHTINGS)}. "
                             f"Received: loss_weighting={self.loss_weighting!r}")
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError(f"`tasks` must be a non-empty mapping of task name to class labels. "
                             f"Received: tasks={self.tasks!r}")
        tasks = {}
        for name, labels in self.tasks.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"Task names must be identifiers (letters, digits, '_'), as they "
                                 f"name model outputs. Received: task name {name!r}")
            labels = [str(x) for x in labels]
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"Task {name!r} needs at least 2 distinct class labels. "
                                 f"Received: {labels!r}")
            tasks[name] = tuple(labels)
        set_("tasks", types.MappingProxyType(tasks))  # read-only: the config is frozen
        filters = tuple(self.filters)
        for f in filters:
            _check_int("filters", f, 1)
        blocks = ARCH_BLOCKS[self.arch] if self.blocks is None else tuple(self.blocks)
        for b in blocks:
            _check_int("blocks", b, 1)
        if len(filters) != len(blocks):
            raise ValueError(f"`filters` needs one value per stage ({len(blocks)} for "
                             f"blocks={list(blocks)}). Received: filters={list(filters)}")
        if sum(blocks) < 2:
            raise ValueError(f"A Res-IC model needs at least 2 residual blocks in all (one IC and "
                             f"the LC). Received: blocks={list(blocks)}")
        set_("filters", filters)
        set_("blocks", None if self.blocks is None else blocks)
        _check_int("vocab_size", self.vocab_size, 3)
        _check_int("max_len", self.max_len, 1)
        _check_int("embedding_dim", self.embedding_dim, 1)
        _check_int("cbam_reduction", self.cbam_reduction, 1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"`dropout` must be a number in [0, 1). "
                            f"Received: dropout={self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={self.dropout!r}")
        set_("dropout", float(self.dropout))
        if isinstance(self.bn_momentum, bool) or not isinstance(self.bn_momentum, numbers.Real):
            raise TypeError(f"`bn_momentum` must be a number in (0, 1). "
                            f"Received: bn_momentum={self.bn_momentum!r}")
        if not 0.0 < float(self.bn_momentum) < 1.0:
            raise ValueError(f"`bn_momentum` must be in (0, 1). "
                             f"Received: bn_momentum={self.bn_momentum!r}")
        set_("bn_momentum", float(self.bn_momentum))

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        return ARCH_BLOCKS[self.arch] if self.blocks is None else self.blocks

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_blocks)

    @property
    def num_ics(self) -> int:
        """N: internal classifiers per task; the last block feeds the LC instead."""
        return self.num_blocks - 1

    @property
    def num_exits(self) -> int:
        return self.num_blocks

    def exit_names(self, task: str) -> list[str]:
        """Output names of one task, shallow to deep: `{task}_ic1` .. `{task}_icN`, `{task}_lc`."""
        if task not in self.tasks:
            raise KeyError(f"Unknown task {task!r}; tasks are {list(self.tasks)}")
        return [f"{task}_ic{i}" for i in range(1, self.num_ics + 1)] + [f"{task}_lc"]

    @property
    def output_names(self) -> list[str]:
        return [name for task in self.tasks for name in self.exit_names(task)]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tasks"] = {k: list(v) for k, v in self.tasks.items()}
        d["filters"] = list(self.filters)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def _key(self) -> str:
        """Task order matters (it orders the outputs), so compare the ordered JSON form."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def __eq__(self, other) -> bool:
        return isinstance(other, ResICConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResICConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ResICConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> "ResICConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        from resic_tf.io import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "ResICConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())
