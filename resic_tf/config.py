"""Frozen, JSON round-tripping configurations: the model (`ResICConfig`, `config.json`) and how a
run was trained (`TrainConfig`, `train_config.json`). Exit names are made here, once."""
from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any

from resic_tf.io import atomic_write_text, read_json
from resic_tf.validation import (InvalidValueError, check_choice, check_int_sequence,
                                 check_scalar)

ARCH_BLOCKS: dict[str, tuple[int, ...]] = {
    "resic18": (2, 2, 2, 2),
    "resic34": (3, 4, 6, 3),
}
LOSS_WEIGHTINGS = ("paper", "uniform")
WIDE_FUSIONS = ("features", "late")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SELECTIONS = ("best", "last")
BATCHINGS = ("auto", "by_length", "random")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTINGS = ("none", "sqrt", "balanced")
LINEAR_MIXES = ("auto", "thirds")
# What a train_config.json written before 0.4 (without these keys) trained with.
_TRAIN_BEFORE_0_4 = {"optimizer": "adam", "weight_decay": 0.0, "schedule": "constant",
                     "warmup": 0.0, "label_smoothing": 0.0, "class_weighting": "none",
                     "distillation": 0.0, "wide_loss": 0.0}
DEFAULT_FILTERS = (64, 128, 256, 512)
DEFAULT_NGRAM_HASHES = 1  # rows per n-gram in the wide branch; 2 measured in docs/RESULTS.md
NGRAM_POOLINGS = ("mean", "weighted")
EXIT_POOLINGS = ("average", "average_max")
DEFAULT_NGRAM_POOLING = "mean"
# What a config, or a run's stored model settings, written before a key existed meant by leaving
# it out: fixed length before 0.3, no wide branch before 0.4, joined features before 0.7, one
# hash and mean pooling before 0.10, exits pooling by average only, no
# nested tasks and no jamo embeddings before 0.12.
LEGACY_MODEL_SETTINGS = {"length_adaptive": False, "ngram_buckets": 0, "wide_fusion": "features",
                         "ngram_hashes": 1, "ngram_pooling": "mean", "exit_pooling": "average",
                         "nested_tasks": {}, "jamo_embedding": False, "linear_ngrams": 0}


def exit_label(index: int, num_exits: int) -> str:
    """Short name of exit `index` (0-based, shallow to deep): "ic1" .. "icN", and "lc" for the last."""
    return "lc" if index == num_exits - 1 else f"ic{index + 1}"


def exit_names(task: str, num_exits: int) -> list[str]:
    """Output names of one task, shallow to deep: `{task}_ic1` .. `{task}_icN`, `{task}_lc`.

    The one place exit names are made: the model, metrics, gate, reports and export all call it.
    """
    return [f"{task}_{exit_label(i, num_exits)}" for i in range(num_exits)]


def default_ngram_dim(tasks: Mapping[str, Any]) -> int:
    """The wide branch's width when none is given: 64, or 128 when some task has more than 64
    classes (a rank-64 wide classifier was measured short of a rank-128 one on 151 intents)."""
    return 128 if max(len(c) for c in tasks.values()) > 64 else 64


LARGE_CORPUS_ROWS = 80_000
# The wide branch's n-gram table: what a config gets by default, and, from LARGE_CORPUS_ROWS
# training rows up, what `resic train` picks instead.
SMALL_NGRAM_TABLE = {"ngram_buckets": 65_536, "ngram_rate": 10.0}
LARGE_NGRAM_TABLE = {"ngram_buckets": 262_144, "ngram_rate": 1.0}


def default_ngram_table(train_rows: int) -> dict[str, Any]:
    """The wide branch's table when `ngram_buckets` and `ngram_rate` are not given, by the number
    of training rows: 65,536 buckets at 10x the learning rate, or, from `LARGE_CORPUS_ROWS` rows
    up, 262,144 at 1x. The small fast table learns 151 intents from 100 queries each, but
    memorises 95,000 reviews within an epoch (docs/RESULTS.md, sessions 7 and 11)."""
    train_rows = check_scalar(train_rows, "train_rows", int, min_val=0)
    return dict(LARGE_NGRAM_TABLE if train_rows >= LARGE_CORPUS_ROWS else SMALL_NGRAM_TABLE)


def wide_exit_name(task: str) -> str:
    """The name of a late-fusion model's exit 0 for `task`: its wide classifier (the layer
    `{task}_wide`), which runs before the stem and every block."""
    return f"{task}_wide"


