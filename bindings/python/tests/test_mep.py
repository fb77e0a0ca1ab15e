"""Tests of the Python package against independent references: the `mep` CLI on the same
settings (metrics identical), plain numpy (forward passes, accuracy), safetensors'
own reader, and the library's own error messages."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file

import mep
from conftest import cli, cli_json_lines, data_dir, mnist_arrays, without_timing

# A small MNIST run: a few seconds on one thread.
SMALL = dict(dataset="mnist", train_samples=1000, test_samples=500, fetch=False)
SMALL_FLAGS = ["--dataset", "mnist", "--train-samples", "1000", "--test-samples", "500", "--no-fetch"]


def run_kwargs(**extra: Any) -> Dict[str, Any]:
    return {**SMALL, "data_dir": data_dir(), **extra}


def relu_mlp(params: Dict[str, npt.NDArray[np.float32]], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """fc-relu-...-fc in float64 numpy, with mep's layout (weights [in, out], biases [1, n])."""
    layers = sorted({name.split(".")[0] for name in params}, key=lambda n: int(n[2:]))
    h = x.reshape(len(x), -1)
    for i, layer in enumerate(layers):
        h = h @ params[f"{layer}.weight"].astype(np.float64) + params[f"{layer}.bias"].astype(np.float64)
        if i + 1 < len(layers):
            h = np.maximum(h, 0.0)
    return h


def test_parameters_round_trip_through_numpy() -> None:
    net = mep.Network("784-64-32-10", seed=3)
    params = net.params()
    assert list(params) == net.param_names() == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert params["fc1.weight"].shape == (784, 64) and params["fc1.weight"].dtype == np.float32
    assert params["fc3.bias"].shape == (1, 10)
    assert net.num_params == sum(p.size for p in params.values())
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    net.set_params(new)
    back = net.params()
    for k in new:
        np.testing.assert_array_equal(back[k], new[k])
    # The same seed builds the same network; another seed another one.
    np.testing.assert_array_equal(mep.Network("784-64-32-10", seed=3).params()["fc1.weight"], params["fc1.weight"])
    assert not np.array_equal(mep.Network("784-64-32-10", seed=4).params()["fc1.weight"], params["fc1.weight"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"fc9.weight": np.zeros((2, 2), np.float32)}, "no parameter `fc9.weight`"),
        ({"fc1.weight": np.zeros((2, 2), np.float32)}, "has shape [784, 64], the array [2, 2]"),
        ({"fc1.bias": np.full((1, 64), np.nan, np.float32)}, "non-finite"),
    ],
)
def test_set_params_refuses_bad_arrays_and_changes_nothing(bad: Dict[str, Any], message: str) -> None:
    net = mep.Network("784-64-10")
    before = net.params()
    # A valid array first: it must not be applied either.
    update = {"fc2.bias": np.ones((1, 10), np.float32), **bad}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        net.set_params(update)
    after = net.params()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_forward_equals_a_numpy_forward_pass() -> None:
    net = mep.Network("784-64-32-10", seed=7)
    x = np.random.default_rng(1).random((16, 28, 28), dtype=np.float32)
    ours = net.forward(x)
    reference = relu_mlp(net.params(), x.astype(np.float64))
    assert ours.shape == (16, 10)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit the network's input"):
        net.forward(np.zeros((2, 10), np.float32))


def test_a_model_without_input_size_needs_an_input_shape() -> None:
    with pytest.raises(ValueError, match="pass input_shape"):
        mep.Network("cnn-small")
    net = mep.Network("cnn-small", input_shape=[1, 28, 28])
    assert net.input_shape == (1, 28, 28) and net.outputs == 10
    with pytest.raises(ValueError):
        mep.Network("784-oops-10")


