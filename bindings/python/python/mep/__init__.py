"""mep: Equilibrium Propagation with geometry-aware optimizers, from Python.

The engine is the `mep` Rust library; this package maps Python arguments onto its calls
and returns numpy arrays and plain dicts (the same fields as the `mep` CLI's ``--json``).

>>> import mep
>>> run = mep.train("smep", dataset="mnist", epochs=1)          # doctest: +SKIP
>>> run.history[-1]["test_accuracy"]                              # doctest: +SKIP
0.9694

Training options are the keys of a ``mep train --config`` file (the CLI's flags with
underscores): ``lr``, ``batch``, ``epochs``, ``settle_steps``, ``beta``, ``update``, ...
Unknown keys, malformed values and impossible combinations raise ``ValueError`` with the
library's message; arguments of the wrong type raise ``TypeError``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import _native
from ._native import MepError, Network, set_simd_level, set_threads, simd_level, threads

__all__ = [
    "MepError",
    "Network",
    "Run",
    "check_gradient",
    "continual",
    "datasets",
    "load_dataset",
    "presets",
    "run_suite",
    "set_simd_level",
    "set_threads",
    "simd_level",
    "threads",
    "train",
]

__version__: str = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]
Metrics = Dict[str, Any]
EpochCallback = Callable[[Metrics], Any]
BatchCallback = Callable[[int, int, int, float, int, int], Any]


def presets() -> List[str]:
    """The preset names (``smep``, ``smep_plus``, ``conv_ep``, ...)."""
    return list(_native.presets())


def datasets() -> List[Dict[str, Any]]:
    """The named data sets: name, input shape (channels, height, width) and classes."""
    result: List[Dict[str, Any]] = json.loads(_native.datasets())
    return result


def load_dataset(
    name: str = "mnist",
    *,
    standardize: Optional[str] = None,
    train_samples: Optional[int] = None,
    test_samples: Optional[int] = None,
    seed: Optional[int] = None,
    fetch: bool = True,
    data_dir: Optional[PathLike] = None,
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """A named data set as numpy arrays ``(x, y, x_test, y_test)``: inputs float32
    ``[n, channels, height, width]`` scaled to [0, 1], then standardised as
    ``standardize`` says (``"dataset"``: the set's own mean and std, ``"MEAN,STD"``, or
    ``None``/``"none"``: left in [0, 1]), labels int64. The inputs a run reads, so a
    model trained by mep can be evaluated elsewhere on the same data."""
    options: Dict[str, Any] = {"dataset": name, "standardize": standardize or "none"}
    if train_samples is not None:
        options["train_samples"] = train_samples
    if test_samples is not None:
        options["test_samples"] = test_samples
    return _native.load_dataset(
        _json_object(options, "data options"), seed=seed, fetch=fetch, data_dir=_path(data_dir)
    )


def _json_object(values: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(dict(values), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: {e}") from None


def _path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


def _inputs(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float32]:
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _labels(y: npt.ArrayLike, name: str) -> npt.NDArray[np.int64]:
    a = np.asarray(y)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _progress_bar(stream: Any = None) -> BatchCallback:
    """An ``on_batch`` callback that draws one line of progress per epoch on stderr: redrawn
    at most ten times a second on a terminal, written once per epoch otherwise (a log)."""
    out = sys.stderr if stream is None else stream
    live = bool(getattr(out, "isatty", lambda: False)())
    state = {"loss": 0.0, "correct": 0, "samples": 0, "drawn": 0.0}

    def on_batch(epoch: int, batch: int, batches: int, loss: float, correct: int, samples: int) -> None:
        if batch == 1:
            state.update(loss=0.0, correct=0, samples=0, drawn=0.0)
        state["loss"] += loss * samples
        state["correct"] += correct
        state["samples"] += samples
        last = batch == batches
        now = time.monotonic()
        if not (last or (live and now - state["drawn"] >= 0.1)):
            return
        state["drawn"] = now
        seen = max(int(state["samples"]), 1)
        line = (
            f"epoch {epoch} [{batch:>5}/{batches}] loss {state['loss'] / seen:.4f} "
            f"train acc {100.0 * state['correct'] / seen:5.2f}%"
        )
        out.write(("\r" if live else "") + line + ("\n" if last else ""))
        out.flush()

    return on_batch


class Run:
    """A training run: data, model, gradient estimator and optimizer, epoch by epoch.

    ``preset`` names a recipe (see :func:`presets`); every other training option is a
    keyword argument (``lr=0.02``, ``settle_steps=10``, ``model="cnn"``, ...). Data is a
    named set (``dataset="mnist"``, fetched into the user cache when missing unless
    ``fetch=False``) or arrays: ``x`` float ``[n, ...]`` (features, (h, w) or (c, h, w)
    per sample) with integer labels ``y`` ``[n]``, and ``x_test``/``y_test`` for the
    per-epoch test accuracy, used as given (no normalisation).

    With ``out`` the run records as ``mep train --out`` does (``config.json``,
    ``metrics.jsonl``, ``checkpoint.safetensors`` after every epoch, a lock while it
    runs); ``resume=True`` continues the run stored there. The seed defaults to 42, as
    the CLI's does, so the same options give the same metrics from either.
    """

    def __init__(
        self,
        preset: Optional[str] = None,
        *,
        dataset: Optional[str] = None,
        x: Optional[npt.ArrayLike] = None,
        y: Optional[npt.ArrayLike] = None,
        x_test: Optional[npt.ArrayLike] = None,
        y_test: Optional[npt.ArrayLike] = None,
        classes: Optional[int] = None,
        seed: Optional[int] = None,
        device: str = "cpu",
        out: Optional[PathLike] = None,
        resume: bool = False,
        force: bool = False,
        monitor: Optional[int] = None,
        fetch: bool = True,
        data_dir: Optional[PathLike] = None,
        **options: Any,
    ) -> None:
        if preset is not None:
            options["preset"] = preset
        if dataset is not None:
            options["dataset"] = dataset
        arrays = [x, y, x_test, y_test]
        if any(a is not None for a in arrays) and not all(a is not None for a in arrays):
            raise ValueError("training on arrays needs all four of x, y, x_test and y_test")
        self._run = _native.Run(
            _json_object(options, "training options"),
            seed=seed,
            device=device,
            out=_path(out),
            resume=resume,
            force=force,
            monitor=monitor,
            fetch=fetch,
            data_dir=_path(data_dir),
            x=None if x is None else _inputs(x, "x"),
            y=None if y is None else _labels(y, "y"),
            x_test=None if x_test is None else _inputs(x_test, "x_test"),
            y_test=None if y_test is None else _labels(y_test, "y_test"),
            classes=classes,
        )

    def step(self, on_batch: Optional[BatchCallback] = None) -> Optional[Metrics]:
        """Runs the next epoch and returns its metrics (``None`` once every epoch ran).

        ``on_batch(epoch, batch, batches, loss, correct, samples)`` is called after every
        batch. Training runs without the GIL; Ctrl-C or an exception raised by
        ``on_batch`` stops it between two batches and is raised here. The interrupted
        epoch is not recorded: a run with ``out`` resumes from its last whole epoch.
        """
        text = self._run.step(on_batch)
        if text is None:
            return None
        metrics: Metrics = json.loads(text)
        return metrics

    def fit(
        self,
        callback: Optional[EpochCallback] = None,
        on_batch: Optional[BatchCallback] = None,
        progress: bool = False,
    ) -> List[Metrics]:
        """Runs the remaining epochs; returns every epoch's metrics.

        ``callback(metrics)`` is called after each epoch; a true return value stops the
        run there (early stopping). ``progress=True`` draws a progress line on stderr
        (when no ``on_batch`` is given).
        """
        if on_batch is None and progress:
            on_batch = _progress_bar()
        while True:
            metrics = self.step(on_batch)
            if metrics is None:
                break
            if callback is not None and callback(metrics):
                break
        return self.history

    @property
    def history(self) -> List[Metrics]:
        """Every finished epoch's metrics (a resumed run's stored ones first)."""
        history: List[Metrics] = json.loads(self._run.history())
        return history

    @property
    def config(self) -> Dict[str, Any]:
        """The run's ``config.json``: data, model, sizes, seed, options, resolved recipe."""
        config: Dict[str, Any] = json.loads(self._run.config())
        return config

    @property
    def epochs(self) -> int:
        """Epochs the options ask for."""
        return self._run.epochs

    @property
    def next_epoch(self) -> int:
        """The next epoch to run (1-based)."""
        return self._run.next_epoch

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self._run.seed

    @property
    def out(self) -> Optional[str]:
        """The run directory, if the run records."""
        out = self._run.out
        return None if out is None else os.fspath(out)

    @property
    def network(self) -> Network:
        """A copy of the network as it is now."""
        return self._run.network()

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Accuracy of the run's prediction on ``x`` ``[n, ...]`` with labels ``y``."""
        return self._run.evaluate(_inputs(x, "x"), _labels(y, "y"))

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The run's outputs (logits) for ``x`` ``[n, ...]``: float32 ``[n, classes]``."""
        return self._run.predict(_inputs(x, "x"))

    def save(self, path: PathLike) -> None:
        """Writes a checkpoint (safetensors: ``param/<name>`` tensors, the optimizer's
        state and the run's metadata), atomically."""
        self._run.save(os.fspath(path))

    def close(self) -> int:
        """Ends the run: draws the monitor's charts (with ``out``) and releases the run
        directory. Returns the number of chart files."""
        return self._run.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mep.Run epoch {self.next_epoch - 1}/{self.epochs}, seed {self.seed}>"