def loss_weights(tasks, num_exits: int, weighting: str = "paper") -> dict[str, float]:
    """The paper's Eq. 1: weight i/N for `{task}_ic{i}` (N internal classifiers), 1.0 for the LC;
    "uniform" weighs every exit 1.0."""
    check_choice(weighting, "loss_weighting", LOSS_WEIGHTINGS)
    n = num_exits - 1
    return {name: 1.0 if i == n or weighting == "uniform" else (i + 1) / n
            for task in tasks for i, name in enumerate(exit_names(task, num_exits))}


def _from_dict(cls, d: Mapping[str, Any]):
    """A config dataclass from a dict; unknown keys (a file from elsewhere) are refused."""
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, Mapping):
        raise InvalidValueError(f"A {cls.__name__} must be a JSON object of its fields. "
                                f"Received: {type(d).__name__}")
    unknown = sorted(set(d) - known)
    if unknown:
        raise InvalidValueError(f"Unknown {cls.__name__} keys {unknown}; known keys are "
                                f"{sorted(known)}")
    return cls(**dict(d))


def _check_nested(nested, tasks: Mapping[str, Sequence[str]]):
    """`ResICConfig.nested_tasks`, checked against the tasks and made read-only."""
    if not isinstance(nested, Mapping):
        raise InvalidValueError(f"`nested_tasks` must be a mapping. Received: "
                                f"nested_tasks={nested!r}")
    out = {}
    for coarse, spec in nested.items():
        fine = spec.get("from") if isinstance(spec, Mapping) else None
        classes = spec.get("classes") if isinstance(spec, Mapping) else None
        ok = coarse in tasks and fine in tasks and fine != coarse and \
            isinstance(classes, Sequence) and len(classes) == len(tasks[fine]) and \
            all(isinstance(c, int) and 0 <= c < len(tasks[coarse]) for c in classes)
        if not ok:
            raise InvalidValueError(
                f"`nested_tasks` needs, per coarse task, the finer task it derives from and the "
                f"coarse class id of each finer class. Received: nested_tasks[{coarse!r}]="
                f"{spec!r}")
        out[coarse] = types.MappingProxyType({"from": fine, "classes": tuple(classes)})
    for coarse in out:  # a chain must end: a task cannot derive from itself through others
        seen, task = {coarse}, out[coarse]["from"]
        while task in out:
            if task in seen:
                raise InvalidValueError(f"`nested_tasks` has a cycle through {coarse!r}. "
                                        f"Received: nested_tasks={dict(nested)!r}")
            seen.add(task)
            task = out[task]["from"]
    return types.MappingProxyType(out)


