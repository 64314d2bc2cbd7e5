"""A residual CNN with a depthwise block, trained in seconds on scikit-learn's digits (8x8), exported
to ONNX. Shared by pruning tests and the pruning benchmark; fixed seeds, CPU only."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
                                nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        return self.head(self.dw(x))


def digits_split(seed: int = 0):
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])  # train, calib, test


def fit(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch: int) -> None:
    """Adam on cross-entropy, shuffled mini-batches (torch's global seed decides the order).

    Trained in float64, then cast back to float32: float32 training took other kernels (another summation order)
    on an AVX-512 CPU than on an AVX2 one, and its weights drifted apart over the steps, enough to move a test net
    3 images out of 497 across a threshold. In float64 the two orders differ far below float32's precision."""
    opt = torch.optim.Adam(net.double().parameters(), lr=3e-3)
    x_t, y_t = torch.from_numpy(x).double(), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_t))
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_t[idx]), y_t[idx]).backward()
            opt.step()
    net.float().eval()


def export_digits(net: nn.Module, sample: np.ndarray, keep_batchnorm: bool = False) -> onnx.ModelProto:
    """Legacy export with a dynamic batch; keep_batchnorm leaves BatchNormalization nodes for fold-bn."""
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.from_numpy(sample),), buffer, dynamo=False, input_names=["x"],
                      output_names=["logits"], opset_version=17, do_constant_folding=not keep_batchnorm,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def train_digits_net(epochs: int = 10, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    torch.manual_seed(seed)
    (xt, yt), calib, test = digits_split(seed)
    net = DigitsNet()
    fit(net, xt, yt, epochs, batch=64)
    return export_digits(net, test[0][:1]), {"calib": calib, "test": test}


def accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def calibration(x: np.ndarray, batch: int = 100):
    """A re-iterable calibration provider, as PassContext.calibration_data expects."""
    return lambda: ({"x": x[i:i + batch]} for i in range(0, len(x), batch))