def train(
    preset: Optional[str] = None,
    *,
    callback: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    progress: bool = False,
    **kwargs: Any,
) -> Run:
    """Sets up a :class:`Run` with ``kwargs`` and runs every epoch (see :meth:`Run.fit`).

    >>> run = mep.train("smep", dataset="mnist", epochs=2, lr=0.02)   # doctest: +SKIP
    >>> [m["test_accuracy"] for m in run.history]                       # doctest: +SKIP
    """
    run = Run(preset, **kwargs)
    try:
        run.fit(callback, on_batch, progress)
    except BaseException:
        run.close()
        raise
    return run


def check_gradient(
    *,
    seed: Optional[int] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[PathLike] = None,
    **check: Any,
) -> Dict[str, Any]:
    """``mep check-gradient``: an EP gradient against backprop of the same loss on one
    batch. Keywords are the check's settings (``model``, ``dataset``, ``batch``,
    ``beta``, ``nudging``, ``steps``, ``settle_lr``, ``loss``, ``estimator``, ...); the
    report has the CLI's ``--json`` fields (``params``: per-layer ``cosine``,
    ``norm_ratio``, ...)."""
    text = _native.check_gradient(
        _json_object(check, "gradient check options"),
        seed=seed,
        device=device,
        fetch=fetch,
        data_dir=_path(data_dir),
    )
    report: Dict[str, Any] = json.loads(text)
    return report


