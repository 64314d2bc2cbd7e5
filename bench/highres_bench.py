"""Benchmark: INT8 of a high-resolution net, peak memory and time, irtool's `quant` against quantize_static.

A camera's segmentation net keeps hundreds of MB of activations per sample, and ONNX Runtime's working memory
grows with the batch it runs. irtool picks the calibration batch so that a batch keeps at most 1 GiB of live
activations (irtool/calibration/data.py), and bounds the values `bias-correct{mode=empirical}` keeps between
layers (`memory-mb`, default 1024). Rows: what irtool did before both (batches of 16, no bound), what it does now,
and quantize_static (minmax, whose calibrator reduces in the graph) reading batches of 16 and of the size irtool
picks. Each row runs in a fresh process; peak RSS = its VmHWM. Model and data: SETUP below.

    python bench/highres_bench.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import numpy as np  # noqa: E402
from _markdown import write_section  # noqa: E402
from _proc import peak_rss_mb  # noqa: E402

log = logging.getLogger("bench.highres")
SECTION = "highres_int8"
SIZE, WIDTHS, SAMPLES, EVAL = 512, (32, 64, 128), 64, 8
PLAIN = "cleanup,fold-bn,convtranspose-to-conv,calibrate{method=minmax},insert-qdq{profile=ort-cpu}"
SETUP = (f"bench/deconv_bench.py's U-Net (three encoder stages of two conv-BN-ReLU, two ConvTranspose decoder "
         f"stages with skip Concats, a 1x1 head to 4 classes) at widths {WIDTHS} on {SIZE}x{SIZE} images, "
         "fixed-seed weights, torch legacy export with a dynamic batch, opset 17. Calibration: the first "
         f"{SAMPLES} of fixed-seed smooth-noise images (ImageNet-normalized, made as they are read, so no row "
         f"holds the set); SQNR on {EVAL} others against the float model. quantize_static: QDQ, per-channel, "
         "reduce_range, u8 activations x s8 weights, minmax, a CalibrationDataReader over the same images. "
         "`quant` runs the empirical bias correction and the min-sqnr=20 check (bias-correct s), which "
         "quantize_static has no counterpart of; the plain recipe row is the like-for-like one.")


def build(path: Path) -> None:
    import io
    import warnings

    import onnx
    import torch
    from deconv_bench import UNet

    torch.manual_seed(0)
    module = UNet(WIDTHS)
    for m in module.modules():  # trained-like statistics, so that BatchNorm is no identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 3, SIZE, SIZE),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    onnx.save(onnx.load_from_string(buffer.getvalue()), path)


def image(seed: int) -> np.ndarray:
    """[3, SIZE, SIZE] smooth noise (a coarse grid upsampled 8x plus fine noise), normalized like ImageNet."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (3, SIZE // 8, SIZE // 8)).astype(np.float32)
    picture = np.kron(coarse, np.ones((1, 8, 8), np.float32)) + rng.normal(0, 0.05, (3, SIZE, SIZE))
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    return ((picture - mean) / std).astype(np.float32)


def batches(first: int, count: int, batch: int):
    for start in range(first, first + count, batch):
        yield {"x": np.stack([image(i) for i in range(start, min(first + count, start + batch))])}


# ------------------------------------------------------------------------------------------ workers
def work_irtool(spec: dict) -> dict:
    import onnx

    from irtool.api import optimize
    from irtool.calibration.data import as_calibration_data
    from irtool.ir.model import Model

    batch = spec.get("batch")
    data = lambda: ({"x": image(i)} for i in range(SAMPLES))  # noqa: E731
    started = time.perf_counter()
    result = optimize(onnx.load(spec["model"]), spec["pipeline"], calib_batch_size=batch, calibration_data=data)
    seconds = time.perf_counter() - started
    # The batch optimize() took: the same choice, made again outside the timing.
    chosen = as_calibration_data(data, Model.load(spec["model"]), batch_size=batch).batch_size
    result.model.save(spec["out"])
    records = {r.name: r for r in result.records}
    bias = records["bias-correct"].stats if "bias-correct" in records else {}
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "calibrate_s": records["calibrate"].seconds,
            "bias_correct_s": records["bias-correct"].seconds if bias else None,
            "samples_last": bias.get("samples_last"), "quantized": "insert-qdq" in result.pipeline_text,
            "batch": chosen}


