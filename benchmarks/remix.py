#!/usr/bin/env python3
"""Linear-branch runs trained with fixed thirds (0.13, or `--linear-mix thirds`) served with the
mix `resic train --linear-mix auto` would choose (`resic_tf.fusion.calibrate_mix`), end to end:
each run is copied, its mix chosen on its validation rows and saved, its gate recalibrated
(`resic calibrate`) and its test file evaluated (`resic evaluate`); prints the test LC and gate
beside the run's own (thirds) figures. The original runs are not changed.

    python benchmarks/remix.py --out runs/s18/remix RUN:TEST.tsv [RUN:TEST.tsv ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench_data import resic  # noqa: E402 (benchmarks/ is on sys.path)


def scores(run: Path, stem: str) -> dict:
    state = json.loads((run / "run.json").read_text(encoding="utf-8"))
    return {k[len(stem) + 1:]: round(100 * v, 2) for k, v in state.get("scores", {}).items()
            if k.startswith(f"{stem}/") and ("_lc_" in k or "_gate_" in k)}


def remix(run_dir: Path, test: str, out: Path) -> dict:
    from resic_tf.fusion import calibrate_mix
    from resic_tf.io import atomic_write_text
    from resic_tf.run import Run
    copy = out / run_dir.name
    if not (copy / "remix.json").exists():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("backup", "tensorboard",
                                                                     "eval_*"))
        run = Run.load(copy)
        chosen = calibrate_mix(run)
        run.save(copy)
        resic("calibrate", str(copy))
        resic("evaluate", str(copy), "--data", test)
        atomic_write_text(copy / "remix.json", json.dumps(chosen, indent=2) + "\n")
    stem = Path(test).stem
    return {"run": run_dir.name, "mix": json.loads((copy / "remix.json").read_text()),
            "thirds": scores(run_dir, stem), "auto": scores(copy, stem)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="RUN:TEST.tsv")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pair in args.pairs:
        run, test = pair.rsplit(":", 1)
        print(json.dumps(remix(Path(run), test, out), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
