"""Deterministic benchmark models, built with onnx.helper only (no torch, no downloads).

* `resnet50()` — the real ResNet-50 v1.5 topology: a 7x7 stem, bottleneck stages of 3/4/6/3 blocks,
  53 Conv (no bias) each followed by BatchNormalization, Relu, residual Add, MaxPool,
  GlobalAveragePool, Flatten and a 2048x1000 Gemm; 25.6M float32 parameters drawn from a fixed seed.
  BN nodes are kept, so fold-bn has work.
* `generated(n)` — about `n` nodes of small-tensor Conv/Add/Relu/Mul in chains, two-way branches and
  residual blocks, plus a few Identity nodes, dead nodes, constant subexpressions and duplicate
  initializers, so every cleanup pass has something to do. Tensors are [1, 4, 8, 8].

Both use opset 17 and IR version 8, which every installed runtime accepts.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="irtool-bench")
    model.ir_version = IR_VERSION
    return model


# ------------------------------------------------------------------------------------ ResNet-50
class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.05) -> str:
        values = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        name = self.name(prefix)
        out = name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        tag = self.name("conv")
        w = self.weight(tag + ".weight", (cout, cin, k, k), scale=float(np.sqrt(2.0 / (cin * k * k))))
        y = self.node("Conv", [x, w], tag, kernel_shape=[k, k], strides=[stride, stride],
                      pads=[k // 2] * 4)
        bn = self.name("bn")
        gamma = self.weight(bn + ".gamma", (cout,), 0.1)
        self.inits[-1] = numpy_helper.from_array(1.0 + numpy_helper.to_array(self.inits[-1]), gamma)
        beta = self.weight(bn + ".beta", (cout,), 0.1)
        mean = self.weight(bn + ".mean", (cout,), 0.1)
        var = self.weight(bn + ".var", (cout,), 0.1)
        self.inits[-1] = numpy_helper.from_array(np.abs(numpy_helper.to_array(self.inits[-1])) + 0.5, var)
        y = self.node("BatchNormalization", [y, gamma, beta, mean, var], bn, epsilon=1e-5)
        return self.node("Relu", [y], self.name("relu")) if relu else y


def resnet50(seed: int = 0, batch: int = 1) -> onnx.ModelProto:
    b = _Builder(seed)
    x = "input"
    y = b.conv_bn(x, 3, 64, 7, 2, relu=True)
    y = b.node("MaxPool", [y], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            cout = width * 4
            h = b.conv_bn(y, cin, width, 1, 1, relu=True)
            h = b.conv_bn(h, width, width, 3, stride, relu=True)
            h = b.conv_bn(h, width, cout, 1, 1, relu=False)
            shortcut = b.conv_bn(y, cin, cout, 1, stride, relu=False) if block == 0 else y
            y = b.node("Add", [h, shortcut], "add")
            y = b.node("Relu", [y], "relu")
            cin = cout
    y = b.node("GlobalAveragePool", [y], "gap")
    y = b.node("Flatten", [y], "flatten", axis=1)
    fc_w = b.weight("fc.weight", (1000, 2048), 0.02)
    fc_b = b.weight("fc.bias", (1000,), 0.01)
    b.nodes.append(helper.make_node("Gemm", [y, fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes, "resnet50",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1000])],
        b.inits)
    return _model(graph)


# ------------------------------------------------------------------------------------ generated graphs
C, H, W = 4, 8, 8


class _Gen:
    """Emits blocks of a few nodes each until the node budget is used up."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        # A few shared scale values, so dedup-initializers finds equal initializers under different names.
        self.scales = [self.rng.uniform(0.5, 1.5, (1, C, 1, 1)).astype(np.float32) for _ in range(8)]

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        name = self.fresh(op.lower())
        out = name + ":0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def init(self, values: np.ndarray) -> str:
        name = self.fresh("w")
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def conv(self, x: str) -> str:
        w = self.init((self.rng.standard_normal((C, C, 3, 3)) * 0.2).astype(np.float32))
        b = self.init((self.rng.standard_normal(C) * 0.1).astype(np.float32))
        return self.node("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    def mul(self, x: str) -> str:
        scale = self.scales[int(self.rng.integers(len(self.scales)))]
        return self.node("Mul", [x, self.init(scale.copy())])

    def chain(self, x: str) -> str:
        return self.node("Relu", [self.mul(self.conv(x))])

    def branch(self, x: str) -> str:
        left = self.node("Relu", [self.conv(x)])
        right = self.conv(self.mul(x))
        return self.node("Add", [left, right])

    def residual(self, x: str) -> str:
        return self.node("Relu", [self.node("Add", [x, self.chain(x)])])

    def extras(self, x: str) -> str:
        kind = int(self.rng.integers(3))
        if kind == 0:  # an Identity in the middle of the data path
            return self.node("Identity", [x])
        if kind == 1:  # a dead two-node chain hanging off x
            self.node("Relu", [self.node("Mul", [x, self.init(self.scales[0].copy())])])
            return x
        # a constant subexpression: (a + b) feeding a Mul, foldable at compile time
        folded = self.node("Add", [self.init(self.scales[1].copy()), self.init(self.scales[2].copy())])
        return self.node("Mul", [x, folded])


def generated(n_nodes: int, seed: int = 0) -> onnx.ModelProto:
    g = _Gen(seed)
    x = "input"
    while len(g.nodes) < n_nodes:
        roll = g.rng.random()
        if roll < 0.40:
            x = g.chain(x)
        elif roll < 0.65:
            x = g.branch(x)
        elif roll < 0.90:
            x = g.residual(x)
        else:
            x = g.extras(x)
    y = g.node("Identity", [x])
    graph = helper.make_graph(
        g.nodes, f"generated_{n_nodes}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, H, W])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, C, H, W])],
        g.inits)
    return _model(graph)


MODELS = {
    "resnet50": resnet50,
    "gen10k": lambda: generated(10_000),
    "gen50k": lambda: generated(50_000),
    "gen100k": lambda: generated(100_000),
}
