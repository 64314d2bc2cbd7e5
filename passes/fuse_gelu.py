"""Pass `fuse-gelu`: the GELU of exported models, erf form (five ops) or tanh form (eight or nine) -> one node
(irtool.ir.gelu has the patterns and the rules on constants).

Why a pass when ONNX Runtime fuses GELU itself: it does so only in float graphs. In a Q/DQ graph it first
gives every consumer of a DequantizeLinear its own copy (EnsureUniqueDQForNodeUnit), so x reaches Div and
Mul as two tensors and its GeluFusion no longer matches; the five ops then run unfused (measured on a
ViT-B-sized encoder's INT8 model: 12 blocks, irtool/ORT latency 1.026x -> 0.951x at one thread once fused).
insert-qdq{profile=ort-cpu} runs the same fusion itself; this pass is for Q/DQ models made elsewhere.

Emitted op: the standard Gelu (approximate "none" or "tanh") when the model's opset is >= 20, else
com.microsoft.Gelu or FastGelu (ONNX Runtime only; TensorRT does not know them, so do not run this pass on a
model bound for it below opset 20). ONNX Runtime leaves the tanh form unfused between Q/DQ as well (tested).
Contract: bounded. The kernels evaluate the same formulas; measured against the unfused ops on x ~ N(0, 4²):
max abs difference 4.8e-7 (erf; the same max error against float64, 4.5e-7), and 6e-8 for torch's tanh form.
"""

from __future__ import annotations

from dataclasses import dataclass

from irtool.ir.gelu import fuse_gelu
from irtool.ir.model import Model
from irtool.passmanager import Pass, PassContext, PassResult


class FuseGelu(Pass):
    """Replace the erf GELU (Div, Erf, Add, Mul, Mul) or its tanh approximation by one Gelu/FastGelu node."""

    name = "fuse-gelu"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fused = fuse_gelu(model)
        return PassResult(modified=fused > 0, stats={"fused": fused})
