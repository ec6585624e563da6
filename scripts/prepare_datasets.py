#!/usr/bin/env python3
"""Turn the shared raw datasets into TSV files that `resic train/evaluate/analyze` read.

Never downloads anything: it only reads the snapshot in the shared-data folder
(default ``<repo>/../shared/data``; override with ``--shared`` or ``$SHARED_DATA``).

Output (default ``runs/paper/data``), one folder per dataset, UTF-8 TSV with a header,
no quoting (tabs and newlines inside texts are replaced by spaces, and counted):

  korean-hate-speech/{train,test}.tsv      comments, bias, hate
      train <- labeled/train.tsv (validation: `resic train --val-split 0.1`)
      test  <- labeled/dev.tsv (the public test set has no labels)
  stylekqc/{train,val,test}.tsv            sentence, act, topic
      act/X.tsv and topic/X.tsv joined by line (sentences asserted identical)
  3i4k/{train,test}.tsv                    text, intent
      train <- fci_train_val.txt (validation: --val-split 0.1), test <- fci_test.txt
      --max-3i4k-train N keeps a seeded random subsample of N training rows
  clinc150/{train,val,test,test_inscope,test_oos}.tsv   text, intent, domain
      "oos-train" scheme of Larson et al. (2019): oos is a 151st intent (domain "oos")
      trained on oos_train; test_inscope.tsv is the 4,500 in-scope test queries, whose
      accuracy is the number Larson et al. report.
  nsmc/{train,val,test}.tsv                review, polarity, rating
      carved from nsmc/train.tsv (150k rows) by --seed: 50,000 test rows, 5,000 validation
      rows, the rest (95,000) train; --max-nsmc-train N keeps the first N training rows

Usage: python scripts/prepare_datasets.py [--shared DIR] [--out runs/paper/data]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clean(text: str, stats: dict) -> str:
    new = text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    if new != text:
        stats["cleaned"] = stats.get("cleaned", 0) + 1
    return new


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            assert len(row) == len(header), (path, row)
            f.write("\t".join(clean(str(v), stats) for v in row) + "\n")
    extra = f", {stats['cleaned']} texts had tabs/newlines replaced" if stats else ""
    print(f"  {path.relative_to(path.parents[1])}: {len(rows)} rows{extra}")


def read_tsv_noquote(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def korean_hate_speech(src: Path, out: Path) -> None:
    for split_in, split_out in (("train", "train"), ("dev", "test")):
        rows = read_tsv_noquote(src / "labeled" / f"{split_in}.tsv")
        assert rows and {"comments", "bias", "hate"} <= set(rows[0]), rows[:1]
        write_tsv(out / f"{split_out}.tsv", ["comments", "bias", "hate"],
                  [[r["comments"], r["bias"], r["hate"]] for r in rows])


def stylekqc(src: Path, out: Path) -> None:
    for split_in, split_out in (("train", "train"), ("dev", "val"), ("test", "test")):
        act = read_tsv_noquote(src / "act" / f"{split_in}.tsv")
        topic = read_tsv_noquote(src / "topic" / f"{split_in}.tsv")
        assert len(act) == len(topic), (split_in, len(act), len(topic))
        mismatches = sum(a["sentence"] != t["sentence"] for a, t in zip(act, topic))
        assert mismatches == 0, f"{split_in}: {mismatches} sentences differ between act/ and topic/"
        write_tsv(out / f"{split_out}.tsv", ["sentence", "act", "topic"],
                  [[a["sentence"], a["act"], t["topic"]] for a, t in zip(act, topic)])


def read_3i4k(path: Path) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            label, sep, text = line.partition("\t")
            assert sep and label.strip().isdigit(), f"{path}:{n}: {line[:60]!r}"
            rows.append([text, label.strip()])
    return rows


def three_i4k(src: Path, out: Path, max_train: int | None, seed: int) -> None:
    train = read_3i4k(src / "fci_train_val.txt")
    if max_train and len(train) > max_train:
        random.Random(seed).shuffle(train)
        train = train[:max_train]
        print(f"  3i4k train subsampled to {max_train} rows (seed {seed})")
    write_tsv(out / "train.tsv", ["text", "intent"], train)
    write_tsv(out / "test.tsv", ["text", "intent"], read_3i4k(src / "fci_test.txt"))


def clinc150(src: Path, out: Path) -> None:
    data = json.loads((src / "data_full.json").read_text(encoding="utf-8"))
    domains = json.loads((src / "domains.json").read_text(encoding="utf-8"))
    domain_of = {intent: dom for dom, intents in domains.items() for intent in intents}
    assert len(domain_of) == 150, len(domain_of)

    def rows(key: str) -> list[list[str]]:
        res = []
        for text, intent in data[key]:
            if key.startswith("oos"):
                assert intent == "oos", (key, intent)
                res.append([text, "oos", "oos"])
            else:
                res.append([text, intent, domain_of[intent]])
        return res

    header = ["text", "intent", "domain"]
    write_tsv(out / "train.tsv", header, rows("train") + rows("oos_train"))
    write_tsv(out / "val.tsv", header, rows("val") + rows("oos_val"))
    write_tsv(out / "test.tsv", header, rows("test") + rows("oos_test"))
    write_tsv(out / "test_inscope.tsv", header, rows("test"))
    write_tsv(out / "test_oos.tsv", header, rows("oos_test"))


def nsmc(src: Path, out: Path, seed: int, max_train: int | None = None) -> None:
    with open(src / "train.tsv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        col = {name: header.index(name) for name in ("review", "polarity", "rating")}
        rows = [[r[col["review"]], r[col["polarity"]], r[col["rating"]]] for r in reader]
    random.Random(seed).shuffle(rows)
    test, val, train = rows[:50_000], rows[50_000:55_000], rows[55_000:]
    if max_train is not None:
        train = train[:max_train]
    header = ["review", "polarity", "rating"]
    write_tsv(out / "train.tsv", header, train)
    write_tsv(out / "val.tsv", header, val)
    write_tsv(out / "test.tsv", header, test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.environ.get("SHARED_DATA", str(REPO.parent / "shared" / "data")),
                   help="shared raw-data folder (default $SHARED_DATA or <repo>/../shared/data)")
    p.add_argument("--out", default=str(REPO / "runs" / "paper" / "data"))
    p.add_argument("--datasets", default="korean-hate-speech,clinc150,stylekqc,3i4k")
    p.add_argument("--max-3i4k-train", type=int, default=None,
                   help="subsample 3i4k train+val to this many rows (default: all 55,134)")
    p.add_argument("--max-nsmc-train", type=int, default=None,
                   help="keep the first N of the 95,000 NSMC training rows (default: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    shared, out = Path(a.shared), Path(a.out)
    if not shared.is_dir():
        print(f"shared data folder not found: {shared}", file=sys.stderr)
        return 2
    for name in a.datasets.split(","):
        print(name)
        src, dst = shared / name, out / name
        if name == "korean-hate-speech":
            korean_hate_speech(src, dst)
        elif name == "stylekqc":
            stylekqc(src, dst)
        elif name == "3i4k":
            three_i4k(src, dst, a.max_3i4k_train, a.seed)
        elif name == "clinc150":
            clinc150(src, dst)
        elif name == "nsmc":
            nsmc(src, dst, a.seed, a.max_nsmc_train)
        else:
            print(f"unknown dataset {name}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
