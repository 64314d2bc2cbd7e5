"""Benchmark: irtool's `prune` pass against Torch-Pruning (DepGraph), side by side in one run.

Both tools prune the same freshly initialised plain-torch models (tests/prune/archs.py, plus a full-size
ResNet-50 at 224x224, the model of Torch-Pruning's reference numbers) with the same settings: uniform
ratio 0.5, L2 filter magnitude, the final classifier / detection-head convs left alone (irtool locks
them because they write a graph output; Torch-Pruning gets them as `ignored_layers`).

* irtool         ONNX export of the unpruned model (legacy exporter, opset 17), then Model.load, the
                 `cleanup` pipeline (folds the exporter's shape arithmetic), the `channel-groups`
                 analysis and `prune{ratio=0.5}`.
* Torch-Pruning  tp.pruner.BasePruner (1.6's name for MetaPruner / MagnitudePruner; its constructor builds
                 the DependencyGraph by tracing one forward) with tp.importance.MagnitudeImportance(p=2),
                 then pruner.step(); the pruned module is exported like the original. For the ViT it gets
                 `num_heads` for q/k/v and, after the step, `head_dim` is updated (its documented usage).

Everything is measured on the exported ONNX: MACs and parameters with irtool.analysis.cost.model_cost,
latency with irtool.backends.ort.benchmark (ONNX Runtime CPU, 1 and 2 threads, models interleaved,
best of the per-round medians). A tool "handles" an architecture when it finishes and its pruned model
runs in ONNX Runtime with the original output shapes and fewer MACs; failures are recorded in one line.

Then, at equal MACs (Torch-Pruning's ratio found by bisection so its MACs match irtool's within 2%):
ResNet-50/224 latency at 50% MACs removed, and test accuracy without fine-tuning of the digits CNN
(tests/prune/digits.py) at 30% and 50% MACs removed, irtool with recover=none|bias|lstsq.

    python bench/prune_bench.py [--quick] [--no-write]

Needs Torch-Pruning (`pip install -e .[bench]`); without it the irtool half still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from irtool.analysis.channels import ChannelGroups  # noqa: E402
from irtool.analysis.cost import model_cost  # noqa: E402
from irtool.backends.ort import benchmark, make_inputs, run  # noqa: E402
from irtool.ir import Model  # noqa: E402
from irtool.passmanager import PassContext, PassManager  # noqa: E402
from irtool.pipeline import parse_pipeline  # noqa: E402
from tests.prune import archs, digits  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # the irtool half still runs; the table says why the other half is missing
    tp = None

log = logging.getLogger("bench.prune")

SECTION = "prune_vs_torch_pruning"
TITLE = "Structured pruning vs Torch-Pruning"
RATIO = 0.5
# A second irtool row where the model has LayerNormalization over its channels: Torch-Pruning prunes through those
# norms by default, irtool keeps them (the exact masking contract) unless asked with through-norms=true.
THROUGH_NORMS = {"vit_b16", "vit_torchvision", "swin_tiny", "convnext_tiny"}
THROUGH_NORMS_SIDE = "irtool through-norms=true"
MATCH_TOLERANCE = 0.02  # Torch-Pruning's MACs within 2% of irtool's
NOT_INSTALLED = "Torch-Pruning not installed (pip install -e .[bench])"


# ------------------------------------------------------------------------------------------ models
def resnet50_224() -> nn.Module:
    """torchvision's ResNet-50 v1.5 topology (3/4/6/3 bottlenecks, widths 64..512, 1000 classes)."""
    return archs.ResNet(archs.Bottleneck, (3, 4, 6, 3), widths=(64, 128, 256, 512), classes=1000)


ARCHS = {"resnet50_224": (resnet50_224, (1, 3, 224, 224)), **archs.ARCHS}


def ignored_layers(module: nn.Module) -> list[nn.Module]:
    """The layers irtool locks because they write a graph output: detection heads' last convs, a super-resolution
    net's RGB tail, or the classifier."""
    if isinstance(module, archs.Yolo):
        return [head[-1] for head in module.heads]
    if isinstance(module, archs.EDSR):
        return [module.tail]
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1:]


