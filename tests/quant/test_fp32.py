"""fp32: a float16 model back to float32 computation, exactly (its weights bit for bit), its interface kept; and
`quant` on a float16 model, which came out unquantized before the pipelines ran fp32 first."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, numpy_helper

from irtool.api import optimize
from irtool.ir.model import Model
from irtool.ir.printer import format_model
from tests.graphgen import models
from tests.passes.helpers import feeds_for, model_of, run, run_ort, within_budget
from tests.quant.torch_models import cnn_proto, encoder_proto

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _half(proto, keep_io_types: bool = True) -> Model:
    model = model_of(proto)
    run(model, f"fp16{{keep-io-types={str(keep_io_types).lower()}}}")
    return model


def _initializers(model: Model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.to_proto().graph.initializer}


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


@pytest.mark.parametrize("build", [cnn_proto, encoder_proto], ids=["cnn", "encoder"])
def test_float16_model_back_to_float32_keeps_every_weight_and_loses_the_casts(build):
    half = _half(build())
    model = half.copy()
    stats = run(model, "fp32")[0].stats
    assert stats["nodes_converted"] > 5 and stats["nodes_kept_fp16"] == 0
    weights = _initializers(model)
    float_weights = {k: v for k, v in weights.items() if v.dtype.kind == "f"}
    assert float_weights and all(v.dtype == np.float32 for v in float_weights.values())
    halves = {k: v for k, v in _initializers(half).items() if v.dtype == np.float16}
    # every float16 weight came back as the same number (names differ: the converted copies are new tensors)
    assert sorted(v.astype(np.float32).tobytes() for v in halves.values()) == \
        sorted(v.tobytes() for v in float_weights.values())
    run(model, "cleanup")
    float_casts = [n for n in model.to_proto().graph.node if n.op_type == "Cast" and n.attribute[0].i in (F16, F32)]
    assert float_casts == []  # the boundary Casts became no-ops, which cleanup removed
    feeds = feeds_for(build(), 0)
    ref, got = run_ort(half, feeds)["y"], run_ort(model, feeds)["y"]
    assert got.dtype == ref.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * float(np.max(np.abs(ref))))


def test_float16_interface_stays_float16_unless_asked():
    half = _half(cnn_proto(), keep_io_types=False)
    for keep, kind in ((True, F16), (False, F32)):
        model = half.copy()
        run(model, f"fp32{{keep-io-types={str(keep).lower()}}},cleanup")
        proto = model.to_proto()
        assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [("x", kind)]
        assert [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output] == [("y", kind)]
        assert sum(n.op_type == "Cast" for n in proto.graph.node) == (2 if keep else 0)
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float16 if keep else np.float32)
        out = run_ort(model, {"x": x})["y"]
        assert out.dtype == (np.float16 if keep else np.float32)
        ref = run_ort(half, {"x": x.astype(np.float16)})["y"].astype(np.float32)
        assert _sqnr(ref, out.astype(np.float32)) > 50


def test_declines_on_a_float32_model():
    model = model_of(cnn_proto())
    before = format_model(model)
    record = run(model, "fp32")[0]
    assert record.modified is False and record.stats == {"nodes_converted": 0}
    assert format_model(model) == before


def test_quant_on_a_float16_model_quantizes_like_the_float32_one(caplog):
    """Before fp32 ran first, insert-qdq placed no Q/DQ at all on a float16 model, silently."""
    original = cnn_proto()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
    xs = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    ref = np.concatenate([run_ort(model_of(original), x)["y"] for x in xs])
    sqnr = {}
    for name, model in (("float32", model_of(original)), ("float16", _half(original))):
        result = optimize(model, "quant", calibration_data=calib)
        ops = [n.op for n in result.model.graph.nodes]
        assert ops.count("QuantizeLinear") >= 5, name
        assert not any(np.dtype(t.dtype) == np.float16 for n in result.model.graph.nodes for t in n.outputs
                       if t.dtype is not None), name
        sqnr[name] = _sqnr(ref, np.concatenate([run_ort(result.model, x)["y"] for x in xs]))
    assert sqnr["float32"] > 25 and sqnr["float16"] > sqnr["float32"] - 1.0, sqnr
    with caplog.at_level(logging.WARNING):
        result = optimize(_half(original), "calibrate,insert-qdq", calibration_data=calib)
    assert "nothing quantized: the model computes in float16" in caplog.text
    assert not any(n.op == "QuantizeLinear" for n in result.model.graph.nodes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_random_graphs_fp16_then_fp32_verify_and_compute_in_float32(proto):
    half = _half(proto)
    model = half.copy()
    run(model, "fp32")  # verifies after the pass
    assert not any(np.dtype(c.dtype) == np.float16 for n in model.graph.nodes for c in n.inputs
                   if c.dtype is not None and hasattr(c, "values"))
    feeds = feeds_for(proto, 0)
    ref, got, original = run_ort(half, feeds), run_ort(model, feeds), run_ort(model_of(proto), feeds)
    for name, value in ref.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        # float32 arithmetic on the float16-rounded weights: no further from the float32 model than fp16 was
        assert within_budget(got[name], original[name]), name
    once = format_model(model)
    assert run(model, "fp32")[0].modified is False and format_model(model) == once


def test_a_float16_island_made_by_casts_alone_is_found():
    """No float16 weight or input: the float16 values come only from a Cast's `to`."""
    model = model_of("agraph (float[3] x) => (float[3] y) { h = Cast<to = 10>(x)\n r = Relu(h)\n"
                     " y = Cast<to = 1>(r) }")
    assert run(model, "fp32,cleanup")[0].stats["nodes_converted"] == 3  # both Casts and the Relu
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    x = np.array([-1.0, 0.1, 3.0], np.float32)
    assert run_ort(model, {"x": x})["y"].tolist() == [0.0, np.float32(0.1), 3.0]
