"""Train with EP from Python, then evaluate the trained weights in PyTorch.

    python examples/torch_export.py            # full MNIST, one epoch of smep

mep stores a linear layer's weight as [in, out] (PyTorch: [out, in]) and a bias as
[1, n] (PyTorch: [n]); the test accuracy in PyTorch equals the one mep reports.
"""

import sys

import numpy as np
import torch

import mep


def to_torch(net: mep.Network) -> torch.nn.Sequential:
    """A fc-relu-...-fc network of mep as a torch.nn.Sequential with the same weights."""
    params = net.params()
    names = [n[: -len(".weight")] for n in net.param_names() if n.endswith(".weight")]
    layers: list = [torch.nn.Flatten()]
    for i, name in enumerate(names):
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b[0]))
        layers.append(linear)
        if i + 1 < len(names):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def main(train_samples=None) -> None:
    run = mep.train("smep", dataset="mnist", epochs=1, train_samples=train_samples, progress=True)
    reported = run.history[-1]["test_accuracy"]
    # The inputs the run read: smep standardises with the data set's mean and std.
    _, _, x_test, y_test = mep.load_dataset("mnist", standardize=run.config["options"]["standardize"])
    model = to_torch(run.network)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float(np.mean(predicted == y_test))
    print(f"mep reports {100 * reported:.2f}%, PyTorch measures {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
