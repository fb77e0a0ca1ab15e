#!/usr/bin/env python3
"""PyTorch reference timing for `mep bench speed`'s backprop rows and `mep bench muon`.

Trains the same model as mep (`--model mlp`: 784-256-128-10; `cnn`:
conv32k5-pool2-conv64k5-pool2-fc10; `vgg5-small`: four 3x3 convolutions with padding 1 and
16-32-64-64 channels, each followed by ReLU and 2x2 max pooling, then fc10; ReLU,
He-initialised), with the same loss (cross-entropy), batch (64), data (MNIST, pixels / 255;
`--train-samples N` for the first N) and optimizers as mep's `sgd` preset (SGD, lr 0.1,
momentum 0.9) and `adam` preset (Adam, lr 1e-3), for one epoch, and prints one JSON object
per optimizer and repeat: the seconds of the training loop (as mep's `seconds`: batches
drawn, forward, backward, step; evaluation not included) and the test accuracy after the
epoch. `--newton-schulz` instead times the textbook Newton-Schulz iteration (5 quintic
steps, as Keller Jordan's Muon, and 5 cubic steps, as the paper's reference) on the weight
matrices of 784-256-128-10, the work of one Muon update. `--gemm [MxKxN,...]` times
`torch.matmul` on the shapes of `mep bench gemm` (its default list without a value) and
prints one JSON object per shape with its GFLOP/s (the median of `--repeats` x 10 runs).

Needs `torch` and `numpy` (`pip install torch numpy`); reads the gzipped IDX files from
`$MEP_DATA_DIR/mnist` (default `../shared/data`). Usage:

    python3 scripts/pytorch_baseline.py --threads 1
    python3 scripts/pytorch_baseline.py --threads 1 --model cnn --train-samples 10000
    python3 scripts/pytorch_baseline.py --threads 1 --newton-schulz
    python3 scripts/pytorch_baseline.py --threads 1 --gemm
"""

import argparse
import gzip
import json
import os
import time

import numpy as np
import torch


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(root, image):
    def part(images, labels):
        x = read_idx(os.path.join(root, images)).astype(np.float32) / 255.0
        x = x.reshape(-1, 1, 28, 28) if image else x.reshape(-1, 784)
        y = read_idx(os.path.join(root, labels)).astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    return (
        part("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        part("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    )


def model(name):
    nn = torch.nn
    if name == "mlp":
        layers = [nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)]
    elif name == "cnn":
        layers = [
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        ]
    elif name == "vgg5-small":
        layers, c, side = [], 1, 28
        for out in (16, 32, 64, 64):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, side = out, side // 2
        layers += [nn.Flatten(), nn.Linear(c * side * side, 10)]
    else:
        raise SystemExit(f"unknown --model {name} (mlp, cnn, vgg5-small)")
    net = nn.Sequential(*layers)
    for layer in net:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return net


def newton_schulz(g, steps, quintic):
    """The textbook iteration on the wide orientation, after Frobenius normalisation."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        if quintic:
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * (a @ a)) @ x
        else:
            x = 1.5 * x - 0.5 * (a @ x)
    return x.T if g.shape[0] > g.shape[1] else x


def muon_timing(repeats):
    torch.manual_seed(0)
    mats = [torch.randn(784, 256), torch.randn(256, 128), torch.randn(128, 10)]
    for quintic in (True, False):
        times = []
        for _ in range(max(repeats, 1) * 10):
            start = time.perf_counter()
            for m in mats:
                newton_schulz(m, 5, quintic)
            times.append(time.perf_counter() - start)
        times.sort()
        print(json.dumps({
            "framework": "pytorch",
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "iteration": "quintic" if quintic else "cubic",
            "update_ms": 1e3 * times[len(times) // 2],
        }), flush=True)


def epoch(name, arch, train, test, batch, seed):
    torch.manual_seed(seed)
    net = model(arch)
    if name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = train
    order = torch.randperm(len(x))
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        idx = order[i : i + batch]
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        tx, ty = test
        accuracy = (net(tx).argmax(1) == ty).float().mean().item()
    return {
        "framework": "pytorch",
        "version": torch.__version__,
        "model": arch,
        "optimizer": name,
        "threads": torch.get_num_threads(),
        "train_samples": len(x),
        "batch": batch,
        "epoch_seconds": seconds,
        "test_accuracy": accuracy,
    }


# `mep bench gemm`'s default shapes: the settle products of 784-256-128-10 at batch 64,
# Newton-Schulz's 256 x 784 Gram products and a 1024^3 product.
GEMM_SHAPES = "64x784x256,64x256x128,64x128x256,256x784x256,256x256x256,256x256x784,1024x1024x1024"


def gemm_timing(shapes, repeats):
    torch.manual_seed(0)
    for shape in shapes.split(","):
        m, k, n = (int(v) for v in shape.lower().split("x"))
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        for _ in range(3):
            torch.matmul(a, b, out=out)
        times = []
        for _ in range(max(repeats, 1) * 10):
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - start)
        times.sort()
        seconds = times[len(times) // 2]
        print(json.dumps({
            "framework": "pytorch",
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "shape": f"{m}x{k}x{n}",
            "gflops": 2.0 * m * k * n / seconds / 1e9,
        }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per optimizer")
    p.add_argument("--model", default="mlp", help="mlp, cnn or vgg5-small")
    p.add_argument("--train-samples", type=int, default=None, help="the first N training images")
    p.add_argument("--newton-schulz", action="store_true", help="time one Muon update instead")
    p.add_argument("--gemm", nargs="?", const=GEMM_SHAPES, default=None, metavar="MxKxN,...",
                   help="time torch.matmul on these shapes instead (default: mep bench gemm's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.gemm is not None:
        gemm_timing(args.gemm, args.repeats)
        return
    if args.newton_schulz:
        muon_timing(args.repeats)
        return
    root = os.path.join(os.environ.get("MEP_DATA_DIR", "../shared/data"), "mnist")
    (x, y), test = load(root, image=args.model != "mlp")
    if args.train_samples is not None:
        x, y = x[: args.train_samples], y[: args.train_samples]
    for name in ("sgd", "adam"):
        for r in range(args.repeats):
            print(json.dumps(epoch(name, args.model, (x, y), test, args.batch, args.seed + r)), flush=True)


if __name__ == "__main__":
    main()
