"""ort-cpu turns a ReduceMean over the spatial axes (torch's dynamo export of adaptive_avg_pool2d(x, 1)) into the
GlobalAveragePool it computes, so ONNX Runtime runs QLinearGlobalAveragePool instead of a float island."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from golden._quant_blocks import mean_gate
from irtool.api import optimize
from irtool.ir.model import Model
from irtool.passes.quant.placement import global_means
from tests.quant.ort_run import optimized_ops, run_batches


def _quantized(proto: onnx.ModelProto):
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    return optimize(proto, "calibrate,insert-qdq", calibration_data=batches)


def test_spatial_mean_runs_as_integer_global_average_pool(tmp_path):
    result = _quantized(mean_gate())
    assert result.records[-1].stats["global_pools"] == 1
    x = np.random.default_rng(9).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ops = optimized_ops(result.model.to_proto(), str(tmp_path / "optimized.onnx"), [{"x": x}])
    assert ops["QLinearGlobalAveragePool"] == 1 and "ReduceMean" not in ops
    assert ops["QuantizeLinear"] == 1  # the input's: integers from there to the last conv
    reference, quantized = run_batches(mean_gate(), [{"x": x}]), run_batches(result.model.to_proto(), [{"x": x}])
    assert 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - quantized) ** 2)) > 25.0


@pytest.mark.parametrize(("keepdims", "axes"), [(0, (2, 3)), (1, (3,)), (1, (-2, -1))])
def test_only_a_mean_over_every_spatial_axis_with_dims_kept_is_a_pool(keepdims, axes):
    found = global_means(Model.from_proto(mean_gate(keepdims, axes)))
    assert found == ({"pooled"} if keepdims and len(axes) == 2 else set())


def test_ranks_come_from_shape_inference_when_the_ir_has_none():
    model = Model.from_proto(mean_gate())
    assert model.graph.tensors()["stem_relu"].shape is None  # the builder writes no value_info
    assert global_means(model) == {"pooled"}