def export(module: nn.Module, x: torch.Tensor, dynamic_batch: bool = False) -> onnx.ModelProto:
    with torch.no_grad():
        outputs = module(x)
    names = [f"y{i}" for i in range(len(outputs) if isinstance(outputs, tuple) else 1)]
    axes = {n: {0: "batch"} for n in ["x", *names]} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"], output_names=names,
                          opset_version=17, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def cost(proto: onnx.ModelProto, shape: list[int]) -> tuple[int, int]:
    """(MACs, params) per input of `shape`, after `cleanup` on a copy: the legacy exporter computes chunk
    sizes from Shape at run time, which hides the shapes (and MACs) of everything after a chunk."""
    model = Model.from_proto(proto)
    PassManager(parse_pipeline("cleanup").build()).run(model, PassContext())
    report = model_cost(model, {"x": list(shape)})
    if report.unknown_macs:
        raise RuntimeError(f"MACs of {len(report.unknown_macs)} nodes unknown, e.g. {report.unknown_macs[0]}")
    return report.total_macs, report.total_params


def one_line(e: BaseException) -> str:
    """The error's first line; a bare assert says nothing, so then where it failed, and the assert itself."""
    text = (str(e).strip().splitlines() or [""])[0]
    if not text and e.__traceback__ is not None:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = frame.filename.split("site-packages/")[-1]
        text = f"at {where}:{frame.lineno} ({(frame.line or '').strip()})"
    return f"{type(e).__name__}: {text[:160]}"


# ------------------------------------------------------------------------------------------ the two tools
class Clock:
    """Wall (perf_counter) and CPU (process_time, all threads) seconds per phase; `uncounted` phases are
    shown but left out of the totals."""

    def __init__(self, uncounted: tuple[str, ...] = ()) -> None:
        self.phases: dict[str, float] = {}
        self.cpu_phases: dict[str, float] = {}
        self.uncounted = uncounted

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started, cpu = time.perf_counter(), time.process_time()
        yield
        self.phases[phase] = time.perf_counter() - started
        self.cpu_phases[phase] = time.process_time() - cpu

    @property
    def total(self) -> float:
        return sum(v for k, v in self.phases.items() if k not in self.uncounted)

    @property
    def cpu(self) -> float:
        return sum(v for k, v in self.cpu_phases.items() if k not in self.uncounted)


def irtool_prune(path: Path, text: str, calib=None, cleanup: bool = True) -> tuple[Model, Clock, dict]:
    """Load + cleanup + channel-groups + prune, timed per phase; cleanup is not counted in the total."""
    clock = Clock(uncounted=("cleanup",))
    with clock("load"):
        model = Model.load(path)
    ctx = PassContext(calibration_data=calib)
    if cleanup:
        with clock("cleanup"):
            PassManager(parse_pipeline("cleanup").build()).run(model, ctx)
    with clock("channel-groups"):
        ctx.analysis(ChannelGroups, model)
    with clock("prune"):
        record = PassManager(parse_pipeline(text).build()).run(model, ctx)[-1]
    return model, clock, record.stats


def tp_prune(module: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None = None) -> tuple[nn.Module, Clock]:
    """Torch-Pruning on a copy of `module`: BasePruner (builds the DependencyGraph) + step()."""
    if tp is None:
        raise RuntimeError(NOT_INSTALLED)
    module = copy.deepcopy(module)
    heads = {}
    for m in module.modules():
        if isinstance(m, archs.Attention):
            heads.update({m.q: m.heads, m.k: m.heads, m.v: m.heads})
        elif isinstance(m, nn.MultiheadAttention):  # Torch-Pruning's own MHA pruner takes it whole
            heads[m] = m.num_heads
        elif isinstance(m, archs.WindowAttention):  # timm's fused qkv, as in Torch-Pruning's timm Swin example
            heads[m.qkv] = m.heads
        elif isinstance(m, archs.GQAttention):  # as in Torch-Pruning's Llama example
            heads.update({m.q: m.heads, m.k: m.kv, m.v: m.kv})
    clock = Clock()
    with warnings.catch_warnings(), time_limit(PEER_SECONDS, "Torch-Pruning"):
        warnings.simplefilter("ignore")
        with clock("dependency graph"):
            pruner = tp.pruner.BasePruner(module, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=ignored_layers(module),
                                          num_heads=heads, round_to=round_to)
        with clock("step"):
            pruner.step()
    for m in module.modules():  # attention modules keep their head size in a plain attribute
        if isinstance(m, archs.Attention):
            m.head_dim = m.q.out_features // m.heads
    return module, clock


