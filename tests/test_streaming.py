"""Streaming (issue 11): chunked reading, the hash split, the one-pass scan, streamed batches,
a streamed `resic train`, chunked prediction and progress lines, on real rows."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from resic_tf.data import DataError, encode_labels, iter_labelled_chunks, load_labelled_texts
from resic_tf.progress import Progress
from resic_tf.streaming import scan_training_file, streaming_dataset, validation_mask
from resic_tf.vocabulary import CharVocabulary, count_chars, split_chars

COLS = ("comments", ["bias", "hate"])


def _formats(tmp_path, real_tsv):
    rows = load_labelled_texts(real_tsv, *COLS)
    frame = rows.to_frame("comments")
    paths = {"tsv": real_tsv, "csv": tmp_path / "r.csv", "jsonl": tmp_path / "r.jsonl",
             "parquet": tmp_path / "r.parquet"}
    frame.to_csv(paths["csv"], index=False)
    frame.to_json(paths["jsonl"], orient="records", lines=True, force_ascii=False)
    frame.to_parquet(paths["parquet"])
    return rows, paths


def test_chunks_join_to_the_whole_file_in_every_format(tmp_path, real_tsv):
    rows, paths = _formats(tmp_path, real_tsv)
    for fmt, path in paths.items():
        chunks = list(iter_labelled_chunks(path, *COLS, chunk_rows=64))
        assert [len(c) for c in chunks] == [64, 64, 64, 64, 44], fmt
        assert [c.first_row for c in chunks] == [1, 65, 129, 193, 257], fmt
        assert [t for c in chunks for t in c.texts] == rows.texts, fmt
        assert [v for c in chunks for v in c.labels["hate"]] == rows.labels["hate"], fmt


def test_an_error_in_a_later_chunk_names_its_row_and_line(tmp_path, real_tsv):
    lines = real_tsv.read_text(encoding="utf-8").splitlines()
    lines[150] = lines[150].rsplit("\t", 1)[0] + "\t"  # row 150 (line 151) loses its hate label
    path = tmp_path / "late.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    chunks = iter_labelled_chunks(path, *COLS, chunk_rows=64)
    assert len(next(chunks)) == 64 and len(next(chunks)) == 64  # rows 1-128 are fine
    with pytest.raises(DataError) as e:
        next(chunks)
    assert str(e.value) == f"{path}, row 150 (line 151), column 'hate': missing label"
    # a label unseen in training in the third chunk: the file's row, not the chunk's
    good = list(iter_labelled_chunks(real_tsv, *COLS, chunk_rows=64))
    classes = {"bias": ["none", "others"], "hate": ["hate", "none", "offensive"]}
    with pytest.raises(DataError, match=r"row \d+ \(line \d+\), column 'bias': label 'gender'"):
        for chunk in good:
            encode_labels(chunk, classes)
    first_gender = load_labelled_texts(real_tsv, *COLS).labels["bias"].index("gender") + 1
    with pytest.raises(DataError, match=rf"row {first_gender} \(line {first_gender + 1}\)"):
        for chunk in good:
            encode_labels(chunk, classes)


def test_validation_mask_is_stable_per_row_and_near_the_share(real_tsv):
    rows = load_labelled_texts(real_tsv, *COLS)
    mask = validation_mask(rows, 0.2, seed=7)
    # each row decides alone: any chunking gives the same rows
    parts = [validation_mask(c, 0.2, seed=7)
             for c in iter_labelled_chunks(real_tsv, *COLS, chunk_rows=37)]
    np.testing.assert_array_equal(np.concatenate(parts), mask)
    assert 0.13 < mask.mean() < 0.27  # 300 rows, share 0.2
    assert not np.array_equal(validation_mask(rows, 0.2, seed=8), mask)  # the seed matters
    # identical rows fall on the same side
    twice = rows.subset(np.r_[np.arange(len(rows)), np.arange(len(rows))])
    both = validation_mask(twice, 0.2, seed=7)
    np.testing.assert_array_equal(both[:len(rows)], both[len(rows):])


def test_count_chars_counts_as_the_model_splits():
    nfd = "\u1112\u1161\u11ab\u1100\u1173\u11af"  # 한글 as conjoining jamo
    texts = ["정말 재밌어요", nfd, "a\u0301😀", "", nfd + " ok"]
    want = Counter(c.decode("utf-8") for c in split_chars(texts).flat_values.numpy())
    assert count_chars(texts) == want
    assert count_chars(texts, batch_size=2) == want
    assert count_chars(texts)["한"] == 2 and "\u1112" not in count_chars(texts)
    assert CharVocabulary.from_counts(want).chars == CharVocabulary.build(texts).chars


def test_scan_matches_the_rows_it_read(tmp_path, real_tsv):
    val_file = tmp_path / "val.parquet"
    scan = scan_training_file(real_tsv, *COLS, val_file, val_split=0.2, seed=5, chunk_rows=50,
                              progress=False)
    rows = load_labelled_texts(real_tsv, *COLS)
    held = validation_mask(rows, 0.2, 5)
    train, val = rows.subset(np.flatnonzero(~held)), rows.subset(np.flatnonzero(held))
    assert (scan.rows, scan.train_rows, scan.val_rows) == (300, len(train), len(val))
    assert scan.classes == {"bias": ["gender", "none", "others"],
                            "hate": ["hate", "none", "offensive"]}
    for task in ("bias", "hate"):
        np.testing.assert_array_equal(
            scan.class_counts(task), [train.labels[task].count(c) for c in scan.classes[task]])
    assert scan.chars == count_chars(train.texts)
    stored = load_labelled_texts(val_file, *COLS)
    assert stored.texts == val.texts and stored.labels == val.labels


def test_scan_refuses_a_split_with_nothing_left(tmp_path, real_tsv):
    with pytest.raises(DataError, match=rf"^{real_tsv}: val_split=1e-09 of 300 rows leaves an "
                       "empty train or validation set"):
        scan_training_file(real_tsv, *COLS, tmp_path / "v.parquet", val_split=1e-9,
                           progress=False)


def test_streamed_epochs_hold_every_training_row_once_in_a_fresh_order(real_tsv):
    rows = load_labelled_texts(real_tsv, *COLS)
    held = validation_mask(rows, 0.2, 3)
    train = rows.subset(np.flatnonzero(~held))
    tasks = {"bias": ["gender", "none", "others"], "hate": ["hate", "none", "offensive"]}
    ds = streaming_dataset(real_tsv, "comments", tasks, 16, part="train", rows=len(train),
                           val_split=0.2, seed=3, shuffle_buffer=1000, by_length=True, window=4,
                           chunk_rows=40)
    assert int(ds.cardinality()) == -(-len(train) // 16)
    epochs = []
    for _ in range(2):
        texts, hate = [], []
        for x, y in ds:
            texts += [t.decode("utf-8") for t in x.numpy()]
            hate += y["hate"].numpy().tolist()
        epochs.append((texts, hate))
    for texts, hate in epochs:
        assert sorted(texts) == sorted(train.texts)
        pairs = Counter(zip(texts, hate))
        assert pairs == Counter((t, tasks["hate"].index(h))
                                for t, h in zip(train.texts, train.labels["hate"]))
    assert epochs[0][0] != epochs[1][0]  # reshuffled every epoch
    # without shuffling each chunk comes shortest first, every row once
    plain = [t.decode("utf-8") for x, _ in streaming_dataset(
        real_tsv, "comments", tasks, 32, chunk_rows=100) for t in x.numpy()]
    assert sorted(plain) == sorted(rows.texts)
    assert all(np.diff([len(t) for t in plain[:100]]) >= 0)


def test_resic_train_streamed_end_to_end(tmp_path, real_tsv):
    from resic_tf.cli import main
    from resic_tf.run import Run
    out = tmp_path / "run"
    code = main(["train", "--data", str(real_tsv), "--text-col", "comments",
                 "--label-cols", "bias,hate", "--filters", "4,4", "--blocks", "1,1",
                 "--ngram-buckets", "64", "--epochs", "2", "--batch-size", "32",
                 "--val-split", "0.2", "--seed", "3", "--stream", "on",
                 "--shuffle-buffer", "100", "--steps-per-epoch", "3", "--out", str(out),
                 "--linear-ngrams", "3000", "--select", "last", "--quiet"])
    assert code == 0
    state = json.loads((out / "run.json").read_text(encoding="utf-8"))
    rows = load_labelled_texts(real_tsv, *COLS)
    held = validation_mask(rows, 0.2, 3)
    assert (state["train_rows"], state["val_rows"]) == (int((~held).sum()), int(held.sum()))
    assert state["train_config"]["stream"] is True
    # the linear branch read the training rows once, whatever the steps per epoch
    assert state["linear_branch"]["texts"] == int((~held).sum())
    run = Run.load(out)
    assert run.validation.texts == rows.subset(np.flatnonzero(held)).texts
    assert len(pd.read_csv(out / "metrics.csv")) == 2 * 2 * 2  # epochs x (IC + LC) x tasks
    assert run.model.optimizer.iterations.numpy() == 6  # 2 epochs of 3 steps
    assert not list(tmp_path.glob(".run.validation.*"))  # the staged file was moved in


def test_chunked_prediction_equals_one_pass(tiny_run, real_tsv):
    from resic_tf.run import Run, predict_file
    run = Run.load(tiny_run)
    whole = predict_file(run, real_tsv, chunk_rows=10_000)
    seen = []
    parts = predict_file(run, real_tsv, chunk_rows=70, keep_texts=True,
                         on_chunk=lambda rows, *_: seen.append(rows.first_row))
    assert seen == [1, 71, 141, 211, 281] and parts.size == whole.size == 300
    assert parts.rows.texts == load_labelled_texts(real_tsv, *COLS).texts
    for task in run.config.tasks:
        np.testing.assert_array_equal(parts.labels[task], whole.labels[task])
        np.testing.assert_allclose(parts.probs[task], whole.probs[task], atol=1e-5)
    np.testing.assert_array_equal(parts.lengths, whole.lengths)


def test_progress_plain_lines_for_logs():
    out = io.StringIO()
    with Progress("reading f.tsv", total=10, every=0.0, stream=out) as bar:
        bar.update(4)
        bar.update(6)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("reading f.tsv: 4 of 10 rows, ")
    assert lines[-1].startswith("reading f.tsv: 10 of 10 rows") and lines[-1].endswith("done")
    short = io.StringIO()
    with Progress("reading g.tsv", total=3, stream=short) as bar:  # every 30 s: nothing to say
        bar.update(3)
    assert short.getvalue() == ""
    quiet = io.StringIO()
    with Progress("x", enabled=False, stream=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == "" and bar.done == 5
