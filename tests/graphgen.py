"""Random valid ONNX graphs for property tests (a Hypothesis strategy).

`models()` draws a DAG over one NCHW float input: Conv (plain, grouped, depthwise; with or without
bias), BatchNormalization, Relu, Add, Identity, Dropout, Cast to the same type, Reshape to the same
shape (constant or computed through Shape), identity Transpose, channel Concat, constant
subexpressions (Constant nodes and arithmetic on initializers) multiplied in, dead branches, and
initializers that duplicate earlier ones under another name. An optional head flattens into
Gemm (transB 0 or 1) + BatchNormalization. Several values can become graph outputs, an Identity can
sit right before an output, so output-name handling is exercised.

Weights come from a numpy generator seeded by a drawn integer, so Hypothesis shrinks the structure
while every example stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
POSITIVE = frozenset({"gamma", "var", "k"})
STEP_KINDS = ("conv", "bn", "relu", "add", "identity", "dropout", "cast", "reshape", "reshape_computed",
              "transpose", "concat", "const_scale", "dead", "conv_bn", "offset")


@dataclass
class Builder:
    """Accumulates nodes/initializers; every value is a 4-D float32 [1, C, H, W] unless noted."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    arrays: list = field(default_factory=list)
    counter: int = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, prefix: str, array: np.ndarray, duplicate: bool = False) -> str:
        """Add an initializer; with `duplicate`, reuse the bytes of an earlier one of the same shape and
        sign class (a variance never receives a mean's possibly negative values)."""
        kind = "positive" if prefix in POSITIVE else "signed"
        if duplicate:
            same = [a for k, a in self.arrays if k == kind and a.shape == array.shape and a.dtype == array.dtype]
            if same:
                array = same[0].copy()
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        if array.dtype == np.float32:  # int64 shape constants are never reused: another target is invalid
            self.arrays.append((kind, array))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outputs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.name("n_" + op), **attrs))
        return outputs

    def floats(self, shape, scale=0.5) -> np.ndarray:
        return self.rng.normal(0.0, scale, shape).astype(np.float32)


