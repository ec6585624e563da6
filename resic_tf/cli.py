"""The `resic` command line: train, calibrate, evaluate, export, predict, analyze, baselines,
demo.

Only argparse and the settings' constants load before a command runs, so `resic --help` answers
at once; each command imports TensorFlow (through the modules it uses) when it starts. A user
mistake (`UserError`, a missing or existing file) prints one line and exits 2; anything else is a
bug and keeps its traceback. `--debug` shows the traceback for user mistakes too.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

from resic_tf.config import (ARCH_BLOCKS, BATCHINGS, CLASS_WEIGHTINGS, DEFAULT_FILTERS,
                             DEFAULT_NGRAM_HASHES, DEFAULT_NGRAM_POOLING, EXIT_POOLINGS,
                             LARGE_CORPUS_ROWS, LINEAR_MIXES, LOSS_WEIGHTINGS, NGRAM_POOLINGS,
                             OPTIMIZERS, RECIPES, SCHEDULES, SELECTIONS, STRATEGIES,
                             WIDE_FUSIONS)
from resic_tf.gate import DEFAULT_MIN_SUPPORT
from resic_tf.metrics import METRICS
from resic_tf.policies import DEFAULT_BUDGET, POLICIES
from resic_tf.validation import UserError

DEMO_DIR = Path(__file__).parent / "demo_data" / "korean_hate_speech"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def add_train_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=argparse.RawTextHelpFormatter,
        help="train a Res-IC model with model.fit into a run directory",
        description="Train a Res-IC model; re-run the same command after a crash to resume.\n\n"
        "Example:\n  resic train --data train.tsv --val-split 0.1 --text-col comments \\\n"
        "    --label-cols bias,hate --arch resic18 --epochs 10 --batch-size 128 --out runs/kh")
    p.add_argument("--data", required=True, help="training file (.csv, .tsv, .jsonl, .parquet)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", help="validation file with the same columns (default: hold "
                     "out --val-split of --data)")
    val.add_argument("--val-split", type=float, default=0.1,
                     help="share of --data held out for validation, stratified by the first "
                     "label column (default %(default)s)")
    p.add_argument("--text-col", required=True, help="name of the text column")
    p.add_argument("--label-cols", required=True, type=_str_list,
                   help="comma-separated label columns, one task (label set) each")
    p.add_argument("--arch", default="resic18", choices=sorted(ARCH_BLOCKS),
                   help="resic18: blocks 2,2,2,2 (7 ICs + LC); resic34: 3,4,6,3 (15 ICs + LC)")
    p.add_argument("--filters", type=_int_list, default=DEFAULT_FILTERS,
                   help="filters per stage (default %s)" % ",".join(map(str, DEFAULT_FILTERS)))
    p.add_argument("--blocks", type=_int_list, default=None,
                   help="blocks per stage, overriding the arch (small experiments)")
    p.add_argument("--max-len", type=int, default=132,
                   help="characters per text at most; longer texts are cut (default %(default)s)")
    p.add_argument("--fixed-length", action="store_true",
                   help="pad every text to --max-len and let the padding take part, as runs "
                   "before 0.3 did (default: length-adaptive, each batch padded to its longest "
                   "text and masked)")
    p.add_argument("--embedding-dim", type=int, default=64,
                   help="character embedding width (default %(default)s)")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="dropout in every internal classifier, in [0, 1) (default %(default)s)")
    p.add_argument("--loss-weighting", default="paper", choices=LOSS_WEIGHTINGS,
                   help="paper: IC i weighs i/N and the LC 1 (Eq. 1); uniform: every exit 1")
    p.add_argument("--bn-momentum", type=float, default=0.9,
                   help="BatchNormalization momentum (default 0.9; Keras's own is 0.99)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (recipe's: %s)"
                   % "/".join(str(r["learning_rate"]) for r in RECIPES.values()))
    p.add_argument("--min-char-freq", type=int, default=1,
                   help="characters seen fewer times in training become out-of-vocabulary "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the split, the shuffling and the weights (default %(default)s)")
    p.add_argument("--select", default="best", choices=SELECTIONS,
                   help="keep the epoch with the best mean LC macro-F1 (default) or the last")
    p.add_argument("--batching", default="auto", choices=BATCHINGS,
                   help="random / auto (default): random training batches, each padded to its "
                   "longest text; by_length: batches of similar lengths, ~2.3x faster training "
                   "but less accurate on some data (docs/MEASURED.md)")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="default: the measured recipe (wide n-gram branch trained first by SGD, "
                   "linear TF-IDF branch, AdamW, warm-up + cosine); paper: the paper's model "
                   "and Adam at a constant rate. Flags below override it")
    p.add_argument("--ngram-buckets", type=int, default=None,
                   help="hash buckets of the wide n-gram branch, 0 for none (default: 65536, or "
                   "262144 from %d training rows; paper recipe: 0)" % LARGE_CORPUS_ROWS)
    p.add_argument("--ngram-dim", type=int, default=None,
                   help="the wide branch's embedding width (default 64, or 128 when a task has "
                   "more than 64 classes)")
    p.add_argument("--ngram-sizes", type=_int_list, default=(1, 2, 3, 4),
                   help="the wide branch's n-gram lengths (default 1,2,3,4)")
    p.add_argument("--ngram-rate", type=float, default=None,
                   help="the wide branch's learning-rate multiplier (default: 10, or 1 from %d "
                   "training rows)" % LARGE_CORPUS_ROWS)
    p.add_argument("--ngram-hashes", type=int, default=DEFAULT_NGRAM_HASHES, choices=(1, 2),
                   help="rows of the table each n-gram looks up (default %(default)s)")
    p.add_argument("--ngram-pooling", default=DEFAULT_NGRAM_POOLING, choices=NGRAM_POOLINGS,
                   help="mean, or weighted by a learned score per n-gram (default %(default)s)")
    p.add_argument("--wide-fusion", default=None, choices=WIDE_FUSIONS,
                   help="features: the n-gram embedding joins every exit's features; late: the "
                   "wide branch has its own classifier, trained on its own loss, averaged into "
                   "every exit's probabilities (recipe's)")
    p.add_argument("--exit-pooling", default=None, choices=EXIT_POOLINGS,
                   help="every exit's pooling: average (the paper's) or average_max (average "
                   "and maximum joined) (recipe's)")
    p.add_argument("--jamo-embedding", action="store_true",
                   help="every Hangul syllable's vector adds those of its three jamo")
    p.add_argument("--nested-tasks", default=None, choices=("auto", "off"),
                   help="auto: a task whose classes each hold whole classes of a finer task "
                   "(domain and intent) is predicted from the finer task's probabilities "
                   "(recipe's)")
    p.add_argument("--wide-weight", type=float, default=None,
                   help="the shallow classifiers' share of every exit under late fusion "
                   "(default 0.5, chosen per exit on the validation rows after training; with "
                   "--linear-ngrams 2/3, fixed)")
    p.add_argument("--linear-ngrams", type=int, default=None,
                   help="a third, linear branch: TF-IDF over a vocabulary of at most this many "
                   "character n-grams and a logistic regression per task, fitted before the "
                   "deep branch and mixed into every exit; 0: none (recipe's: %s)"
                   % "/".join(str(r["linear_ngrams"]) for r in RECIPES.values()))
    p.add_argument("--linear-c", type=float, default=10.0,
                   help="the linear branch's inverse regularisation C (default %(default)s)")
    p.add_argument("--linear-mix", default="auto", choices=LINEAR_MIXES,
                   help="how every exit mixes the deep, wide and linear classifiers: auto "
                   "(equal thirds unless the validation rows prove a fitted log-linear mix "
                   "better) or thirds (default %(default)s)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="(recipe's)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay (default %(default)s)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="constant, or cosine: linear warm-up then cosine decay (recipe's)")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="share of the steps the cosine schedule warms up (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=None, help="(recipe's)")
    p.add_argument("--class-weighting", default=None, choices=CLASS_WEIGHTINGS,
                   help="per-class loss weights from the training labels (recipe's)")
    p.add_argument("--distillation", type=float, default=0.0,
                   help="weight of self-distillation from the LC into the internal classifiers "
                   "(default %(default)s)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="momentum of a moving average of the weights that validation, selection "
                   "and the saved model use; 0: none (default %(default)s)")
    p.add_argument("--wide-loss", type=float, default=None,
                   help="weight of the wide branch's own classifiers' loss (recipe's)")
    p.add_argument("--wide-epochs", type=int, default=None,
                   help="late fusion: first train the wide branch alone this many epochs by "
                   "SGD, as fastText trains, then freeze it; 0: train both together "
                   "(recipe's: %s)" % "/".join(str(r["wide_epochs"]) for r in RECIPES.values()))
    p.add_argument("--wide-learning-rate", type=float, default=8.0,
                   help="the wide stage's SGD rate, decaying linearly to 0 (default "
                   "%(default)s)")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="read --data in chunks, never whole: memory bounded by --shuffle-buffer "
                   "rows, validation rows chosen by a hash of each row (auto: on for files over "
                   "1 GB)")
    p.add_argument("--shuffle-buffer", type=int, default=65536,
                   help="rows in the shuffle buffer of a streamed run (default %(default)s)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="batches per epoch (Keras's steps_per_epoch; default: the whole data)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="tf.distribute strategy; auto uses TF_CONFIG / several GPUs when present")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true",
                   help="no Keras progress bar (the one-line epoch summaries stay)")
    p.set_defaults(func=run_train)


STREAM_AUTO_BYTES = 1 << 30


def _streams(args) -> bool:
    """`--stream`: on, off, or (auto) on for a training file over 1 GB."""
    if args.stream != "auto":
        return args.stream == "on"
    try:
        big = os.path.getsize(args.data) > STREAM_AUTO_BYTES
    except OSError:
        return False  # the reader names the missing file
    if big:
        print(f"{args.data} is over 1 GB: streaming it (--stream off to read it whole)")
    return big


def run_train(args) -> int:
    from resic_tf.config import TrainConfig
    from resic_tf.training import train
    given = {key for key in RECIPES[args.recipe] if getattr(args, key) is not None}
    for key, value in RECIPES[args.recipe].items():
        if key not in given:
            setattr(args, key, value)
    if args.wide_fusion != "late" or args.ngram_buckets == 0:
        # the linear branch and the wide stage need late fusion's wide branch: a recipe gives
        # them only with it (asked for by name without it, the config says why not)
        for key in {"linear_ngrams", "wide_epochs"} - given:
            setattr(args, key, 0)
    stream = _streams(args)
    if stream and "linear_ngrams" not in given:
        # the linear branch's fit holds every training row's TF-IDF in memory: a streamed run
        # (memory bounded by --shuffle-buffer) gets it only when asked for by name
        args.linear_ngrams = 0
    tc = TrainConfig(data=args.data, val_data=args.val_data, val_split=args.val_split,
                     text_col=args.text_col, label_cols=args.label_cols, epochs=args.epochs,
                     batch_size=args.batch_size, learning_rate=args.learning_rate,
                     seed=args.seed, min_char_freq=args.min_char_freq, select=args.select,
                     strategy=args.strategy, batching=args.batching, optimizer=args.optimizer,
                     weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup,
                     label_smoothing=args.label_smoothing,
                     class_weighting=args.class_weighting, distillation=args.distillation,
                     wide_loss=args.wide_loss, ema=args.ema, wide_epochs=args.wide_epochs,
                     wide_learning_rate=args.wide_learning_rate, linear_c=args.linear_c,
                     linear_mix=args.linear_mix,
                     stream=stream,
                     shuffle_buffer=args.shuffle_buffer, steps_per_epoch=args.steps_per_epoch)
    model_kwargs = {"arch": args.arch, "filters": list(args.filters),
                    "blocks": None if args.blocks is None else list(args.blocks),
                    "max_len": args.max_len, "embedding_dim": args.embedding_dim,
                    "dropout": args.dropout, "loss_weighting": args.loss_weighting,
                    "bn_momentum": args.bn_momentum,
                    "length_adaptive": not args.fixed_length,
                    "ngram_buckets": args.ngram_buckets, "ngram_dim": args.ngram_dim,
                    "ngram_sizes": list(args.ngram_sizes), "ngram_rate": args.ngram_rate,
                    "ngram_hashes": args.ngram_hashes, "ngram_pooling": args.ngram_pooling,
                    "wide_fusion": args.wide_fusion, "wide_weight": args.wide_weight,
                    "exit_pooling": args.exit_pooling,
                    "nested_tasks": None if args.nested_tasks == "auto" else {},
                    "jamo_embedding": args.jamo_embedding, "linear_ngrams": args.linear_ngrams}
    try:
        summary = train(tc, args.out, model_kwargs, overwrite=args.overwrite,
                        verbose=0 if args.quiet else "auto")
    except KeyboardInterrupt:
        from resic_tf.resume import interrupted_message
        print(f"resic train: interrupted; {interrupted_message(args.out, args.epochs)}: "
              f"{resume_command(args.argv)}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        import tensorflow as tf
        if not (os.environ.get("TF_CONFIG") and isinstance(e, tf.errors.OpError)) or args.debug:
            raise
        # Under MultiWorkerMirrored a lost worker fails the others' collective ops: a fault of
        # the cluster, not a bug, and the run resumes from its last commit.
        first = str(e.message if hasattr(e, "message") else e).strip().splitlines()[:1]
        print(f"resic train: error: a worker of the cluster failed or was lost "
              f"({type(e).__name__}: {first[0][:200] if first else ''}); run the same command "
              f"on every worker again to resume from the last finished epoch",
              file=sys.stderr, flush=True)
        return 1
    out = Path(args.out)
    if summary.get("worker"):  # a MultiWorkerMirrored worker other than the chief
        print(f"\nWorker {summary['worker']} finished its {summary['epochs_this_process']} "
              f"epochs; the chief (worker 0) wrote the run to {out}")
        return 0
    print(f"\nTrained {summary['params']:,} parameters on {summary['train_rows']} rows in "
          f"{summary['fit_seconds']} s; validation ({summary['val_rows']} rows), per exit:\n")
    print((out / "final_exits.md").read_text(encoding="utf-8"))
    print(f"Model: {out / 'model.keras'}\nPer-epoch table: {out / 'metrics.csv'}\n"
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return 0


def add_calibrate_subparser(subparsers) -> None:
    from resic_tf.policies import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
    p = subparsers.add_parser(
        "calibrate", formatter_class=argparse.RawTextHelpFormatter,
        help="choose the best exit per length bucket and task (writes RUN_DIR/gate.json), or an "
        "early-exit policy's thresholds (RUN_DIR/policies/P.json)",
        description="Calibrate the length gate on validation data (never the test data); with\n"
        "--policy, an early-exit policy's thresholds: each task's macro-F1 within --budget points\n"
        "of its LC's at the least compute. On a few hundred validation rows the cheapest\n"
        "threshold that meets the budget there is often a lucky one; by default it must also\n"
        "meet the budget on a paired bootstrap of the validation rows (--confidence,\n"
        "--bootstrap).\n\n"
        "Example:\n  resic calibrate runs/kh --bucket-width 10 --metric macro_f1 --min-support 20\n"
        "  resic calibrate runs/kh --policy confidence,entropy,patience,hybrid --budget 0.5\n"
        "  resic calibrate runs/kh --policy hybrid --budget 0.5 --confidence 0   # point criterion")
    p.add_argument("run_dir", help="a run directory made by `resic train`")
    p.add_argument("--data", help="validation file; default: the run's own validation rows")
    p.add_argument("--bucket-width", type=int, default=10,
                   help="characters per length bucket (default %(default)s, the paper's)")
    p.add_argument("--metric", default="macro_f1", choices=METRICS,
                   help="what the best exit of a bucket maximises (default %(default)s)")
    p.add_argument("--min-support", type=int, default=DEFAULT_MIN_SUPPORT,
                   help="buckets with fewer validation rows use the exit best over all lengths "
                   "(default %(default)s)")
    p.add_argument("--policy", type=_str_list, default=None,
                   help=f"comma-separated early-exit policies to calibrate, of {list(POLICIES)} "
                   "(length is the gate; default: the gate only)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="macro-F1 points each task may lose against its LC (default "
                   "%(default)s)")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, metavar="C",
                   help="with --policy: a threshold must also meet --budget in all but the worst\n"
                   "(1 - C) of the --bootstrap resamples of the validation rows (each resample\n"
                   "drawn with replacement scores the policy and the LC on the same rows; at 0.9\n"
                   "the 10th-percentile-worst difference must be within the budget), and the\n"
                   "thresholds are tried from the LC towards the cheapest, stopping at the first\n"
                   "that fails (hybrid: a bucket's step must also leave the task no worse).\n"
                   "Guards against thresholds that meet the budget only by luck on a small\n"
                   "validation set, at the cost of some of the FLOPs saved. 0: the point score\n"
                   "alone, the cheapest that passes (the behaviour before; default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                   help="resamples for --confidence (default %(default)s; 0 = --confidence 0)")
    p.add_argument("--bootstrap-seed", type=int, default=DEFAULT_SEED, metavar="SEED",
                   help="seed of the resamples: the same seed, data and model give the same "
                   "thresholds (default %(default)s)")
    p.add_argument("--no-wide-exit", dest="wide_exit", action="store_false", default=None,
                   help="with --policy on a late-fusion model: rows may not stop at exit 0, the\n"
                   "wide classifier before the first block (by default every policy but length\n"
                   "may)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    from resic_tf.config import exit_label
    from resic_tf.run import GATE_FILE, Run
    from resic_tf.validation import InvalidValueError
    from resic_tf.policies import policy_markdown
    for name in args.policy or ():
        if name not in POLICIES:
            raise InvalidValueError(f"--policy must name policies of {list(POLICIES)}. "
                                    f"Received: {name!r}")
    # What is recalibrated is not read: a truncated gate.json must not block its own repair.
    remade = ["length"] if not args.policy else list(args.policy)
    run = Run.load(args.run_dir, skip=remade)
    predictions = run.calibration_predictions(args.data, progress=True)  # once for every one
    if not args.policy or "length" in args.policy or run.gate is None:
        gate = run.calibrate(args.data, args.bucket_width, args.metric, args.min_support,
                             predictions=predictions)
        print(f"Wrote {run.file(GATE_FILE)}; chosen exit per {gate.bucket_width}-character "
              "bucket:")
        for task, exits in gate.exits.items():
            chosen = [exit_label(c, len(exits)) for c in gate.choice[task]]
            print(f"  {task}: " + " ".join(chosen) + f"  (fallback {exits[gate.fallback[task]]})")
    for name in args.policy or ():
        policy = run.calibrate_policy(name, args.data, args.budget, args.metric,
                                      args.bucket_width, args.min_support,
                                      confidence=args.confidence, resamples=args.bootstrap,
                                      seed=args.bootstrap_seed, predictions=predictions,
                                      wide_exit=args.wide_exit)
        where = run.file("gate.json" if name == "length" else f"policies/{name}.json")
        print(f"\n{name} ({where}):\n{policy_markdown(policy)}")
    return 0


def add_evaluate_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", formatter_class=argparse.RawTextHelpFormatter,
        help="per-exit, max and gated accuracy / macro-F1 on a labelled file",
        description="Print and write (CSV + Markdown) the per-exit table on --data.\n\n"
        "Example:\n  resic evaluate runs/kh --data dev.tsv --out runs/kh/eval_dev")
    p.add_argument("run_dir", help="a run directory made by `resic train`")
    p.add_argument("--data", required=True, help="labelled file with the run's columns")
    p.add_argument("--out", help="output directory (default RUN_DIR/eval_<data name>)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from resic_tf.evaluation import evaluate_run
    from resic_tf.run import Run
    evaluate_run(Run.load(args.run_dir), args.data, args.out, progress=True)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval_{Path(args.data).stem}"
    # evaluation.md holds the exit table and, when the run has calibrated policies, theirs
    print((out / "evaluation.md").read_text(encoding="utf-8"))
    print(f"Wrote {out / 'evaluation.csv'} and {out / 'evaluation.md'}")
    return 0


def add_export_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", formatter_class=argparse.RawTextHelpFormatter,
        help="write a TF Serving SavedModel (raw text in, gated prediction out)",
        description="Export RUN_DIR to savedmodels/NAME/VERSION/ (written atomically).\n\n"
        "Example:\n  resic export runs/kh --out savedmodels/kh          # next version\n"
        "  resic export runs/kh --out savedmodels/kh --version 3")
    p.add_argument("run_dir", help="a calibrated run directory (with gate.json)")
    p.add_argument("--out", help="model base path (default savedmodels/<run name>)")
    p.add_argument("--version", type=int, help="version directory (default: next integer)")
    p.add_argument("--policy", default=None, choices=POLICIES,
                   help="the calibrated early-exit policy serving_default applies, running each "
                   "row only as deep as it needs (default: the length gate, every block run)")
    p.add_argument("--early-exit", action="store_true",
                   help="with the length gate: run each input only as deep as its gated exits "
                   "need (implied by --policy)")
    p.add_argument("--no-freeze", dest="freeze", action="store_false",
                   help="keep the weights as variables (default: frozen into the graph as "
                   "constants, which answers a single text 1.3-2.7x faster; docs/MEASURED.md)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from resic_tf.export import export_run
    from resic_tf.run import Run
    path = export_run(Run.load(args.run_dir), args.out, args.version,
                      early_exit=args.early_exit or args.policy is not None,
                      policy=args.policy or "length", freeze=args.freeze)
    print(f"Exported {path}\nServe: tensorflow_model_server --rest_api_port=8501 "
          f"--model_name={path.parent.name} --model_base_path={path.parent.resolve()}")
    return 0


def add_predict_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", formatter_class=argparse.RawTextHelpFormatter,
        help="gated predictions from an exported SavedModel, as JSON lines",
        description="Load the SavedModel (not the Keras model) and print one JSON line per text."
        "\n\nExample:\n  resic predict savedmodels/kh/1 '정말 재밌어요' 'another text'\n"
        "  resic predict savedmodels/kh/1 --file texts.txt")
    p.add_argument("export_dir", help="a version directory, e.g. savedmodels/kh/1")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", help="UTF-8 file, one text per line")
    p.set_defaults(func=run_predict)


def run_predict(args) -> int:
    import itertools
    import json

    from resic_tf.export import iter_saved_model_predictions
    from resic_tf.progress import Progress
    from resic_tf.validation import InvalidValueError
    from resic_tf.data import iter_text_lines
    texts = itertools.chain(args.texts, iter_text_lines(args.file) if args.file else ())
    first = next(texts, None)
    if first is None:
        raise InvalidValueError("no text to predict: give texts as arguments or --file")
    # Streamed: a file of any size is read, predicted and printed a chunk at a time.
    with Progress(f"predicting {args.file}", enabled=bool(args.file),
                  stream=sys.stderr) as bar:
        for record in iter_saved_model_predictions(args.export_dir,
                                                   itertools.chain([first], texts)):
            print(json.dumps(record, ensure_ascii=False))
            bar.update(1)
    return 0


def add_analyze_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", formatter_class=argparse.RawTextHelpFormatter,
        help="report: per-exit tables, overthinking, error by length, gate (Markdown + PNG)",
        description="Write DIR/report.md, figures and predictions.parquet for --data.\n\n"
        "Example:\n  resic analyze runs/kh --data dev.tsv --out runs/kh/analysis_dev")
    p.add_argument("run_dir", help="a run directory made by `resic train`")
    p.add_argument("--data", required=True, help="labelled file with the run's columns")
    p.add_argument("--out", required=True, help="output directory for report.md and figures")
    p.set_defaults(func=run_analyze)


def run_analyze(args) -> int:
    from resic_tf.report import analyze_run
    from resic_tf.run import Run
    report = analyze_run(Run.load(args.run_dir), args.data, args.out, progress=True)
    print(f"Wrote {report}")
    return 0


def add_baselines_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "baselines", formatter_class=argparse.RawTextHelpFormatter,
        help="fit TF-IDF + LinearSVC and fastText on a run's training rows; compare on test data",
        description="Refit the two classic baselines on exactly the rows the run trained on (its\n"
        "seeded validation hold-out kept apart) and print their test scores beside the run's\n"
        "LC and gate (run `resic evaluate RUN --data TEST` first). Needs the optional extra:\n"
        "pip install -e \".[bench]\".\n\n"
        "Example:\n  resic baselines runs/kh --data dev.tsv")
    p.add_argument("run_dir", help="a run directory made by `resic train`")
    p.add_argument("--data", required=True, help="the test file the run was evaluated on")
    p.add_argument("--stored", help="JSON of baseline figures to show when the extra is missing")
    p.set_defaults(func=run_baselines)


def run_baselines(args) -> int:
    from resic_tf.baselines import compare_run, scores_table
    scores, source = compare_run(args.run_dir, args.data, args.stored)
    print(f"Test scores on {args.data}; {source}\n")
    print(scores_table(scores))
    return 0


def add_demo_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", formatter_class=argparse.RawTextHelpFormatter,
        help="main job on the bundled korean-hate-speech data: train, calibrate, evaluate, "
        "analyze, export, predict",
        description="Train a small Res-IC18 on the bundled data (bias + hate), calibrate the gate\n"
        "on the validation split, evaluate on dev (the test set), export and predict.\n\n"
        "Example:\n  resic demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="epochs (default %(default)s)")
    p.add_argument("--filters", type=_int_list, default=(32, 64, 128, 256),
                   help="filters per stage (default 32,64,128,256: half the paper's width)")
    p.add_argument("--arch", default="resic18", choices=sorted(ARCH_BLOCKS),
                   help="architecture (default %(default)s)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    out = Path(args.out)
    train_file, test_file = DEMO_DIR / "train.tsv", DEMO_DIR / "dev.tsv"
    run_dir = out / "run"
    steps = [
        ["train", "--data", str(train_file), "--val-split", "0.1", "--text-col", "comments",
         "--label-cols", "bias,hate", "--arch", args.arch,
         "--filters", ",".join(map(str, args.filters)), "--epochs", str(args.epochs),
         "--batch-size", "64", "--out", str(run_dir), "--overwrite"],
        ["calibrate", str(run_dir), "--min-support", "20"],
        ["evaluate", str(run_dir), "--data", str(test_file), "--out", str(out / "eval_dev")],
        ["analyze", str(run_dir), "--data", str(test_file), "--out", str(out / "analysis_dev")],
        ["baselines", str(run_dir), "--data", str(test_file), "--stored",
         str(DEMO_DIR / "baselines.json")],
        ["export", str(run_dir), "--out", str(out / "savedmodels" / "resic_demo")],
        ["predict", str(out / "savedmodels" / "resic_demo" / "1"),
         "(현재 호텔주인 심정) 아18 난 마른하늘에 날벼락맞고 호텔망하게생겼는데 누군 계속 추모받네....",
         "1,2화 어설펐는데 3,4화 지나서부터는 갈수록 너무 재밌던데", ""],
    ]
    export_base = out / "savedmodels" / "resic_demo"
    if (export_base / "1" / "export.json").exists():  # only the demo's own earlier export
        import shutil
        shutil.rmtree(export_base / "1")
    for step in steps:
        print(f"\n$ resic {' '.join(a if a and ' ' not in a else repr(a) for a in step)}",
              flush=True)
        # Each step in its own process, exactly as the printed command runs (and without
        # TensorFlow's retracing warnings from several models traced in one process).
        command = [sys.executable, "-m", "resic_tf.cli", *(["--debug"] if args.debug else []),
                   *step]
        code = subprocess.run(command, check=False).returncode
        if code:
            return code
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback for user errors too")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_subparser, add_calibrate_subparser, add_evaluate_subparser,
                add_export_subparser, add_predict_subparser, add_analyze_subparser,
                add_baselines_subparser, add_demo_subparser):
        add(subparsers)
    return parser


# A missing, existing, unreadable or unwritable file is the user's to fix, like bad data.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError)


def resume_command(argv: list[str]) -> str:
    """The command line that resumes an interrupted `resic train` (without --overwrite, which
    would start it again)."""
    import shlex
    return "resic " + shlex.join(a for a in argv if a != "--overwrite")


def _cannot_write(command: str, e: OSError) -> str:
    """One line for a write that failed for lack of permission or space: which file, why, and
    that what was there is intact (every file is replaced only once written whole)."""
    if command == "train":
        after = ("the files already written are intact (each is replaced only once written "
                 "whole); fix this and re-run the same command to resume")
    else:
        after = "nothing was changed (each file is replaced only once written whole)"
    return f"resic {command}: error: cannot write {e.filename or 'a file'}: {e.strerror}; {after}"


def main(argv: list[str] | None = None) -> int:
    from resic_tf.io import WRITE_ERRNOS, CannotWriteError
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except OSError as e:
        # EACCES / EPERM elsewhere may be a read: those keep the message below.
        writing = isinstance(e, CannotWriteError) or (e.errno in WRITE_ERRNOS and
                                                      not isinstance(e, PermissionError))
        if not writing and not isinstance(e, USER_ERRORS):
            raise
        if args.debug:
            traceback.print_exc()
        print(_cannot_write(args.command, e) if writing else
              f"resic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"resic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resic {args.command}: interrupted; no file was left half-written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
