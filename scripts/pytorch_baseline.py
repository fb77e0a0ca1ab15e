#!/usr/bin/env python3
"""PyTorch reference timing for `mep bench speed`'s backprop rows.

Trains the same MLP as `mep bench speed` (784-256-128-10, ReLU, He-initialised), with the
same loss (cross-entropy), batch (64), data (full MNIST, pixels / 255) and optimizers as
mep's `sgd` preset (SGD, lr 0.1, momentum 0.9) and `adam` preset (Adam, lr 1e-3), for one
epoch, and prints one JSON object per optimizer: the seconds of the training loop (as mep's
`seconds`: batches drawn, forward, backward, step; evaluation not included) and the test
accuracy after the epoch.

Needs `torch` and `numpy` (`pip install torch numpy`); reads the gzipped IDX files from
`$MEP_DATA_DIR/mnist` (default `../shared/data`). Usage:

    python3 scripts/pytorch_baseline.py --threads 1
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


def load(root):
    def part(images, labels):
        x = read_idx(os.path.join(root, images)).reshape(-1, 784).astype(np.float32) / 255.0
        y = read_idx(os.path.join(root, labels)).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    return (
        part("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        part("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    )


def model():
    net = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    return net


def epoch(name, train, test, batch, seed):
    torch.manual_seed(seed)
    net = model()
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
        "optimizer": name,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "epoch_seconds": seconds,
        "test_accuracy": accuracy,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per optimizer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = os.path.join(os.environ.get("MEP_DATA_DIR", "../shared/data"), "mnist")
    train, test = load(root)
    for name in ("sgd", "adam"):
        for r in range(args.repeats):
            print(json.dumps(epoch(name, train, test, args.batch, args.seed + r)), flush=True)


if __name__ == "__main__":
    main()
