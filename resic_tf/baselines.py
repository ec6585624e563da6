"""The two classic baselines a user fits before adopting Res-IC, on a run's own training rows:
TF-IDF character 1-4-grams + LinearSVC (scikit-learn) and fastText (word bigrams, character
1-4-gram subwords). They need the optional extra (`pip install -e ".[bench]"`); the library
never imports them otherwise.

`compare_run` answers a user's first question about a run: does it beat what I would pick
instead, on the same rows? It refits both on exactly the rows `resic train` trained on (the
same seeded validation hold-out) and scores them on a test file beside the run's LC and gate.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resic_tf.data import load_labelled_texts
from resic_tf.metrics import accuracy, macro_f1

TFIDF = "TF-IDF char 1-4 + LinearSVC"
FASTTEXT = "fastText"
BASELINES = (TFIDF, FASTTEXT)
EXTRA_HINT = 'pip install -e ".[bench]" (scikit-learn, fasttext-wheel)'


def available() -> bool:
    """Whether the optional extra is installed."""
    try:
        import fasttext  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def tfidf_svc(train_texts, train_labels, test_texts) -> list[str]:
    """TF-IDF over character 1-4-grams within words (sublinear tf, min_df 2) + LinearSVC(C=0.5)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    model = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4),
                                          sublinear_tf=True, min_df=2), LinearSVC(C=0.5))
    model.fit(list(train_texts), list(train_labels))
    return [str(p) for p in model.predict(list(test_texts))]


def fasttext_clf(train_texts, train_labels, test_texts, seed: int) -> list[str]:
    """fastText supervised: 25 epochs, lr 0.5, word bigrams, character 1-4-gram subwords, dim 100."""
    import fasttext

    clean = lambda t: " ".join(t.split())  # noqa: E731 (fastText reads one line per example)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        for text, label in zip(train_texts, train_labels):
            f.write(f"__label__{label} {clean(text)}\n")
        path = f.name
    try:
        model = fasttext.train_supervised(path, epoch=25, lr=0.5, wordNgrams=2, minn=1, maxn=4,
                                          dim=100, seed=seed, thread=2, verbose=0)
    finally:
        os.unlink(path)
    # A list goes through multilinePredict: the one-text path breaks on NumPy 2 (copy=False).
    labels, _ = model.predict([clean(t) for t in test_texts])
    return [row[0][len("__label__"):] for row in labels]


@dataclass(frozen=True)
class Score:
    task: str
    model: str
    accuracy: float
    macro_f1: float
    seconds: float | None = None  # fit + predict


def fit_baselines(train, test, tasks, seed: int) -> list[Score]:
    """Both baselines fitted per task on `train` and scored on `test` (LabelledTexts)."""
    out = []
    for task in tasks:
        classes = sorted(set(train.labels[task]) | set(test.labels[task]))
        y_test = np.array([classes.index(v) for v in test.labels[task]])
        for name in BASELINES:
            start = time.perf_counter()
            pred = fasttext_clf(train.texts, train.labels[task], test.texts, seed) \
                if name == FASTTEXT else tfidf_svc(train.texts, train.labels[task], test.texts)
            seconds = time.perf_counter() - start
            pred = np.array([classes.index(v) for v in pred])
            out.append(Score(task, name, accuracy(y_test, pred),
                             macro_f1(y_test, pred, len(classes)), seconds))
    return out


def compare_run(run_dir, test_file, stored: str | os.PathLike | None = None) -> tuple[list[Score], str]:
    """The run's LC and gate test scores beside both baselines fitted on the run's own training
    rows. Without the extra, the baselines' figures come from the JSON file `stored` (a list of
    Score fields measured earlier) when given. Returns the scores and a note on their source."""
    from resic_tf.config import TrainConfig
    run_dir = Path(run_dir)
    tc = TrainConfig.load(run_dir / "train_config.json")
    state = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    stem = Path(test_file).stem
    scores = []
    for task in tc.label_cols:
        for exit_ in ("lc", "gate"):
            key = f"{stem}/{task}_{exit_}"
            if f"{key}_macro_f1" in state.get("scores", {}):
                scores.append(Score(task, f"Res-IC ({exit_.upper()})",
                                    state["scores"][f"{key}_accuracy"],
                                    state["scores"][f"{key}_macro_f1"], state.get("fit_seconds")))
    if available():
        from resic_tf.training import load_splits
        train = load_splits(tc)[0]
        test = load_labelled_texts(test_file, tc.text_col, tc.label_cols)
        return scores + fit_baselines(train, test, tc.label_cols, tc.seed), \
            f"baselines fitted now on the run's {len(train)} training rows (seed {tc.seed})"
    if stored is not None and Path(stored).exists():
        saved = json.loads(Path(stored).read_text(encoding="utf-8"))
        return scores + [Score(**s) for s in saved["scores"]], \
            f"baselines not installed ({EXTRA_HINT}): their stored figures, {saved['source']}"
    return scores, f"baselines not installed ({EXTRA_HINT}) and no stored figures"


def scores_table(scores: list[Score]) -> str:
    lines = ["| task | model | accuracy | macro-F1 | fit s |", "|---|---|---|---|---|"]
    for s in sorted(scores, key=lambda s: s.task):
        sec = "" if s.seconds is None else f"{s.seconds:.0f}"
        lines.append(f"| {s.task} | {s.model} | {s.accuracy:.4f} | {s.macro_f1:.4f} | {sec} |")
    return "\n".join(lines)