PEER_SECONDS = 120  # Torch-Pruning 1.6.1 was still in get_all_groups on the llama arch after 7 minutes (stopped)


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Stop the block with TimeoutError after `seconds` (SIGALRM: the peer's Python loops are interruptible)."""
    def stop(signum, frame):
        raise TimeoutError(f"{what} did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def works(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, shape: list[int]) -> str | None:
    """None when `pruned` runs in ONNX Runtime with the original output shapes and fewer MACs."""
    want = [v.shape for v in run(original, feeds).values()]
    got = [v.shape for v in run(pruned, feeds).values()]
    if want != got:
        return f"output shapes changed: {want} -> {got}"
    if cost(pruned, shape)[0] >= cost(original, shape)[0]:
        return "no MACs removed"
    return None


def match_ratio(measure, target_macs: int, steps: int = 14) -> tuple[float, int]:
    """Bisection on Torch-Pruning's ratio until its MACs are within 0.5% of `target_macs`; the closest seen."""
    low, high = 0.0, 0.9
    best: tuple[float, float, int] | None = None
    for _ in range(steps):
        mid = (low + high) / 2
        macs = measure(mid)
        gap = abs(macs - target_macs) / target_macs
        log.info("  Torch-Pruning ratio %.4f -> %.4g MACs (%.2f%% from irtool's)", mid, macs, 100 * gap)
        if best is None or gap < best[1]:
            best = (mid, gap, macs)
        if gap <= 0.005:
            break
        low, high = (mid, high) if macs > target_macs else (low, mid)
        if high - low < 1e-3:  # the reachable MACs jump here (rounded channel counts): take the closest
            break
    return best[0], best[2]


# ------------------------------------------------------------------------------------------ latency
def latencies(protos: dict[str, onnx.ModelProto], feeds: dict, rounds: int, runs: int) -> dict[str, dict[int, float]]:
    """Median ms per model and thread count, models interleaved per round; the best round counts
    (other work on the machine only ever adds time)."""
    seen: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []} for k in protos}
    for _ in range(rounds):
        for label, proto in protos.items():
            for threads in (1, 2):
                result = benchmark(proto, feeds, warmup=5, runs=runs, threads=threads)
                seen[label][threads].append(result.median_ms)
    return {k: {t: min(v) for t, v in per.items()} for k, per in seen.items()}


# ------------------------------------------------------------------------------------------ per architecture
@dataclass
class Side:
    status: str = "ok"
    macs: int | None = None
    params: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None  # best wall total over the repeats
    cpu: float | None = None  # CPU seconds of that repeat
    latency: dict[int, float] = field(default_factory=dict)

    def keep_best(self, clock: Clock) -> None:
        if self.seconds is None or clock.total < self.seconds:
            self.seconds, self.cpu, self.phases = clock.total, clock.cpu, clock.phases


