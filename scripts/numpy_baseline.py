#!/usr/bin/env python3
"""numpy (OpenBLAS) reference timings for `mep bench gemm` and `mep bench muon`, to run
side by side with them in the same hour.

Prints one JSON object: GFLOP/s of f32 matrix products on `mep bench gemm`'s default
shapes, and milliseconds of the textbook quintic Newton-Schulz iteration (Muon's: X <- a X
+ (b A + c A^2) X with A = X X^T, 5 steps, on the wide orientation, after Frobenius
normalisation) on the weight matrices of 784-256-128-10, as `mep bench muon` reports them.

Needs numpy (`pip install numpy`). Usage, one thread as mep's `--threads 1`:

    OPENBLAS_NUM_THREADS=1 python3 scripts/numpy_baseline.py
"""

import json
import time

import numpy as np

GEMM_SHAPES = [
    (64, 784, 256),
    (64, 256, 128),
    (64, 128, 256),
    (256, 784, 256),
    (256, 256, 256),
    (256, 256, 784),
    (1024, 1024, 1024),
]
MUON_MATRICES = [(784, 256), (256, 128), (128, 10)]
QUINTIC = (3.4445, -4.7750, 2.0315)


def median_seconds(f, repeats):
    for _ in range(max(1, repeats // 5)):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def newton_schulz(g, steps=5):
    a, b, c = QUINTIC
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def main():
    rng = np.random.default_rng(0)
    gemm = {}
    for m, k, n in GEMM_SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = rng.standard_normal((k, n), dtype=np.float32)
        s = median_seconds(lambda: x @ y, 20)
        gemm[f"{m}x{k}x{n}"] = 2 * m * k * n / s / 1e9
    muon = {}
    for m, n in MUON_MATRICES:
        g = rng.standard_normal((m, n), dtype=np.float32)
        muon[f"{m}x{n}"] = median_seconds(lambda: newton_schulz(g), 20) * 1e3
    print(
        json.dumps(
            {
                "numpy": np.__version__,
                "gemm_gflops": gemm,
                "newton_schulz_ms": muon,
                "muon_update_ms": sum(muon.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
