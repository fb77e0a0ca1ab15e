"""Type stubs of ``mep._native``, the compiled binding (checked against it in CI with
``python -m mypy.stubtest mep._native``)."""

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt
from typing_extensions import final

__all__ = [
    "MepError",
    "Network",
    "Run",
    "set_threads",
    "threads",
    "simd_level",
    "set_simd_level",
    "presets",
    "datasets",
    "load_dataset",
    "check_gradient",
    "run_suite",
    "continual",
    "__version__",
]

__version__: str

class MepError(RuntimeError):
    """A run failed for a reason other than a bad argument (divergence, a corrupt file, a device)."""

@final
class Network:
    """A network built from a model spec, with its parameters as numpy arrays by name."""

    def __new__(
        cls,
        spec: str,
        input_shape: Optional[List[int]] = None,
        seed: Optional[int] = None,
    ) -> "Network": ...
    @staticmethod
    def load(path: str, input_shape: Optional[List[int]] = None) -> "Network": ...
    @property
    def spec(self) -> str: ...
    @property
    def input_shape(self) -> Tuple[int, int, int]: ...
    @property
    def outputs(self) -> int: ...
    @property
    def num_params(self) -> int: ...
    def param_names(self) -> List[str]: ...
    def params(self) -> Dict[str, npt.NDArray[np.float32]]: ...
    def set_params(self, params: Dict[str, npt.NDArray[np.float32]]) -> None: ...
    def forward(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

@final
class Run:
    """A training run (wrapped by ``mep.Run``)."""

    def __new__(
        cls,
        options: str,
        seed: Optional[int] = None,
        device: str = "cpu",
        out: Optional[str] = None,
        resume: bool = False,
        force: bool = False,
        monitor: Optional[int] = None,
        fetch: bool = True,
        data_dir: Optional[str] = None,
        x: Optional[npt.NDArray[np.float32]] = None,
        y: Optional[npt.NDArray[np.int64]] = None,
        x_test: Optional[npt.NDArray[np.float32]] = None,
        y_test: Optional[npt.NDArray[np.int64]] = None,
        classes: Optional[int] = None,
    ) -> "Run": ...
    def step(
        self, on_batch: Optional[Callable[[int, int, int, float, int, int], Any]] = None
    ) -> Optional[str]: ...
    def history(self) -> str: ...
    def config(self) -> str: ...
    @property
    def epochs(self) -> int: ...
    @property
    def next_epoch(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def out(self) -> Optional[str]: ...
    def network(self) -> Network: ...
    def evaluate(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float: ...
    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
    def save(self, path: str) -> None: ...
    def close(self) -> int: ...

def set_threads(threads: int) -> None: ...
def threads() -> int: ...
def simd_level() -> str: ...
def set_simd_level(level: str) -> str: ...
def presets() -> List[str]: ...
def datasets() -> str: ...
def load_dataset(
    options: str,
    seed: Optional[int] = None,
    fetch: bool = True,
    data_dir: Optional[str] = None,
) -> Tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]
]: ...
def check_gradient(
    check: str,
    seed: Optional[int] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[str] = None,
) -> str: ...
def run_suite(
    name: str,
    quick: bool = False,
    seeds: Optional[List[int]] = None,
    seed: Optional[int] = None,
    out: Optional[str] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[str] = None,
) -> str: ...
def continual(
    options: str,
    tasks: int = 10,
    ewc: Optional[str] = None,
    seed: Optional[int] = None,
    out: Optional[str] = None,
    device: str = "cpu",
    fetch: bool = True,
    data_dir: Optional[str] = None,
) -> str: ...