def bench_arch(name: str, repeats: int, rounds: int, workdir: Path) -> dict:
    factory, shape = ARCHS[name]
    module = archs.init_weights(factory())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    original = export(module, x)
    path = workdir / f"{name}.onnx"
    onnx.save(original, str(path))
    feeds = make_inputs(original, seed=0)
    macs0, params0 = cost(original, list(shape))
    log.info("%s: %.4g MACs, %.4g params", name, macs0, params0)
    protos = {"before": original}
    sides = {"irtool": Side(), "torch-pruning": Side()}
    if name in THROUGH_NORMS:
        sides[THROUGH_NORMS_SIDE] = Side()
    big = macs0 > 1e9
    repeats = repeats + 2 if big else repeats  # the timing target is on ResNet-50/224: more samples
    for _ in range(repeats):  # alternate the tools, so that load from other work hits both alike
        for tool, side in sides.items():
            if side.status != "ok":
                continue
            try:
                if tool.startswith("irtool"):
                    extra = ",through-norms=true" if tool == THROUGH_NORMS_SIDE else ""
                    model, clock, _ = irtool_prune(path, f"prune{{ratio={RATIO}{extra}}}")
                    protos[tool] = model.to_proto()
                else:
                    pruned, clock = tp_prune(module, x, RATIO)
                    protos[tool] = export(pruned, x)
                side.keep_best(clock)
            except Exception as e:  # coverage is what we measure: record, do not crash
                side.status = one_line(e)
                protos.pop(tool, None)
    for tool, side in sides.items():
        if tool in protos:
            try:
                problem = works(original, protos[tool], feeds, list(shape))
            except Exception as e:
                problem = "pruned model does not run: " + one_line(e)
            if problem:
                side.status = problem
                del protos[tool]
            else:
                side.macs, side.params = cost(protos[tool], list(shape))
        log.info("%s: %s %s%s", name, tool, side.status,
                 "" if side.seconds is None else f", best {side.seconds:.3f} s {side.phases}")

    same = None
    if name == "resnet50_224":
        same = same_macs(module, x, path, list(shape))
        protos.update({row["label"]: row.pop("proto") for row in same if "proto" in row})
    runs = 20 if big else 200
    rounds = rounds + 2 if big else rounds
    log.info("%s: ONNX Runtime latency of %s, %d rounds x %d runs ...", name, ", ".join(protos), rounds, runs)
    lat = latencies(protos, feeds, rounds, runs)
    for tool, side in sides.items():
        side.latency = lat.get(tool, {})
    for row in same or []:
        row["latency"] = lat.get(row["label"], {})
    return {"shape": list(shape), "macs": macs0, "params": params0, "latency": lat["before"],
            "sides": {k: vars(v) for k, v in sides.items()}, "same_macs": same, "rounds": rounds, "runs": runs}


def same_macs(module: nn.Module, x: torch.Tensor, path: Path, shape: list[int], target: float = 0.5) -> list[dict]:
    """irtool prune{target-macs=...} and Torch-Pruning at the ratio that gives the same MACs, with default
    rounding and with channel counts rounded to 16 (ONNX Runtime's NCHWc block on AVX-512)."""
    rows = []
    for round_to in (1, 16):
        text = f"prune{{target-macs={target}" + (f",round-to={round_to}}}" if round_to > 1 else "}")
        model, _, _ = irtool_prune(path, text)
        proto = model.to_proto()
        macs, params = cost(proto, shape)
        rows.append({"label": f"irtool {text}", "tool": "irtool", "setting": text, "macs": macs, "params": params,
                     "round_to": round_to, "proto": proto})
        log.info("same MACs: irtool %s -> %.4g MACs", text, macs)
        row = {"label": f"torch-pruning round_to={round_to}", "tool": "torch-pruning", "round_to": round_to}
        if tp is None:
            rows.append({**row, "setting": NOT_INSTALLED})
            continue
        tp_round = round_to if round_to > 1 else None
        try:
            def measure(r: float, rt: int | None = tp_round) -> int:
                return cost(export(tp_prune(module, x, r, rt)[0], x), shape)[0]

            ratio, _ = match_ratio(measure, macs)
            pruned = export(tp_prune(module, x, ratio, tp_round)[0], x)
            tp_macs, tp_params = cost(pruned, shape)
            setting = f"pruning_ratio={ratio:.4f}" + (f", round_to={round_to}" if tp_round else "")
            rows.append({**row, "setting": setting, "macs": tp_macs, "params": tp_params, "proto": pruned})
        except Exception as e:
            rows.append({**row, "setting": one_line(e)})
    return rows