def work_ort(spec: dict) -> dict:
    from _ort_quant import quantize_static_minmax

    started = time.perf_counter()
    quantize_static_minmax(spec["model"], spec["out"], batches(0, SAMPLES, spec["batch"]))
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def work_float(spec: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    for feeds in batches(0, SAMPLES, spec["batch"]):
        session.run(None, feeds)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def work_sqnr(spec: dict) -> dict:
    import onnxruntime as ort

    def outputs(path: str) -> np.ndarray:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, b)[0] for b in batches(10_000, EVAL, 1)]).astype(np.float64)

    reference = outputs(spec["model"])
    found = {}
    for label, path in spec["models"].items():
        out = outputs(path)
        found[label] = float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - out) ** 2)))
    return found


WORKERS = {"irtool": work_irtool, "ort": work_ort, "float": work_float, "sqnr": work_sqnr}


def measure(kind: str, spec: dict) -> dict:
    """One worker in a fresh process, so that each peak RSS is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the run
def rows(tmp: Path, model: str, quick: bool) -> list[tuple[str, str, dict]]:
    unbounded = "quant{memory-mb=1000000}"  # bias-correct's memory as it was before memory-mb
    plan = [("float inference, batches of 16", "float", {"batch": 16}),
            ("irtool calibrate, batches of 16 (the earlier default)", "irtool", {"pipeline": "calibrate", "batch": 16}),
            ("irtool calibrate, batch chosen for memory", "irtool", {"pipeline": "calibrate"})]
    if not quick:
        plan += [("irtool quantize_static's recipe (calibrate minmax, insert-qdq), batch chosen", "irtool",
                  {"pipeline": PLAIN}),
                 ("irtool quant, batches of 16, bias-correct unbounded (the earlier memory use)", "irtool",
                  {"pipeline": unbounded, "batch": 16}),
                 ("irtool quant, batch chosen, bias-correct bounded (default)", "irtool", {"pipeline": "quant"})]
    found = []
    for label, kind, spec in plan:
        log.info("%s ...", label)
        out = str(tmp / f"{len(found)}.onnx")
        found.append((label, kind, measure(kind, {"model": model, "out": out, **spec})))
        log.info("%s: %s", label, found[-1][2])
    chosen = found[2][2].get("batch", 16)  # irtool's choice for calibrate
    for batch in (16, chosen):
        label = f"quantize_static minmax, batches of {batch}"
        log.info("%s ...", label)
        spec = {"model": model, "out": str(tmp / f"{len(found)}.onnx"), "batch": batch}
        found.append((label, "ort", {**measure("ort", spec), "batch": batch}))
        log.info("%s: %s", label, found[-1][2])
    return found


def render(found: list[tuple[str, str, dict]], sqnr: dict, started: str, load: tuple[float, float], quick: bool) -> str:
    command = "bench/highres_bench.py" + (" --quick" if quick else "")
    lines = ["## INT8 at high resolution: memory and time", "",
             f"Command: `.venv/bin/python {command}`  ",
             f"Date: {started}  ",
             f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}; load "
             f"average {load[0]:.2f} at the start, {load[1]:.2f} at the end  ",
             f"Setup: {SETUP}", "",
             "| run | calibration batch | peak RSS MB | wall s | of which calibrate s / bias-correct s | "
             "bias-correct's last layers measured on | SQNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for index, (label, _, r) in enumerate(found):
        if "error" in r:
            lines.append(f"| {label} | - | - | - | - | - | {r['error']} |")
            continue
        split = "-"
        if r.get("calibrate_s") is not None:
            split = f"{r['calibrate_s']:.1f}" + (f" / {r['bias_correct_s']:.1f}" if r.get("bias_correct_s") else "")
        last = f"{r['samples_last']} of {SAMPLES}" if r.get("samples_last") else "-"
        batch = r.get("batch", 16)
        quality = f"{sqnr[str(index)]:.2f}" if str(index) in sqnr else "-"
        lines.append(f"| {label} | {batch} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | {split} | {last} | "
                     f"{quality} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="calibration rows only (no full quant pipelines)")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started, load_start = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="irtool-highres-") as tmp_name:
        tmp = Path(tmp_name)
        model = str(tmp / "unet.onnx")
        build(Path(model))
        found = rows(tmp, model, args.quick)
        quantized = {str(i): str(tmp / f"{i}.onnx") for i, (_, kind, r) in enumerate(found)
                     if "error" not in r and (kind == "ort" or r.get("quantized"))}
        sqnr = measure("sqnr", {"model": model, "models": quantized})
    table = render(found, sqnr, started.strftime("%Y-%m-%d %H:%M UTC"), (load_start, os.getloadavg()[0]), args.quick)
    if args.no_write:
        print(table)
    else:
        write_section(SECTION, table)
        log.info("wrote the %s section of BENCHMARKS.md", SECTION)


if __name__ == "__main__":
    main()
