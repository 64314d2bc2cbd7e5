#!/usr/bin/env python3
"""irtool's main job, end to end, in well under a minute on a laptop CPU:

1. train a small CNN (Conv-BN-ReLU blocks, a residual add, global pooling, Linear) on scikit-learn's
   8x8 digits for a few seconds, with fixed seeds;
2. export it to ONNX with BatchNormalization kept as separate nodes (do_constant_folding=False), as
   many real exports look;
3. optimize it with the command a user runs:
       irtool opt out/cnn.onnx -o out/cnn.opt.onnx --passes cleanup,fold-bn --report out/report.json
       irtool opt out/cnn.onnx -o out/cnn.pruned.int8.onnx --pipeline 'prune{target-macs=0.3,recover=lstsq},quant'
           --calib-data out/calib.npz
4. check that the optimized model is as accurate as the float PyTorch model, and how close its
   outputs are (irtool.backends.ort.compare); then prune 30% of the MACs and quantize to INT8 and
   report the accuracy that survives without any training.

Usage: python examples/quickstart.py [--out DIR] [--epochs N]
Writes DIR/cnn.onnx, DIR/cnn.opt.onnx, DIR/report.json and DIR/quickstart.json (the accuracies).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0


class ConvBnRelu(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvBnRelu(channels, channels), ConvBnRelu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def make_cnn() -> nn.Module:
    return nn.Sequential(ConvBnRelu(1, 16), Residual(16), ConvBnRelu(16, 32, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8 in [0, 1]
    return train_test_split(images, digits.target.astype(np.int64), test_size=0.25, random_state=SEED,
                            stratify=digits.target)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    # In float64, then back to float32: float32 training takes other kernels on other CPUs (AVX2, AVX-512) and
    # trains another net; in float64 their differences stay far below float32's precision.
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.double().parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x).double(), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            optimizer.step()
    model.float().eval()


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def export(model: nn.Module, path: Path) -> None:
    # do_constant_folding=False keeps BatchNormalization nodes (eval-mode folding would fuse them into
    # the convolutions already), so fold-bn has real work to do, as on many exported models.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def irtool_command() -> list[str]:
    """The installed console script beside this Python, as a user would call it."""
    script = Path(sys.executable).parent / "irtool"
    return [str(script)] if script.exists() else [sys.executable, "-m", "irtool"]


def optimize(src: Path, dst: Path, report: Path, *pipeline: str) -> str:
    command = [*irtool_command(), "opt", str(src), "-o", str(dst), *(pipeline or ("--passes", "cleanup,fold-bn")),
               "--report", str(report), "--input-shape", "image:1x1x8x8"]
    print("$", " ".join(["irtool", *command[len(irtool_command()):]]))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"irtool opt failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from irtool.backends.ort import run

    logits = run(path, {"image": x})["logits"]
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # same numbers on every machine, and fast enough for 8x8 images

    x_train, x_test, y_train, y_test = load_data()
    model = make_cnn()
    started = time.perf_counter()
    train(model, x_train, y_train, args.epochs)
    float_acc = torch_accuracy(model, x_test, y_test)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - started:.1f} s on {len(x_train)} digits; "
          f"test accuracy (PyTorch float): {float_acc:.4f}")

    src, dst, report = args.out / "cnn.onnx", args.out / "cnn.opt.onnx", args.out / "report.json"
    export(model, src)
    print(optimize(src, dst, report))

    from irtool.backends.ort import compare

    accuracies = {"torch": float_acc, "onnx": onnx_accuracy(src, x_test, y_test),
                  "onnx_optimized": onnx_accuracy(dst, x_test, y_test)}
    diff = compare(src, dst, feeds={"image": x_test}).to_dict()["outputs"]["logits"]
    print(f"test accuracy: onnx {accuracies['onnx']:.4f}, optimized onnx {accuracies['onnx_optimized']:.4f}")
    sqnr = diff["sqnr_db"] if isinstance(diff["sqnr_db"], str) else f"{diff['sqnr_db']:.1f}"  # "inf" if equal
    print(f"optimized vs original on the test set: max_abs={diff['max_abs']:.3g} sqnr={sqnr} dB "
          f"cosine={diff['cosine']:.6f} top1_agreement={diff['top1_agreement']:.4f}")

    # The mission's one-liner: remove 30% of the MACs (least-squares recovery, no training), then INT8.
    calib = args.out / "calib.npz"
    np.savez(calib, image=x_train[:256])
    small = args.out / "cnn.pruned.int8.onnx"
    print(optimize(src, small, args.out / "report.pruned.int8.json", "--pipeline",
                   "prune{target-macs=0.3,recover=lstsq},quant", "--calib-data", str(calib)))
    accuracies["onnx_pruned_int8"] = onnx_accuracy(small, x_test, y_test)
    print(f"test accuracy: pruned + INT8 onnx {accuracies['onnx_pruned_int8']:.4f} "
          f"(float {accuracies['onnx']:.4f}); file {small.stat().st_size / 1024:.1f} KiB "
          f"vs {src.stat().st_size / 1024:.1f} KiB")
    (args.out / "quickstart.json").write_text(json.dumps({"accuracy": accuracies, "compare": diff},
                                                         indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
