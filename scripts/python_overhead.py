#!/usr/bin/env python3
"""The cost of driving mep from Python: one EP epoch of 784-256-128-10 on MNIST from the
CLI and from the Python package, same options, seed and thread count, alternated in one
run so that both see the same machine load.

    python scripts/python_overhead.py [--repeats 3] [--threads 1] [--preset smep]

Needs the package installed (`pip install ./bindings/python`) and the binary built
(`cargo build --release`, or MEP_BIN). Reports, per side, the epoch time the library
measures (`seconds` in the metrics) and the wall time of the whole process (start-up,
data loading, evaluation), as medians, and their ratio Python / CLI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PYTHON_RUN = """
import json, sys, mep
mep.set_threads(int(sys.argv[1]))
run = mep.train(sys.argv[2], dataset="mnist", epochs=1, fetch=False, out=sys.argv[3])
print(json.dumps(run.history[-1]))
"""


def timed(cmd: list, env: dict) -> tuple:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    wall = time.perf_counter() - start
    metrics = json.loads(out.strip().splitlines()[-1])
    return metrics, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="smep")
    args = ap.parse_args()
    binary = os.environ.get("MEP_BIN", str(REPO / "target" / "release" / "mep"))
    env = dict(os.environ)
    if "MEP_DATA_DIR" not in env:
        sys.exit("set MEP_DATA_DIR to the data (for example ../shared/data)")
    sides = {"cli": {"epoch": [], "wall": [], "acc": []}, "python": {"epoch": [], "wall": [], "acc": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for side in ("cli", "python"):
                out = str(Path(tmp) / f"{side}{i}")
                if side == "cli":
                    cmd = [binary, "--threads", str(args.threads), "train", "--preset", args.preset,
                           "--dataset", "mnist", "--epochs", "1", "--no-fetch", "--json", "--out", out]
                else:
                    cmd = [sys.executable, "-c", PYTHON_RUN, str(args.threads), args.preset, out]
                metrics, wall = timed(cmd, env)
                sides[side]["epoch"].append(metrics["seconds"])
                sides[side]["wall"].append(wall)
                sides[side]["acc"].append(metrics["test_accuracy"])
                print(f"{side:>6} run {i + 1}: epoch {metrics['seconds']:.2f} s, wall {wall:.2f} s, "
                      f"test {100 * metrics['test_accuracy']:.2f}%", file=sys.stderr)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in sides.items()}
    result = {
        "preset": args.preset,
        "threads": args.threads,
        "repeats": args.repeats,
        "cli": med["cli"],
        "python": med["python"],
        "epoch_ratio": med["python"]["epoch"] / med["cli"]["epoch"],
        "wall_ratio": med["python"]["wall"] / med["cli"]["wall"],
        "same_accuracy": sides["cli"]["acc"] == sides["python"]["acc"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