def _conv(b: Builder, v: str, shape: list[int], choice: int, dup: bool) -> tuple[str, list[int]]:
    channels = shape[1]
    variant = choice % 3
    if variant == 1:  # depthwise
        group, out_ch = channels, channels
    elif variant == 2 and channels % 2 == 0:  # grouped
        group, out_ch = 2, 2 * (1 + (choice // 3) % 2)
    else:
        group, out_ch = 1, 1 + (choice // 3) % 4
    kernel = 3 if choice % 2 else 1
    w = b.const("w", b.floats((out_ch, channels // group, kernel, kernel), 0.3), dup)
    inputs = [v, w]
    if choice % 4 != 0:
        inputs.append(b.const("bias", b.floats((out_ch,), 0.1), dup))
    pad = kernel // 2
    (y,) = b.node("Conv", inputs, group=group, pads=[pad] * 4)
    return y, [1, out_ch, shape[2], shape[3]]


def _bn(b: Builder, v: str, channels: int, dup: bool) -> str:
    params = [b.const("gamma", b.rng.uniform(0.5, 1.5, channels).astype(np.float32), dup),
              b.const("beta", b.floats((channels,), 0.3), dup),
              b.const("mean", b.floats((channels,), 0.3), dup),
              b.const("var", b.rng.uniform(0.5, 2.0, channels).astype(np.float32), dup)]
    return b.node("BatchNormalization", [v] + params)[0]


def _const_scale(b: Builder, channels: int, choice: int, dup: bool) -> str:
    """A [1, C, 1, 1] factor computed from constants only (folds away entirely)."""
    base = b.const("k", b.rng.uniform(0.5, 1.5, (1, channels, 1, 1)).astype(np.float32), dup)
    if choice % 2:
        (two,) = b.node("Constant", [], value=numpy_helper.from_array(np.array([2.0], np.float32), "two"))
    else:
        two = b.const("two", np.array([2.0], np.float32), dup)
    (scaled,) = b.node("Mul", [base, two])
    return b.node("Sqrt", [scaled])[0]


def _step(b: Builder, kind: str, pool: list[tuple[str, list[int]]], choice: int, dup: bool,
          dead: list[str]) -> tuple[str, list[int]] | None:
    v, shape = pool[choice % len(pool)]
    channels = shape[1]
    if kind == "conv":
        return _conv(b, v, shape, choice, dup)
    if kind == "conv_bn":
        y, out_shape = _conv(b, v, shape, choice, dup)
        return _bn(b, y, out_shape[1], dup), out_shape
    if kind == "bn":
        return _bn(b, v, channels, dup), shape
    if kind in ("relu", "identity"):
        return b.node("Relu" if kind == "relu" else "Identity", [v])[0], shape
    if kind == "dropout":
        outs = b.node("Dropout", [v], n_out=2 if choice % 2 else 1)
        return outs[0], shape
    if kind == "cast":
        return b.node("Cast", [v], to=TensorProto.FLOAT)[0], shape
    if kind == "reshape":
        return b.node("Reshape", [v, b.const("shape", np.array(shape, np.int64))])[0], shape
    if kind == "reshape_computed":
        (dims,) = b.node("Shape", [v])
        return b.node("Reshape", [v, dims])[0], shape
    if kind == "transpose":
        return b.node("Transpose", [v], perm=[0, 1, 2, 3])[0], shape
    if kind == "add":
        same = [name for name, s in pool if s == shape]
        other = same[(choice // 3) % len(same)]
        return b.node("Add", [v, other])[0], shape
    if kind == "concat":
        same = [(name, s) for name, s in pool if s[2:] == shape[2:]]
        other, other_shape = same[(choice // 3) % len(same)]
        return b.node("Concat", [v, other], axis=1)[0], [1, channels + other_shape[1], shape[2], shape[3]]
    if kind == "const_scale":
        return b.node("Mul", [v, _const_scale(b, channels, choice, dup)])[0], shape
    if kind == "offset":  # a per-channel constant that survives folding: dedup's material
        return b.node("Add", [v, b.const("offset", b.floats((1, channels, 1, 1)), dup)])[0], shape
    if kind == "dead":
        dead.append(b.node("Sigmoid", [v])[0])
        return None
    raise ValueError(kind)


def _gemm_head(b: Builder, v: str, shape: list[int], choice: int, dup: bool) -> tuple[str, list[int]]:
    features = int(np.prod(shape[1:]))
    (flat,) = b.node("Flatten", [v], axis=1)
    units = 3 + choice % 3
    trans_b = choice % 2
    weight = b.floats((units, features) if trans_b else (features, units), 0.2)
    inputs = [flat, b.const("B", weight, dup)]
    if choice % 3:
        inputs.append(b.const("C", b.floats((units,), 0.1), dup))
    (y,) = b.node("Gemm", inputs, transB=trans_b, alpha=1.0 if choice % 4 else 0.5)
    return _bn(b, y, units, dup), [1, units]


@st.composite
def models(draw, max_steps: int = 8) -> onnx.ModelProto:
    """A valid ModelProto (opset 17, IR 8) drawn as described in the module docstring."""
    seed = draw(st.integers(0, 2**16))
    channels = draw(st.integers(1, 4))
    size = draw(st.sampled_from([3, 4]))
    b = Builder(np.random.default_rng(seed))
    pool: list[tuple[str, list[int]]] = [("x", [1, channels, size, size])]
    dead: list[str] = []
    steps = draw(st.lists(st.tuples(st.sampled_from(STEP_KINDS), st.integers(0, 1000), st.booleans()),
                          min_size=1, max_size=max_steps))
    for kind, choice, dup in steps:
        produced = _step(b, kind, pool, choice, dup, dead)
        if produced is not None:
            pool.append(produced)
    if len(pool) == 1:  # every step was a dead branch: give the output a producer
        pool.append((b.node("Relu", ["x"])[0], pool[0][1]))
    outputs = [pool[-1]]
    if draw(st.booleans()) and len(pool) > 2:
        outputs.append(pool[draw(st.integers(1, len(pool) - 2))])
    if draw(st.booleans()):
        outputs[0] = _gemm_head(b, *outputs[0], draw(st.integers(0, 1000)), draw(st.booleans()))
    if draw(st.booleans()):
        (last,) = b.node("Identity", [outputs[0][0]])
        outputs[0] = (last, outputs[0][1])
    return _model(b, pool[0], _unique(outputs))


def _unique(outputs: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    seen: dict[str, list[int]] = {}
    for name, shape in outputs:
        seen.setdefault(name, shape)
    return list(seen.items())


def _model(b: Builder, graph_input: tuple[str, list[int]], outputs: list[tuple[str, list[int]]]) -> onnx.ModelProto:
    value = helper.make_tensor_value_info
    graph = helper.make_graph(b.nodes, "random", [value(graph_input[0], TensorProto.FLOAT, graph_input[1])],
                              [value(name, TensorProto.FLOAT, shape) for name, shape in outputs], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model