@dataclasses.dataclass(frozen=True, eq=False)
class ResICConfig:
    """Everything needed to rebuild a Res-IC model, saved as `config.json` beside every run and export.

    Args:
        tasks: ordered mapping of task (label set) name to its sorted class labels.
        vocab_size: number of character ids, padding (0) and out-of-vocabulary (1) included.
        arch: "resic18" (blocks 2,2,2,2) or "resic34" (blocks 3,4,6,3).
        filters: filters per stage; each later stage usually doubles. Defaults to 64,128,256,512.
        blocks: residual blocks per stage; defaults to the arch's. Set it only for small experiments.
        max_len: the truncation cap: characters per input at most. Defaults to 132.
        embedding_dim: character embedding size. Defaults to 64.
        dropout: dropout rate in every internal classifier. Defaults to 0.2.
        cbam_reduction: channel-attention MLP reduction ratio. Defaults to 16.
        loss_weighting: "paper" (IC i weighs i/N, LC 1) or "uniform" (all 1). Defaults to "paper".
        bn_momentum: BatchNormalization momentum. Defaults to 0.9 (Keras's 0.99 keeps inference
            statistics near their initial values for ~600 steps, longer than small runs train).
        length_adaptive: True: batches are padded to their own longest text and masked, so
            padding never influences a prediction (see `ResICBackbone`). False: every text is
            padded to `max_len` and the padding takes part, as in runs trained before 0.3 (a
            `config.json` without this key is one of those). Defaults to True.
        ngram_buckets: hash buckets of the wide branch (`NGramEmbedding`: the average embedding
            of the text's character n-grams, joined to every exit's features); 0 leaves it out,
            as in the paper's model and runs trained before 0.4. Defaults to 65536 (`resic train`
            picks it, and `ngram_rate`, by the number of training rows: `default_ngram_table`).
        ngram_dim: the wide branch's embedding width; None: `default_ngram_dim(tasks)`, 64, or
            128 when a task has more than 64 classes (the wide classifier's logits are a rank-
            `ngram_dim` product; on CLINC150's 151 intents 128 scored 0.9 points of validation
            macro-F1 more, docs/RESULTS.md). Defaults to None.
        ngram_sizes: the wide branch's n-gram lengths in characters. Defaults to 1, 2, 3, 4.
        ngram_rate: the wide branch's learning-rate multiplier (`NGramEmbedding`). Defaults to
            10.
        ngram_hashes: rows of the table each n-gram looks up and averages, 1 or 2
            (`NGramEmbedding`: with 2, n-grams sharing one row still differ by the other; a
            config without this key has 1). Defaults to 1.
        ngram_pooling: how the wide branch pools its n-grams' rows, "mean" or "weighted" (a
            learned score per bucket, `NGramEmbedding`; a config without this key has "mean").
            Defaults to DEFAULT_NGRAM_POOLING.
        wide_fusion: "late" (the wide branch has a classifier of its own, trained on its own
            loss, and every exit serves the weighted mean of its deep head's probabilities and
            the wide classifier's: `LateFusion`; `resic train` then picks each exit's share on
            the validation rows, `resic_tf.fusion`) or "features" (the n-gram embedding joined
            to every exit's features, as in 0.4-0.6; a config without this key is one of
            those). Defaults to "late".
        wide_weight: the shallow classifiers' share of every exit under late fusion: before
            training picks them (wide branch alone), or for good (with a linear branch). None:
            0.5, or 2/3 with a linear branch (deep, wide and linear classifiers in equal
            thirds). Defaults to None.
        linear_ngrams: columns of a third, linear branch (0 for none): TF-IDF of the wide
            branch's character n-grams over a vocabulary of the n-grams of the most training
            texts (`resic_tf.tfidf.TfidfNGrams`) and a logistic regression per task on them
            (`LinearHead`), fitted before the deep branch trains and then frozen; its
            probabilities and the wide classifier's are averaged into the shallow classifier
            (exit 0) that late fusion mixes into every exit, at the fixed share `wide_weight`
            (validation macro-F1 per exit picked shares 1.7 points worse than fixed ones on
            korean-hate-speech bias, docs/RESULTS.md session 16). Needs late fusion. `resic
            train` takes it as a cap and builds the model with the columns its training texts
            fill (KHS: 74,810 of 312,509 n-grams in 7,106 texts). Defaults to 0.
        exit_pooling: how every exit pools its block's steps, "average" (the paper's) or
            "average_max" (average and maximum joined, `InternalClassifier`; a config without
            this key has "average"). Defaults to "average".
        nested_tasks: `{coarse: {"from": fine, "classes": [coarse class id of each fine
            class]}}`: tasks whose probabilities are derived from a finer task's at every exit
            in inference (`resic_tf.nesting`; `resic train` finds them in the training rows).
            Defaults to none.
        jamo_embedding: every Hangul syllable's vector adds those of its three jamo
            (`resic_tf.layers.Stem`; a length-adaptive model built with its vocabulary).
            Defaults to False.
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
    length_adaptive: bool = True
    ngram_buckets: int = SMALL_NGRAM_TABLE["ngram_buckets"]
    ngram_dim: int | None = None
    ngram_sizes: tuple[int, ...] = (1, 2, 3, 4)
    ngram_rate: float = SMALL_NGRAM_TABLE["ngram_rate"]
    ngram_hashes: int = DEFAULT_NGRAM_HASHES
    ngram_pooling: str = DEFAULT_NGRAM_POOLING
    wide_fusion: str = "late"
    wide_weight: float | None = None
    exit_pooling: str = "average"
    nested_tasks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    jamo_embedding: bool = False
    linear_ngrams: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        check_choice(self.arch, "arch", sorted(ARCH_BLOCKS))
        check_choice(self.loss_weighting, "loss_weighting", LOSS_WEIGHTINGS)
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise InvalidValueError(f"`tasks` must be a non-empty mapping of task name to class "
                                    f"labels. Received: tasks={self.tasks!r}")
        tasks = {}
        for name, labels in self.tasks.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise InvalidValueError(f"Task names must be identifiers (letters, digits, '_'), "
                                        f"as they name model outputs. Received: task name {name!r}")
            labels = [str(x) for x in labels]
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise InvalidValueError(f"Task {name!r} needs at least 2 distinct class labels. "
                                        f"Received: {labels!r}")
            tasks[name] = tuple(labels)
        set_("tasks", types.MappingProxyType(tasks))  # read-only: the config is frozen
        filters = check_int_sequence(self.filters, "filters")
        blocks = ARCH_BLOCKS[self.arch] if self.blocks is None else \
            check_int_sequence(self.blocks, "blocks")
        if len(filters) != len(blocks):
            raise InvalidValueError(f"`filters` needs one value per stage ({len(blocks)} for "
                                    f"blocks={list(blocks)}). Received: filters={list(filters)}")
        if sum(blocks) < 2:
            raise InvalidValueError(f"A Res-IC model needs at least 2 residual blocks in all (one "
                                    f"IC and the LC). Received: blocks={list(blocks)}")
        set_("filters", filters)
        set_("blocks", None if self.blocks is None else blocks)
        set_("vocab_size", check_scalar(self.vocab_size, "vocab_size", int, min_val=3))
        for name in ("max_len", "embedding_dim", "cbam_reduction"):
            set_(name, check_scalar(getattr(self, name), name, int, min_val=1))
        set_("dropout", check_scalar(self.dropout, "dropout", float, min_val=0.0, max_val=1.0,
                                     include_boundaries="left"))
        set_("bn_momentum", check_scalar(self.bn_momentum, "bn_momentum", float, min_val=0.0,
                                         max_val=1.0, include_boundaries="neither"))
        set_("length_adaptive", check_scalar(self.length_adaptive, "length_adaptive", bool))
        set_("ngram_buckets", check_scalar(self.ngram_buckets, "ngram_buckets", int, min_val=0))
        set_("ngram_dim", default_ngram_dim(tasks) if self.ngram_dim is None else
             check_scalar(self.ngram_dim, "ngram_dim", int, min_val=1))
        sizes = check_int_sequence(self.ngram_sizes, "ngram_sizes")
        if len(set(sizes)) != len(sizes):
            raise InvalidValueError(f"`ngram_sizes` must be distinct. Received: "
                                    f"ngram_sizes={list(sizes)}")
        set_("ngram_sizes", sizes)
        set_("ngram_rate", check_scalar(self.ngram_rate, "ngram_rate", float, min_val=0.0,
                                        include_boundaries="neither"))
        set_("ngram_hashes", check_scalar(self.ngram_hashes, "ngram_hashes", int, min_val=1,
                                          max_val=2))
        check_choice(self.ngram_pooling, "ngram_pooling", NGRAM_POOLINGS)
        check_choice(self.wide_fusion, "wide_fusion", WIDE_FUSIONS)
        check_choice(self.exit_pooling, "exit_pooling", EXIT_POOLINGS)
        set_("nested_tasks", _check_nested(self.nested_tasks, tasks))
        set_("jamo_embedding", check_scalar(self.jamo_embedding, "jamo_embedding", bool))
        set_("linear_ngrams", check_scalar(self.linear_ngrams, "linear_ngrams", int, min_val=0))
        if self.linear_ngrams and not self.late_fusion:
            raise InvalidValueError(f"A linear branch is mixed into the exits by late fusion: it "
                                    f"needs wide_fusion='late' and ngram_buckets > 0. Received: "
                                    f"linear_ngrams={self.linear_ngrams}, wide_fusion="
                                    f"{self.wide_fusion!r}, ngram_buckets={self.ngram_buckets}")
        if self.wide_weight is None:
            set_("wide_weight", 2 / 3 if self.linear_ngrams else 0.5)
        set_("wide_weight", check_scalar(self.wide_weight, "wide_weight", float, min_val=0.0,
                                         max_val=1.0))

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

    @property
    def late_fusion(self) -> bool:
        """True when the wide branch has classifiers of its own (exit 0, `wide_exit_name`)."""
        return bool(self.ngram_buckets) and self.wide_fusion == "late"

    def exit_names(self, task: str) -> list[str]:
        """Output names of one task, shallow to deep: `{task}_ic1` .. `{task}_icN`, `{task}_lc`."""
        if task not in self.tasks:
            raise KeyError(f"Unknown task {task!r}; tasks are {list(self.tasks)}")
        return exit_names(task, self.num_exits)

    @property
    def output_names(self) -> list[str]:
        return [name for task in self.tasks for name in self.exit_names(task)]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tasks"] = {k: list(v) for k, v in self.tasks.items()}
        d["filters"] = list(self.filters)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        d["ngram_sizes"] = list(self.ngram_sizes)
        d["nested_tasks"] = {k: {"from": v["from"], "classes": list(v["classes"])}
                             for k, v in self.nested_tasks.items()}
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
        """The config of a dict; one written before 0.3 (no "length_adaptive") is fixed-length,
        one written before 0.4 (no "ngram_buckets") has no wide branch, and one written before
        0.10 (no "ngram_hashes") hashes each n-gram once."""
        if isinstance(d, Mapping):
            d = {**LEGACY_MODEL_SETTINGS, **d}
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "ResICConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "ResICConfig":
        return cls.from_dict(read_json(path))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run was trained; saved as `train_config.json` so a crashed run resumes identically.

    `batching`: "random" (and "auto", the default) draws training batches at random; a
    length-adaptive model still pads each to its own longest text. "by_length" groups rows of
    similar length into a batch: 2.3x faster training, but on korean-hate-speech it cost 5 points
    of bias macro-F1 over 3 seeds (docs/MEASURED.md), so it is opt-in. Validation, calibration,
    evaluation and prediction of a length-adaptive model always run texts by length (outputs
    do not depend on batching).

    The recipe: `optimizer` "adam" or "adamw" (decoupled `weight_decay`); `schedule` "constant"
    or "cosine" (linear warm-up over the first `warmup` share of the steps, then cosine decay to
    0); `label_smoothing` of every exit's target; `class_weighting` of every exit's loss per
    task, from the training labels ("sqrt" or "balanced", `resic_tf.losses.class_weights`);
    `distillation`, the weight of self-distillation from the LC into the internal classifiers;
    `wide_loss`, the weight of the wide branch's own classifiers' loss; `ema`, when above 0, the
    momentum of a moving average of the weights (Polyak averaging) that validation, selection
    and the saved model use while training steps go on with the raw weights.

    The wide stage (late fusion only): `wide_epochs` > 0 first trains the wide branch alone (its
    n-gram table and its classifiers, on their own cross-entropy) for that many epochs by plain
    SGD, as fastText trains, at `wide_learning_rate` decaying linearly to 0 (the table's rate
    divided by `ngram_rate` squared, so that the rate is the one the table's values see), then
    freezes it and trains the deep branch (`resic_tf.training.train_wide_stage`). 0 trains both
    together with one optimiser, as before 0.13. `linear_c`: the inverse regularisation of a
    linear branch's logistic regressions (`ResICConfig.linear_ngrams`; scikit-learn's `C`).
    `linear_mix`: how such a model's exits mix its three classifiers after training, "auto"
    (equal thirds unless the validation rows prove a fitted log-linear mix better,
    `resic_tf.fusion.choose_mix`) or "thirds" (always, as 0.13 did).

    Scale: `stream` reads the data in chunks instead of all at once (`resic_tf.streaming`:
    memory bounded by `shuffle_buffer` rows, the validation rows chosen by a hash of each row
    instead of a stratified draw); `steps_per_epoch` caps an epoch (Keras's own argument; the
    rows then repeat across epochs).
    """

    data: str
    text_col: str
    label_cols: tuple[str, ...]
    val_data: str | None = None
    val_split: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 42
    min_char_freq: int = 1
    select: str = "best"
    strategy: str = "auto"
    batching: str = "auto"
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup: float = 0.05
    label_smoothing: float = 0.0
    class_weighting: str = "sqrt"
    distillation: float = 0.0
    wide_loss: float = 0.0
    ema: float = 0.0
    wide_epochs: int = 0
    wide_learning_rate: float = 8.0
    linear_c: float = 10.0
    linear_mix: str = "auto"
    stream: bool = False
    shuffle_buffer: int = 65536
    steps_per_epoch: int | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        label_cols = (self.label_cols,) if isinstance(self.label_cols, str) else self.label_cols
        set_("label_cols", tuple(label_cols))
        if not self.label_cols:
            raise InvalidValueError("At least one label column is needed. Received: label_cols=()")
        if len(set(self.label_cols)) != len(self.label_cols) or self.text_col in self.label_cols:
            raise InvalidValueError(f"Text and label columns must be distinct. Received: "
                                    f"text_col={self.text_col!r}, label_cols={list(self.label_cols)}")
        for name in ("epochs", "batch_size", "min_char_freq"):
            set_(name, check_scalar(getattr(self, name), name, int, min_val=1))
        set_("seed", check_scalar(self.seed, "seed", int, min_val=0))
        set_("learning_rate", check_scalar(self.learning_rate, "learning_rate", float, min_val=0.0,
                                           include_boundaries="neither"))
        check_choice(self.select, "select", SELECTIONS)
        check_choice(self.strategy, "strategy", STRATEGIES)
        check_choice(self.batching, "batching", BATCHINGS)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_choice(self.class_weighting, "class_weighting", CLASS_WEIGHTINGS)
        set_("weight_decay", check_scalar(self.weight_decay, "weight_decay", float, min_val=0.0))
        for name in ("distillation", "wide_loss"):
            set_(name, check_scalar(getattr(self, name), name, float, min_val=0.0))
        set_("wide_epochs", check_scalar(self.wide_epochs, "wide_epochs", int, min_val=0))
        set_("wide_learning_rate", check_scalar(self.wide_learning_rate, "wide_learning_rate",
                                                float, min_val=0.0, include_boundaries="neither"))
        set_("linear_c", check_scalar(self.linear_c, "linear_c", float, min_val=0.0,
                                      include_boundaries="neither"))
        check_choice(self.linear_mix, "linear_mix", LINEAR_MIXES)
        set_("stream", check_scalar(self.stream, "stream", bool))
        set_("shuffle_buffer", check_scalar(self.shuffle_buffer, "shuffle_buffer", int,
                                            min_val=1))
        if self.steps_per_epoch is not None:
            set_("steps_per_epoch", check_scalar(self.steps_per_epoch, "steps_per_epoch", int,
                                                 min_val=1))
        for name in ("warmup", "label_smoothing", "ema"):
            set_(name, check_scalar(getattr(self, name), name, float, min_val=0.0, max_val=1.0,
                                    include_boundaries="left"))
        if self.val_data is None:
            set_("val_split", check_scalar(self.val_split, "val_split", float, min_val=0.0,
                                           max_val=1.0, include_boundaries="neither"))

    def groups_by_length(self, config: ResICConfig) -> bool:
        """Whether training batches are grouped by length for the model `config`."""
        return self.batching == "by_length" and config.length_adaptive

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["label_cols"] = list(self.label_cols)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The config of a dict; one written before 0.4 (no "optimizer") trained with Adam at a
        constant rate, no label smoothing and no class weights."""
        if isinstance(d, Mapping) and "optimizer" not in d:
            d = {**_TRAIN_BEFORE_0_4, **d}
        return _from_dict(cls, d)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls.from_dict(read_json(path))


# `resic train --recipe`: settings a recipe gives to the flags the user did not set. "default"
# is the configs' own defaults plus, since 0.14, the linear branch and the wide stage (the
# measured winner, docs/RESULTS.md sessions 17-18: a config built in Python keeps neither unless
# asked, since a linear branch needs its vocabulary adapted on training rows); "paper" is the
# paper's model and training.
_RECIPE_KEYS = ("ngram_buckets", "wide_fusion", "optimizer", "learning_rate", "schedule",
                "label_smoothing", "class_weighting", "wide_loss", "exit_pooling",
                "nested_tasks", "linear_ngrams", "wide_epochs")
DEFAULT_LINEAR_NGRAMS = 1_000_000  # a cap: the model keeps the columns its training rows fill
DEFAULT_WIDE_EPOCHS = 25
# The default recipe leaves the table's size to the data (`default_ngram_table`).
_DEFAULTS = {**{f.name: f.default for cls in (ResICConfig, TrainConfig)
                for f in dataclasses.fields(cls)}, "ngram_buckets": None, "nested_tasks": "auto",
             "linear_ngrams": DEFAULT_LINEAR_NGRAMS, "wide_epochs": DEFAULT_WIDE_EPOCHS}
RECIPES = {
    "default": {key: _DEFAULTS[key] for key in _RECIPE_KEYS},
    "paper": {"ngram_buckets": 0, "wide_fusion": "features", "optimizer": "adam",
              "learning_rate": 1e-3, "schedule": "constant", "label_smoothing": 0.0,
              "class_weighting": "none", "wide_loss": 0.0, "exit_pooling": "average",
              "nested_tasks": "off", "linear_ngrams": 0, "wide_epochs": 0},
}
