"""Pass `einsum-to-matmul`: two-operand Einsum -> MatMul with Transpose/Reshape/Unsqueeze/Squeeze around it
(irtool.ir.einsum has the rules and what it declines).

ONNX Runtime and TensorRT run Einsum in float only, so the quantizer could not give an einsum attention or a
Keras EinsumDense layer integer kernels, and cost analysis counted none of its MACs; as MatMul they get both.
The `quant` and `quant-trt` pipelines run it after cleanup.
Contract: bounded (MatMul may sum the products in another order; bit-identical to ONNX Runtime 1.32's
Einsum in the measured cases, see irtool/ir/einsum.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from irtool.ir.einsum import einsum_to_matmul
from irtool.ir.model import Model
from irtool.passmanager import Pass, PassContext, PassResult


class EinsumToMatMul(Pass):
    """Rewrite two-operand Einsum nodes (batched matrix products, contractions with weights) as MatMul."""

    name = "einsum-to-matmul"

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rewritten = einsum_to_matmul(model)
        return PassResult(modified=rewritten > 0, stats={"rewritten": rewritten})
