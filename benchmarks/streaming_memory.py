"""Peak memory of `resic train` on the scale corpus, streamed against read whole (issue 11).

Runs `resic train` in a fresh process per case under `/usr/bin/time -v` and prints one table:
peak resident memory, wall seconds, the reading pass's rows/s and training samples/s, for
- the file read whole (`--stream off`, today's in-memory path),
- the file streamed (`--stream on`),
- the same rows repeated `--repeat` times (a temporary file), streamed,
and the targets: streamed peak <= 2.5 GB; repeated / single peak <= 1.2.

Each run trains one short epoch (`--steps-per-epoch`) of a small model: the memory that matters
is the data path's, which scales with rows; the model's does not.

    python benchmarks/streaming_memory.py --data ../shared/data/nsmc/reviews_full.tsv
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_case(data: Path, out: Path, stream: bool, args) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "resic_tf.cli", "train",
           "--data", str(data), "--text-col", args.text_col, "--label-cols", args.label_cols,
           "--filters", args.filters, "--blocks", args.blocks, "--epochs", "1",
           "--steps-per-epoch", str(args.steps), "--batch-size", str(args.batch_size),
           "--val-split", str(args.val_split), "--stream", "on" if stream else "off",
           "--out", str(out), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    reading = re.search(r"reading [^:]+: ([\d,]+) rows, ([\d,]+) rows/s", proc.stderr)
    state = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return {"peak_mb": peak_kb / 1024, "wall_s": wall,
            "rows": state["train_rows"] + state["val_rows"],
            "read_rows_per_s": float(reading.group(2).replace(",", "")) if reading else None,
            "train_samples_per_s": args.steps * args.batch_size / state["fit_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/nsmc/reviews_full.tsv")
    p.add_argument("--text-col", default="review")
    p.add_argument("--label-cols", default="rating,sentiment3")
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-split", type=float, default=0.02)
    p.add_argument("--filters", default="8,8,8,8")
    p.add_argument("--blocks", default="1,1,1,1")
    p.add_argument("--skip-whole", action="store_true", help="skip the in-memory case")
    args = p.parse_args()
    data = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="resic_stream_bench."))
    try:
        big = tmp / f"repeated{data.suffix}"
        with open(data, "rb") as src, open(big, "wb") as dst:
            header = src.readline()
            body = src.read()
            dst.write(header)
            for _ in range(args.repeat):
                dst.write(body if body.endswith(b"\n") else body + b"\n")
        del body
        cases = [] if args.skip_whole else [("read whole (--stream off)", data, False)]
        cases += [("streamed (--stream on)", data, True),
                  (f"streamed, rows x{args.repeat}", big, True)]
        results = {}
        for name, path, stream in cases:
            results[name] = run_case(path, tmp / f"run{len(results)}", stream, args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        print(f"\n{data.name}; `resic train --filters {args.filters} --blocks {args.blocks} "
              f"--epochs 1 --steps-per-epoch {args.steps} --batch-size {args.batch_size} "
              f"--val-split {args.val_split}`\n")
        print("| case | rows | peak memory MB | wall s | reading rows/s | training samples/s |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            read = f"{r['read_rows_per_s']:,.0f}" if r["read_rows_per_s"] else "-"
            print(f"| {name} | {r['rows']:,} | {r['peak_mb']:,.0f} | {r['wall_s']:.0f} | {read} "
                  f"| {r['train_samples_per_s']:.0f} |")
        one, many = results["streamed (--stream on)"], results[f"streamed, rows x{args.repeat}"]
        ratio = many["peak_mb"] / one["peak_mb"]
        print(f"\nstreamed peak {one['peak_mb']:,.0f} MB (target <= 2,560): "
              f"{'met' if one['peak_mb'] <= 2560 else 'NOT met'}; x{args.repeat} rows / x1: "
              f"{ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")
        if "read whole (--stream off)" in results:
            whole = results["read whole (--stream off)"]
            print(f"read whole / streamed peak: {whole['peak_mb'] / one['peak_mb']:.2f}; "
                  f"training samples/s streamed / whole: "
                  f"{one['train_samples_per_s'] / whole['train_samples_per_s']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