def run_suite(
    name: str,
    *,
    quick: bool = False,
    seeds: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    out: Optional[PathLike] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """``mep bench NAME`` (``table1``, ``table2``, ``xor``, ``speed``, ``sota``, ``deep``,
    ``conv``, or ``continual``: the five-method continual-learning comparison with its
    defaults): runs the suite and returns its ``results.json``; with ``out`` also writes
    ``results.json``, ``table.md`` and the charts there."""
    text = _native.run_suite(
        name,
        quick=quick,
        seeds=None if seeds is None else [int(s) for s in seeds],
        seed=seed,
        out=_path(out),
        device=device,
        fetch=fetch,
        data_dir=_path(data_dir),
    )
    results: Dict[str, Any] = json.loads(text)
    return results


def continual(
    preset: Optional[str] = None,
    *,
    tasks: int = 10,
    ewc: Union[None, float, Mapping[str, Any]] = None,
    seed: Optional[int] = None,
    out: Optional[PathLike] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[PathLike] = None,
    **options: Any,
) -> Dict[str, Any]:
    """``mep continual``: one model trained on ``tasks`` permuted tasks of the options'
    data set in turn. ``ewc`` is EWC's strength lambda, or a dict of its settings
    (``lambda``, ``decay``, ``fisher_samples``, ``coupling``). Returns the CLI's
    ``--json`` outcome (``accuracy_matrix``, ``average_accuracy``, ``average_forgetting``,
    ``backward_transfer``, ...)."""
    if preset is not None:
        options["preset"] = preset
    ewc_json: Optional[str]
    if ewc is None:
        ewc_json = None
    elif isinstance(ewc, Mapping):
        ewc_json = _json_object(ewc, "EWC options")
    elif isinstance(ewc, (int, float)) and not isinstance(ewc, bool):
        ewc_json = _json_object({"lambda": float(ewc)}, "EWC options")
    else:
        raise TypeError(f"ewc must be a number or a dict of EWC settings, got {type(ewc).__name__}")
    text = _native.continual(
        _json_object(options, "training options"),
        tasks=tasks,
        ewc=ewc_json,
        seed=seed,
        out=_path(out),
        device=device,
        fetch=fetch,
        data_dir=_path(data_dir),
    )
    outcome: Dict[str, Any] = json.loads(text)
    return outcome