def test_a_python_run_equals_the_cli_run_with_the_same_seed(tmp_path: Path) -> None:
    py_dir, cli_dir = tmp_path / "py", tmp_path / "cli"
    run = mep.train("smep", epochs=2, seed=5, out=py_dir, **run_kwargs())
    from_cli = cli_json_lines("--seed", "5", "train", "--preset", "smep", "--epochs", "2", *SMALL_FLAGS, "--out", str(cli_dir), "--json")
    assert len(run.history) == 2
    assert without_timing(run.history) == without_timing(from_cli)
    # The recorded files agree too: metrics, options, and the trained weights to the bit.
    lines = [json.loads(line) for line in (py_dir / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(lines) == without_timing(from_cli)
    py_config = json.loads((py_dir / "config.json").read_text())
    cli_config = json.loads((cli_dir / "config.json").read_text())
    assert py_config["options"] == cli_config["options"] == run.config["options"]
    ours = load_file(str(py_dir / "checkpoint.safetensors"))
    theirs = load_file(str(cli_dir / "checkpoint.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])
    run.close()


def test_resuming_from_python_continues_the_run_exactly(tmp_path: Path) -> None:
    straight = mep.train("smep", epochs=2, **run_kwargs()).history
    first = mep.train("smep", epochs=1, out=tmp_path, **run_kwargs())
    first.close()
    resumed = mep.Run(out=tmp_path, resume=True, epochs=2, data_dir=data_dir(), fetch=False)
    assert resumed.next_epoch == 2
    resumed.fit()
    assert without_timing(resumed.history) == without_timing(straight)
    # A changed option is refused with the library's message.
    resumed.close()
    with pytest.raises(ValueError, match="options other than epochs must match"):
        mep.Run(out=tmp_path, resume=True, lr=0.5, data_dir=data_dir(), fetch=False)


def test_exported_weights_evaluated_with_numpy_give_the_reported_accuracy() -> None:
    x, y, xt, yt = mnist_arrays(2000, 500)
    run = mep.train("smep", x=x, y=y, x_test=xt, y_test=yt, model="784-64-10", epochs=1)
    reported = run.history[-1]["test_accuracy"]
    assert reported > 0.7, reported  # measured 0.83: it learned
    logits = relu_mlp(run.network.params(), xt.astype(np.float64))
    numpy_accuracy = float(np.mean(np.argmax(logits, axis=1) == yt))
    # float64 numpy against float32 products: equal unless a sample sits on a near-tie.
    assert abs(numpy_accuracy - reported) <= 1 / len(yt), (numpy_accuracy, reported)
    assert run.evaluate(xt, yt) == reported
    np.testing.assert_allclose(run.predict(xt[:8]), logits[:8], rtol=1e-3, atol=1e-3)
    assert run.config["dataset"] == "arrays"


def test_arrays_shape_the_inputs_and_images_train_a_conv_net() -> None:
    x, y, xt, yt = mnist_arrays(256, 128)
    run = mep.Run(
        x=x[:, None, :, :], y=y, x_test=xt[:, None, :, :], y_test=yt,
        model="conv4k5-pool2-fc10", preset="adam", epochs=1,
    )
    metrics = run.step()
    assert metrics is not None and metrics["epoch"] == 1
    assert run.network.input_shape == (1, 28, 28)
    assert run.step() is None


def test_checkpoints_are_readable_by_safetensors_numpy_and_load_as_networks(tmp_path: Path) -> None:
    run = mep.train("adam", model="784-32-10", epochs=1, **run_kwargs())
    path = tmp_path / "model.safetensors"
    run.save(path)
    tensors = load_file(str(path))
    params = run.network.params()
    for name, value in params.items():
        np.testing.assert_array_equal(tensors[f"param/{name}"], value)
    loaded = mep.Network.load(str(path))
    assert loaded.spec == "784-32-10"
    for name, value in loaded.params().items():
        np.testing.assert_array_equal(value, params[name])
    with pytest.raises(mep.MepError, match="not a checkpoint|not a mep checkpoint"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not safetensors")
        mep.Network.load(str(bad))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": "fast"}, ValueError, "`lr`: invalid type: string \"fast\", expected f64"),
        ({"bogus": 1}, ValueError, "unknown field `bogus`"),
        ({"preset": "nope"}, ValueError, "unknown preset `nope` \\(expected one of: smep"),
        ({"epochs": 0}, ValueError, "--epochs must be at least 1"),
        ({"model": "784-oops-10"}, ValueError, "oops"),
        ({"dataset": "imagenet"}, ValueError, "imagenet"),
        ({"lr": object()}, TypeError, "training options"),
        ({"standardize": "dataset", "x": np.zeros((4, 2)), "y": [0, 1, 0, 1], "x_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1]}, ValueError, "standardize does not apply to a run on arrays"),
        ({"x": np.zeros((4, 2)), "y": [0.5, 1, 0, 1], "x_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1]}, TypeError, "integer class labels"),
        ({"x": np.zeros((4, 2)), "y": [0, 1, 0], "x_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1]}, ValueError, "4 inputs but 3 labels"),
        ({"x": np.zeros((4, 2)), "y": [0, -1, 0, 1], "x_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1]}, ValueError, "negative"),
        ({"x": np.full((4, 2), np.inf), "y": [0, 1, 0, 1], "x_test": np.zeros((4, 2)), "y_test": [0, 1, 0, 1]}, ValueError, "non-finite"),
        ({"x": np.zeros((4, 2)), "y": [0, 1, 0, 1]}, ValueError, "all four of x, y, x_test and y_test"),
        ({"device": "tpu"}, ValueError, "tpu"),
    ],
)
def test_invalid_arguments_raise_the_library_message_and_write_nothing(
    tmp_path: Path, kwargs: Dict[str, Any], error: type, message: str
) -> None:
    out = tmp_path / "run"
    base = {"data_dir": data_dir(), "fetch": False, "out": out, "model": "2-4-2" if "x" in kwargs else None}
    args = {k: v for k, v in {**base, **kwargs}.items() if v is not None}
    with pytest.raises(error, match=message):
        mep.Run(**args)
    assert not out.exists()


def test_an_epoch_callback_stops_the_run_early(tmp_path: Path) -> None:
    seen: List[int] = []

    def stop_after_first(metrics: Dict[str, Any]) -> bool:
        seen.append(metrics["epoch"])
        return True

    run = mep.train("adam", epochs=3, callback=stop_after_first, out=tmp_path, **run_kwargs())
    assert seen == [1] and len(run.history) == 1 and run.next_epoch == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_exception_in_on_batch_stops_between_batches_and_the_epoch_is_not_recorded(tmp_path: Path) -> None:
    calls: List[int] = []

    def on_batch(epoch: int, batch: int, batches: int, loss: float, correct: int, samples: int) -> None:
        calls.append(batch)
        assert batches == 16 and samples == 64 and loss > 0
        if batch == 3:
            raise RuntimeError("enough")

    run = mep.Run("adam", epochs=1, out=tmp_path, **run_kwargs())
    with pytest.raises(RuntimeError, match="enough"):
        run.step(on_batch)
    assert calls == [1, 2, 3]
    assert run.history == [] and not (tmp_path / "checkpoint.safetensors").exists()


def test_ctrl_c_stops_training_between_batches() -> None:
    run = mep.Run("smep", epochs=1, data_dir=data_dir(), dataset="mnist", fetch=False)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run.step()
    finally:
        # Whatever failed, no interrupt may land in a later test.
        timer.cancel()
    # A full epoch of 60k samples takes about 10 s here; the interrupt lands within a batch.
    assert time.monotonic() - start < 3.0
    assert run.history == []


def test_training_releases_the_gil() -> None:
    ticks = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1

    # A daemon, stopped in `finally`: a failure before `stop.set()` must not leave a thread
    # spinning that keeps the interpreter, and so the whole test run, alive.
    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        rate = ticks[0] / 0.2
        run = mep.Run("smep", epochs=1, **run_kwargs())
        before, start = ticks[0], time.monotonic()
        run.step()
        during, seconds = ticks[0] - before, time.monotonic() - start
    finally:
        stop.set()
        thread.join()
    # Holding the GIL, the counter could run for one switch interval (5 ms) at most; here
    # it keeps a good part of its idle rate through the whole epoch.
    assert seconds > 0.1 and during > 0.2 * rate * seconds, (during, rate, seconds)


def test_check_gradient_reports_what_the_cli_reports() -> None:
    settings: Dict[str, Any] = dict(model="784-32-10", batch=8, steps=60, beta=0.05)
    ours = mep.check_gradient(data_dir=data_dir(), fetch=False, seed=3, **settings)
    theirs = json.loads(cli("--seed", "3", "check-gradient", "--model", "784-32-10", "--batch", "8", "--steps", "60", "--beta", "0.05", "--no-fetch", "--json"))
    assert ours == theirs
    assert [p["name"] for p in ours["params"]] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert min(p["cosine"] for p in ours["params"]) > 0.95
    with pytest.raises(ValueError, match="unknown option `stepz`"):
        mep.check_gradient(stepz=3)
    with pytest.raises(ValueError, match="`batch`"):
        mep.check_gradient(batch="eight")


def test_a_suite_runs_as_the_cli_runs_it(tmp_path: Path) -> None:
    ours = mep.run_suite("xor", quick=True, out=tmp_path, data_dir=data_dir(), fetch=False)
    theirs = json.loads(cli("bench", "xor", "--quick", "--out", str(tmp_path / "cli"), "--no-fetch", "--json"))

    def key(r: Dict[str, Any]) -> Any:
        return (r["setting"], r["label"], r["seed"])

    ours_runs = {key(r): r["final_test_accuracy"] for r in ours["runs"]}
    theirs_runs = {key(r): r["final_test_accuracy"] for r in theirs["runs"]}
    assert ours_runs == theirs_runs and len(ours_runs) >= 2
    assert (tmp_path / "results.json").exists() and (tmp_path / "table.md").exists()
    with pytest.raises(ValueError, match="unknown suite `tabel1`"):
        mep.run_suite("tabel1")


def test_continual_learning_matches_the_cli(tmp_path: Path) -> None:
    opts: Dict[str, Any] = dict(train_samples=300, test_samples=200, epochs=1, model="784-32-10")
    ours = mep.continual("adam", tasks=2, ewc=10.0, data_dir=data_dir(), fetch=False, **opts)
    theirs = json.loads(cli("continual", "--preset", "adam", "--tasks", "2", "--ewc", "10", "--train-samples", "300", "--test-samples", "200", "--epochs", "1", "--model", "784-32-10", "--out", str(tmp_path), "--no-fetch", "--json"))
    for field in ("accuracy_matrix", "average_accuracy", "average_forgetting", "backward_transfer", "method"):
        assert ours[field] == theirs[field], field
    assert len(ours["accuracy_matrix"]) == 2
    with pytest.raises(TypeError, match="ewc must be a number"):
        mep.continual("adam", ewc="strong")  # type: ignore[arg-type]


def test_a_progress_line_per_epoch_in_a_log() -> None:
    import io

    log = io.StringIO()
    run = mep.Run("adam", epochs=2, **run_kwargs())
    run.fit(on_batch=mep._progress_bar(log))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1 [   16/16] loss "), lines


def test_weights_evaluated_in_a_torch_sequential_give_the_reported_accuracy() -> None:
    """The README's PyTorch example on a small run (skipped where torch is not installed:
    the package does not depend on it, and CI does not install it)."""
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import torch
    from torch_export import to_torch

    run = mep.train("smep", epochs=1, **run_kwargs())
    _, _, x_test, y_test = mep.load_dataset(
        "mnist", standardize=run.config["options"]["standardize"], test_samples=500,
        data_dir=data_dir(), fetch=False,
    )
    with torch.no_grad():
        predicted = to_torch(run.network)(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    assert abs(float(np.mean(predicted == y_test)) - run.history[-1]["test_accuracy"]) <= 1 / 500


def test_the_continual_comparison_runs_as_the_cli_runs_it(tmp_path: Path) -> None:
    ours = mep.run_suite("continual", quick=True, data_dir=data_dir(), fetch=False)
    theirs = json.loads(cli("bench", "continual", "--quick", "--out", str(tmp_path), "--no-fetch", "--json"))

    def accuracies(results: Dict[str, Any]) -> Dict[str, Any]:
        return {r["method"]: r["accuracy_matrix"] for r in results["runs"]}

    assert accuracies(ours) == accuracies(theirs)
    assert len(accuracies(ours)) == 5


def test_the_vector_width_can_be_capped_and_every_width_trains_the_same_model() -> None:
    widest = mep.simd_level()
    try:
        assert mep.set_simd_level("baseline") == "baseline"
        assert mep.simd_level() == "baseline"
        narrow = mep.train("smep", epochs=1, seed=3, **run_kwargs(train_samples=300))
        assert mep.set_simd_level(widest) == widest
        wide = mep.train("smep", epochs=1, seed=3, **run_kwargs(train_samples=300))
        assert without_timing(narrow.history) == without_timing(wide.history)
        narrow.close()
        wide.close()
        with pytest.raises(ValueError, match="unknown SIMD level `sse9`"):
            mep.set_simd_level("sse9")
    finally:
        mep.set_simd_level(widest)
    # A misspelt MEP_SIMD stops the import with the accepted names, rather than being ignored.
    import subprocess
    import sys

    bad = subprocess.run(
        [sys.executable, "-c", "import mep"],
        env={**os.environ, "MEP_SIMD": "sse9"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0
    assert "MEP_SIMD=sse9 names no level: use baseline, avx2 or avx512" in bad.stderr