# ------------------------------------------------------------------------------------------ digits accuracy
def trained_digits() -> tuple[nn.Module, onnx.ModelProto, dict]:
    """train_digits_net's model, plus the torch module it exported (Torch-Pruning needs the module).

    train_digits_net returns only the export, so the module is caught as it is constructed; the check
    below makes sure both tools start from the same network."""
    caught: list[nn.Module] = []

    class Catching(digits.DigitsNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caught.append(self)

    original, digits.DigitsNet = digits.DigitsNet, Catching
    try:
        proto, data = digits.train_digits_net()
    finally:
        digits.DigitsNet = original
    net = caught[0].eval()
    x = data["test"][0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(proto, {"x": x})["logits"], want, rtol=1e-4, atol=1e-4)
    return net, proto, data


def bench_digits(targets: tuple[float, ...]) -> dict:
    net, proto, data = trained_digits()
    (x_test, y_test), calib = data["test"], digits.calibration(data["calib"][0])
    shape = [1, 1, 8, 8]
    macs0, params0 = cost(proto, shape)
    base = digits.accuracy(proto, x_test, y_test)
    log.info("digits: unpruned accuracy %.4f, %.4g MACs", base, macs0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.onnx"
        onnx.save(proto, str(path))
        rows = []
        for target in targets:
            ir_macs = None
            for recover in ("none", "bias", "lstsq"):
                text = f"prune{{target-macs={target},recover={recover}}}"
                model, _, _ = irtool_prune(path, text, calib, cleanup=False)
                pruned = model.to_proto()
                macs, params = cost(pruned, shape)
                ir_macs = ir_macs or macs
                acc = digits.accuracy(pruned, x_test, y_test)
                rows.append({"target": target, "tool": "irtool", "setting": text, "macs": macs, "params": params,
                             "accuracy": acc})
                log.info("digits: %s -> %.1f%% MACs removed, accuracy %.4f", text, 100 * (1 - macs / macs0), acc)
            rows.append(tp_digits(net, x_test, y_test, target, ir_macs, shape))
    return {"macs": macs0, "params": params0, "accuracy": base, "rows": rows, "test_images": len(x_test),
            "calib_images": len(data["calib"][0])}


def tp_digits(net: nn.Module, x_test, y_test, target: float, ir_macs: int, shape: list[int]) -> dict:
    row = {"target": target, "tool": "torch-pruning"}
    if tp is None:
        return {**row, "setting": NOT_INSTALLED}
    x = torch.from_numpy(x_test[:1])

    def pruned_at(ratio: float) -> onnx.ModelProto:
        return export(tp_prune(net, x, ratio)[0], x, dynamic_batch=True)

    try:
        ratio, _ = match_ratio(lambda r: cost(pruned_at(r), shape)[0], ir_macs)
        proto = pruned_at(ratio)
        macs, params = cost(proto, shape)
        acc = digits.accuracy(proto, x_test, y_test)
    except Exception as e:
        return {**row, "setting": one_line(e)}
    log.info("digits: Torch-Pruning ratio %.4f -> %.4g MACs, accuracy %.4f", ratio, macs, acc)
    return {**row, "setting": f"pruning_ratio={ratio:.4f}", "macs": macs, "params": params, "accuracy": acc}


# ------------------------------------------------------------------------------------------ report
def _g(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _after(before: float, after: float | None) -> str:
    return "n/a" if after is None else f"{_g(after)} (-{100 * (1 - after / before):.1f}%)"


def _ms(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{before:.3g} → {after:.3g} ({before / after:.2f}x)"


def _phases(side: dict) -> str:
    if side["seconds"] is None:
        return "n/a"
    counted = [f"{k} {v:.3f}" for k, v in side["phases"].items() if k != "cleanup"]
    text = f"**{side['seconds']:.3f}** ({' + '.join(counted)}; CPU {side['cpu']:.3f})"
    if "cleanup" in side["phases"]:
        text += f"; cleanup {side['phases']['cleanup']:.3f} not counted"
    return text


def render(results: dict, meta: dict) -> str:
    lines = [f"## {TITLE}", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}  ",
             f"Versions: {meta['versions']}", "",
             "Same models (tests/prune/archs.py, freshly initialised with a fixed seed, plus `resnet50_224`: "
             "torchvision's ResNet-50 topology at 224x224), same settings: uniform ratio 0.5, L2 magnitude, "
             "final classifier / detection-head convs kept (`ignored_layers` for Torch-Pruning; irtool locks "
             "tensors that are graph outputs). MACs and parameters are counted by irtool.analysis.cost.model_cost "
             "on each tool's exported ONNX (legacy exporter, opset 17, BatchNorm folded by the exporter, `cleanup` "
             "applied so that shapes after a chunk are known), per input of the listed shape. Time is analysis + "
             "removal in seconds, best wall time of "
             f"{meta['repeats']} repeats ({meta['repeats'] + 2} for resnet50_224), tools alternating; CPU = "
             "process CPU seconds of that repeat (all threads). irtool = Model.load of the export + "
             "`channel-groups` + `prune` (the `cleanup` pipeline, needed here only for the legacy exporter's "
             "chunk arithmetic in shufflenet_v2 and yolo but run on every model, is shown and not counted); "
             "Torch-Pruning = BasePruner construction (DependencyGraph build: one traced forward) + step(). For "
             "vit_b16 Torch-Pruning gets `num_heads` for q/k/v and the attention's `head_dim` is updated after "
             "the step (its documented usage); for vit_torchvision (the same ViT with torchvision's "
             "nn.MultiheadAttention) it gets `num_heads` for each nn.MultiheadAttention, which its own MHA pruner "
             "handles; for swin_tiny (timm's Swin attention: one fused qkv Linear) it gets `num_heads` for each qkv "
             "Linear, as in its timm examples; for llama (grouped-query attention) it gets the query heads for q "
             f"and the k/v heads for k and v, as in its Llama example. A tool still running after {PEER_SECONDS} s "
             "is stopped and reported as failed. Torch-Pruning also prunes the channels a LayerNorm normalizes "
             "over (the ViT, Swin and ConvNeXt residual streams), which irtool keeps unless asked (row "
             f"`{THROUGH_NORMS_SIDE}`: the norms then normalize over the kept channels). Latency: ONNX Runtime "
             "CPU, median ms of "
             f"{meta['runs']} runs, best of {meta['rounds']} interleaved rounds; speedup = unpruned / pruned.", "",
             "### Per architecture, ratio 0.5", "",
             "| architecture (input; unpruned) | tool | result | MACs after (removed) | params after (removed) | "
             "analysis + removal, s | ORT 1 thread ms (speedup) | ORT 2 threads ms (speedup) |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for name, r in results["archs"].items():
        dims = "x".join(map(str, r["shape"]))
        for tool, side in r["sides"].items():
            status = "ok" if side["status"] == "ok" else f"**failed**: {side['status']}"
            lines.append(
                f"| {name} ({dims}; {_g(r['macs'])} MACs, {_g(r['params'])} params) | {tool} | {status} | "
                f"{_after(r['macs'], side['macs'])} | {_after(r['params'], side['params'])} | {_phases(side)} | "
                f"{_ms(r['latency'].get(1), side['latency'].get(1))} | "
                f"{_ms(r['latency'].get(2), side['latency'].get(2))} |")
    r50 = results["archs"].get("resnet50_224", {})
    if r50.get("same_macs"):
        lines += ["", "### Same MACs: ResNet-50 at 224x224, 50% of MACs removed", "",
                  "irtool `prune{target-macs=0.5}`; Torch-Pruning at the uniform ratio whose MACs match (bisection, "
                  "within 2%). Second pair: channel counts rounded to multiples of 16 by both tools (irtool "
                  "`round-to=16`, Torch-Pruning `round_to=16`).", "",
                  "| tool | setting | MACs after (removed) | params after (removed) | ORT 1 thread ms (speedup) | "
                  "ORT 2 threads ms (speedup) |", "|---|---|---:|---:|---:|---:|"]
        for row in r50["same_macs"]:
            lat = row.get("latency", {})
            lines.append(f"| {row['tool']} | {row['setting']} | {_after(r50['macs'], row.get('macs'))} | "
                         f"{_after(r50['params'], row.get('params'))} | {_ms(r50['latency'].get(1), lat.get(1))} | "
                         f"{_ms(r50['latency'].get(2), lat.get(2))} |")
    d = results.get("digits")
    if d:
        lines += ["", "### Accuracy without fine-tuning: digits residual CNN (tests/prune/digits.py)", "",
                  f"Unpruned: test accuracy {100 * d['accuracy']:.2f}% ({_g(d['macs'])} MACs, "
                  f"{_g(d['params'])} params per 8x8 image; {d['test_images']} test images). irtool: "
                  f"`prune{{target-macs=...}}` (uniform, L2) with {d['calib_images']} calibration images for "
                  "recover=bias|lstsq; Torch-Pruning: MagnitudeImportance(p=2), uniform, ratio bisected to irtool's "
                  "MACs (within 2%). No fine-tuning on either side.", "",
                  "| MACs target | tool | setting | MACs after (removed) | params after (removed) | test accuracy "
                  "| vs unpruned |", "|---:|---|---|---:|---:|---:|---:|"]
        for row in d["rows"]:
            acc = row.get("accuracy")
            lines.append(f"| -{100 * row['target']:.0f}% | {row['tool']} | {row['setting']} | "
                         f"{_after(d['macs'], row.get('macs'))} | {_after(d['params'], row.get('params'))} | "
                         + ("n/a | n/a |" if acc is None else
                            f"{100 * acc:.2f}% | {100 * (acc - d['accuracy']):+.2f} pts |"))
    lines += ["", "### Targets", ""] + [f"- {t}" for t in targets(results)]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(results: dict) -> list[str]:
    out = []
    names = list(results["archs"])
    fails = {tool: [n for n in names if results["archs"][n]["sides"][tool]["status"] != "ok"]
             for tool in ("irtool", "torch-pruning")}
    out.append(f"Coverage of every architecture: {_verdict(not fails['irtool'])} — irtool "
               f"{len(names) - len(fails['irtool'])}/{len(names)} (fails: {', '.join(fails['irtool']) or 'none'}), "
               f"Torch-Pruning {len(names) - len(fails['torch-pruning'])}/{len(names)} "
               f"(fails: {', '.join(fails['torch-pruning']) or 'none'}).")
    r50 = results["archs"].get("resnet50_224")
    if r50:
        ir, tps = r50["sides"]["irtool"], r50["sides"]["torch-pruning"]
        if ir["seconds"] is not None and tps["seconds"] is not None:
            faster = ir["seconds"] < tps["seconds"]
            out.append(f"Removal on ResNet-50/224 faster than Torch-Pruning's: {_verdict(faster)}"
                       f" — best wall time irtool {ir['seconds']:.3f} s vs Torch-Pruning {tps['seconds']:.3f} s "
                       f"({tps['seconds'] / ir['seconds']:.2f}x); CPU {ir['cpu']:.3f} s vs {tps['cpu']:.3f} s "
                       "(Torch-Pruning's own reference: 0.5 s on its authors' machine).")
        out += _latency_target(r50)
    d = results.get("digits")
    if d:
        for row in d["rows"]:
            if row["tool"] == "irtool" and row["target"] == 0.3 and "recover=lstsq" in row["setting"]:
                drop = d["accuracy"] - row["accuracy"]
                out.append(f"lstsq recovery within 2 points of the unpruned model at 30% MACs removed: "
                           f"{_verdict(drop <= 0.02)} — {100 * row['accuracy']:.2f}% vs {100 * d['accuracy']:.2f}% "
                           f"({-100 * drop:+.2f} pts).")
    return out


def _latency_target(r50: dict) -> list[str]:
    out = []
    rows = {(row["tool"], row["round_to"]): row for row in r50.get("same_macs") or []}
    for round_to, what in ((1, "default rounding"), (16, "both rounded to 16")):
        ir, tps = rows.get(("irtool", round_to)), rows.get(("torch-pruning", round_to))
        if not (ir and tps and ir.get("latency") and tps.get("latency")):
            continue
        base, ok, parts = r50["latency"], True, []
        gap = abs(ir["macs"] - tps["macs"]) / ir["macs"]
        if gap > MATCH_TOLERANCE:
            out.append(f"Same-MACs latency, {what}: not judged — Torch-Pruning's uniform ratio cannot reach "
                       f"irtool's MACs within 2% with this rounding (closest {100 * gap:.1f}% apart).")
            continue
        for t in (1, 2):
            s_ir, s_tp = base[t] / ir["latency"][t], base[t] / tps["latency"][t]
            ok &= s_ir >= s_tp
            parts.append(f"{t} thread{'s' if t > 1 else ''}: irtool {s_ir:.2f}x vs Torch-Pruning {s_tp:.2f}x")
        out.append(f"ONNX Runtime speedup at 50% MACs removed no worse than Torch-Pruning's at the same MACs "
                   f"(ResNet-50/224, {what}, MACs {100 * gap:.1f}% apart): {_verdict(ok)} — " + "; ".join(parts) + ".")
    return out


def machine_note(load_start: tuple[float, float, float], load_end: tuple[float, float, float]) -> str:
    def fmt(load):
        return "/".join(f"{v:.2f}" for v in load)

    return (f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}; shared "
            f"with other work, so latencies and times are noisy: load average (1/5/15 min) {fmt(load_start)} at "
            f"the start, {fmt(load_end)} at the end; torch intra-op threads {torch.get_num_threads()}")


def versions() -> str:
    import onnxruntime

    tp_version = "not installed"
    if tp is not None:
        try:
            from importlib.metadata import version

            tp_version = version("torch-pruning")
        except Exception:  # informative only
            tp_version = getattr(tp, "__version__", "?")
    return (f"torch {torch.__version__}, torch-pruning {tp_version}, onnx {onnx.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    parser.add_argument("--quick", action="store_true", help="one repeat, one latency round, digits at 30%% only")
    parser.add_argument("--no-digits", action="store_true", help="skip the accuracy comparison")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("irtool").setLevel(logging.WARNING)  # one line per pass, with every pruned group
    if tp is None:
        log.error("%s: only the irtool half will run", NOT_INSTALLED)
    repeats, rounds = (1, 1) if args.quick else (3, 3)
    load_start = os.getloadavg()
    log.info("start: %s", uptime())
    results: dict = {"archs": {}}
    names = args.archs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names, start=1):
            log.info("[%d/%d] %s ...", i, len(names), name)
            results["archs"][name] = bench_arch(name, repeats, rounds, Path(tmp))
    if not args.no_digits:
        log.info("digits: accuracy without fine-tuning ...")
        results["digits"] = bench_digits((0.3,) if args.quick else (0.3, 0.5))
    log.info("end: %s", uptime())
    command = os.environ.get("BENCH_COMMAND") or " ".join([".venv/bin/python", "bench/prune_bench.py", *argv])
    meta = {"command": command, "machine": machine_note(load_start, os.getloadavg()), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "repeats": repeats, "rounds": f"{rounds} ({rounds + 2} for resnet50_224)",
            "runs": "200 (20 for resnet50_224)"}
    text = render(results, meta)
    print(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "prune_bench.json").write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))
    if not args.no_write:
        from _markdown import write_section

        write_section(SECTION, text)
        log.info("wrote section %r of BENCHMARKS.md", TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
