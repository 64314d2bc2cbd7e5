"""Benchmark: INT8 decoders with up-convolutions, irtool's `quant` against ONNX Runtime's quantize_static.

ONNX Runtime's CPU provider has no integer ConvTranspose, so both tools' INT8 models used to run every
up-convolution in float between a DequantizeLinear and a QuantizeLinear. irtool's `quant` now rewrites it as a
Conv over the output phases plus DepthToSpace, or a Reshape/Transpose interleave in 1-D (`convtranspose-to-conv`),
which runs as a QLinearConv. Models and rows: SETUP below (it goes into BENCHMARKS.md with the tables).
Latency: ONNX Runtime CPU, 1 and 2 threads, the four models interleaved, median per round, best of the rounds.

    python bench/deconv_bench.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from _ort_quant import quantize_static_minmax  # noqa: E402
from torch import nn  # noqa: E402

from irtool.api import optimize  # noqa: E402
from irtool.passes.pipelines import QUANT  # noqa: E402

log = logging.getLogger("bench.deconv")
SETUP = ("`unet`: a U-Net at 128x128 (three encoder stages of two conv-BN-ReLU and a max pool; two decoder "
         "stages of a kernel-2 stride-2 ConvTranspose, a skip Concat and two conv-BN-ReLU; a 1x1 head to 4 classes). "
         "`pose_head`: a SimpleBaseline-style pose net at 128x128 (a stride-16 conv backbone, three kernel-4 "
         "stride-2 pads-1 ConvTranspose-BN-ReLU stages, a 1x1 conv to 8 heatmaps). `vocoder`: HiFi-GAN V1's "
         "generator shape at width 128 on 64 mel frames (four ConvTranspose1d upsamplers of kernel 2s, stride s = 8, "
         "8, 2, 2, pads s/2, each after a LeakyReLU and before a residual conv; 16384 samples out). Fixed-seed "
         "weights, torch legacy export, opset 17, batch 1. Rows: float; irtool `quant` with `convtranspose-to-conv` "
         "taken out of the pipeline (what `quant` did before it); irtool `quant`; quantize_static (QDQ, "
         "per-channel, reduce_range, u8 activations x s8 weights, minmax). Both tools calibrate on the same 32 "
         "fixed-seed synthetic inputs (images: smooth noise, ImageNet-normalized; mels: smooth log-mel-like "
         "frames); SQNR on 16 others against the float model. The third column counts float ConvTranspose kernels "
         "and QLinearConv kernels in ONNX Runtime's optimized graph.")
SECTION = "deconv_int8"


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes: int = 4):
        super().__init__()
        a, b, c = widths
        self.enc = nn.ModuleList([nn.Sequential(conv_bn(3, a), conv_bn(a, a)),
                                  nn.Sequential(conv_bn(a, b), conv_bn(b, b)),
                                  nn.Sequential(conv_bn(b, c), conv_bn(c, c))])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c, b, 2, 2), nn.ConvTranspose2d(b, a, 2, 2)])
        self.dec = nn.ModuleList([nn.Sequential(conv_bn(2 * b, b), conv_bn(b, b)),
                                  nn.Sequential(conv_bn(2 * a, a), conv_bn(a, a))])
        self.head = nn.Conv2d(a, classes, 1)

    def forward(self, x):
        s1 = self.enc[0](x)
        s2 = self.enc[1](nn.functional.max_pool2d(s1, 2))
        y = self.enc[2](nn.functional.max_pool2d(s2, 2))
        y = self.dec[0](torch.cat([self.up[0](y), s2], 1))
        y = self.dec[1](torch.cat([self.up[1](y), s1], 1))
        return self.head(y)


class PoseHead(nn.Module):
    def __init__(self, width: int = 64, joints: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 16, 2), conv_bn(16, 32, 2), conv_bn(32, 64, 2), conv_bn(64, 128, 2))
        layers, c = [], 128
        for _ in range(3):
            layers += [nn.ConvTranspose2d(c, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.deconv = nn.Sequential(*layers)
        self.heatmaps = nn.Conv2d(width, joints, 1)

    def forward(self, x):
        return self.heatmaps(self.deconv(self.backbone(x)))


class Vocoder(nn.Module):
    """HiFi-GAN V1's generator shape at width 128: conv_pre, four upsamplers (LeakyReLU, ConvTranspose1d of kernel
    2s, stride s = 8, 8, 2, 2, pads s/2) each followed by a residual LeakyReLU-conv, conv_post and tanh."""

    def __init__(self, width: int = 128, mels: int = 80):
        super().__init__()
        self.pre = nn.Conv1d(mels, width, 7, padding=3)
        ups, res, c = [], [], width
        for stride in (8, 8, 2, 2):
            ups.append(nn.ConvTranspose1d(c, c // 2, 2 * stride, stride, padding=stride // 2))
            c //= 2
            res.append(nn.Conv1d(c, c, 3, padding=1))
        self.ups, self.res = nn.ModuleList(ups), nn.ModuleList(res)
        self.post = nn.Conv1d(c, 1, 7, padding=3)

    def forward(self, x):
        x = self.pre(x)
        for up, res in zip(self.ups, self.res, strict=True):
            x = up(nn.functional.leaky_relu(x, 0.1))
            x = x + res(nn.functional.leaky_relu(x, 0.1))
        return torch.tanh(self.post(nn.functional.leaky_relu(x, 0.1)))


MODELS = {"unet": (UNet, (1, 3, 128, 128)), "pose_head": (PoseHead, (1, 3, 128, 128)),
          "vocoder": (Vocoder, (1, 80, 64))}


def build(name: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    module = factory()
    for m in module.modules():  # trained-like statistics, so that BatchNorm is no identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def images(seed: int, count: int, shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Smooth noise (a coarse grid upsampled 8x), normalized like ImageNet inputs; for [1, mels, frames], log-mel-like
    frames (smooth over time, offset per band)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if len(shape) == 3:
            coarse = rng.uniform(0, 1, (*shape[:-1], shape[-1] // 8)).astype(np.float32)
            bands = np.linspace(0, -4, shape[1], dtype=np.float32).reshape(1, -1, 1)
            frames = np.repeat(coarse, 8, axis=-1) * 2 + bands + rng.normal(0, 0.1, shape).astype(np.float32)
            out.append({"x": frames.astype(np.float32)})
            continue
        coarse = rng.uniform(0, 1, (1, 3, shape[2] // 8, shape[3] // 8)).astype(np.float32)
        image = np.kron(coarse, np.ones((1, 1, 8, 8), np.float32)) + rng.normal(0, 0.05, shape).astype(np.float32)
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
        out.append({"x": ((image - mean) / std).astype(np.float32)})
    return out


def quantize_static_model(proto: onnx.ModelProto, calib: list[dict]) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(proto, src)
        quantize_static_minmax(src, dst, calib)
        return onnx.load(dst)


def session(proto: onnx.ModelProto, threads: int, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def sqnr(reference: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - out) ** 2)))


def kernels(proto: onnx.ModelProto) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(proto, 1, path)
        return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def latencies(models: dict[str, onnx.ModelProto], feeds: dict, threads: int, rounds: int, runs: int) -> dict:
    sessions = {k: session(m, threads) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feeds)
    medians = {k: [] for k in sessions}
    for _ in range(rounds):  # interleaved, so that load from other work hits every model alike
        for k, s in sessions.items():
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                s.run(None, feeds)
                times.append((time.perf_counter() - started) * 1e3)
            medians[k].append(float(np.median(times)))
    return {k: min(v) for k, v in medians.items()}


def bench_model(name: str, rounds: int, runs: int) -> dict:
    proto = build(name)
    shape = MODELS[name][1]
    calib, test = images(0, 32, shape), images(1, 16, shape)
    without = ",".join(p for p in QUANT.split(",") if p != "convtranspose-to-conv")
    started = time.perf_counter()
    models = {"float": proto,
              "irtool quant, ConvTranspose kept": optimize(proto, without, calibration_data=calib).model.to_proto(),
              "irtool quant": optimize(proto, "quant", calibration_data=calib).model.to_proto(),
              "quantize_static": quantize_static_model(proto, calib)}
    log.info("%s: quantized in %.1f s", name, time.perf_counter() - started)
    reference = np.concatenate([session(proto, 2).run(None, t)[0] for t in test])
    rows = {}
    for label, model in models.items():
        out = np.concatenate([session(model, 2).run(None, t)[0] for t in test])
        ops = kernels(model)
        rows[label] = {"sqnr": None if label == "float" else sqnr(reference, out),
                       "conv_transpose": ops["ConvTranspose"], "qlinear_conv": ops["QLinearConv"]}
    for threads in (1, 2):
        log.info("%s: latency, %d thread(s), %d rounds x %d runs", name, threads, rounds, runs)
        for label, ms in latencies(models, test[0], threads, rounds, runs).items():
            rows[label][f"ms{threads}"] = ms
    return rows


def table(name: str, rows: dict) -> str:
    lines = [f"### {name}", "",
             "| model | SQNR dB | float ConvTranspose / QLinearConv in ORT's graph | 1 thread ms (vs quantize_static) "
             "| 2 threads ms (vs quantize_static) |", "|---|---:|---:|---:|---:|"]
    ref = rows["quantize_static"]
    for label, r in rows.items():
        sq = "-" if r["sqnr"] is None else f"{r['sqnr']:.2f}"
        cells = [f"{r[f'ms{t}']:.3f} ({r[f'ms{t}'] / ref[f'ms{t}']:.2f}x)" for t in (1, 2)]
        lines.append(f"| {label} | {sq} | {r['conv_transpose']} / {r['qlinear_conv']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    rounds, runs = (3, 10) if args.quick else (9, 20)
    load = os.getloadavg()
    results = {name: bench_model(name, rounds, runs) for name in MODELS}
    end = os.getloadavg()
    command = os.environ.get("BENCH_COMMAND") or " ".join([".venv/bin/python", "bench/deconv_bench.py", *argv])
    head = [
        "## INT8 decoders: up-convolutions on integers", "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, onnxruntime "
        f"{ort.__version__}; load average {load[0]:.2f} at the start, {end[0]:.2f} at the end  ",
        "Setup: " + SETUP,
        f"Latency: median of {runs} runs per round, best of {rounds} interleaved rounds, batch 1.", ""]
    text = "\n".join(head + [table(name, rows) + "\n" for name, rows in results.items()])
    print(text)
    if not args.no_write:
        from _markdown import write_section

        write_section(SECTION, text)
        log.info("wrote section %r of BENCHMARKS.md", SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
