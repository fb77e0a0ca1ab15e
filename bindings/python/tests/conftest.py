"""Shared set-up of the Python tests: one worker thread (so that runs compare bit for bit
with the CLI's `--threads 1`), the shared data directory, the `mep` binary and MNIST as
arrays read with plain Python."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import numpy.typing as npt
import pytest

import mep

REPO = Path(__file__).resolve().parents[3]

# Set before any work: rayon's pool is built once per process.
mep.set_threads(1)


def data_dir() -> Path:
    """`MEP_DATA_DIR` (CI sets it to the shared copy); tests never download."""
    value = os.environ.get("MEP_DATA_DIR")
    if not value:
        pytest.fail("set MEP_DATA_DIR to the shared data (../shared/data)")
    # A relative path is read from the repository root, as the README's test command gives
    # it, whatever folder pytest runs in.
    path = REPO / value
    if not path.is_dir():
        pytest.fail(f"MEP_DATA_DIR={value}: no directory at {path}")
    return path


def mep_binary() -> Path:
    """The `mep` CLI built from this checkout (`MEP_BIN`, else target/release/mep)."""
    path = Path(os.environ.get("MEP_BIN", REPO / "target" / "release" / "mep"))
    if not path.exists():
        pytest.fail(f"no mep binary at {path}: build it (cargo build --release) or set MEP_BIN")
    return path


def cli(*args: str) -> str:
    """Runs the CLI with one thread on the shared data; returns its standard output."""
    result = subprocess.run(
        [str(mep_binary()), "--threads", "1", "--data-dir", str(data_dir()), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def cli_json_lines(*args: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in cli(*args).splitlines() if line.strip()]


TIMING = ("seconds", "samples_per_second")


def without_timing(metrics: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Epoch metrics without the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def _idx(path: Path) -> npt.NDArray[np.uint8]:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = struct.unpack(">" + "I" * dims, raw[4 : 4 + 4 * dims])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def mnist_arrays(
    train: int, test: int
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The first `train` / `test` MNIST samples as float32 [n, 28, 28] in [0, 1] and labels."""
    d = data_dir() / "mnist"
    x = _idx(d / "train-images-idx3-ubyte.gz")[:train].astype(np.float32) / 255.0
    y = _idx(d / "train-labels-idx1-ubyte.gz")[:train].astype(np.int64)
    xt = _idx(d / "t10k-images-idx3-ubyte.gz")[:test].astype(np.float32) / 255.0
    yt = _idx(d / "t10k-labels-idx1-ubyte.gz")[:test].astype(np.int64)
    return x, y, xt, yt
