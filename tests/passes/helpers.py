"""Shared helpers for pass tests: build models from ONNX text, run pipelines, run ONNX Runtime."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from irtool.ir.model import Model
from irtool.passmanager import PassContext, PassManager, PassRecord
from irtool.pipeline import parse_pipeline

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def parse(text: str) -> onnx.ModelProto:
    """ONNX textual syntax; the opset header is added when missing."""
    return onnx.parser.parse_model(text if text.lstrip().startswith("<") else HEADER + text)


def model_of(text_or_proto: str | onnx.ModelProto) -> Model:
    proto = parse(text_or_proto) if isinstance(text_or_proto, str) else text_or_proto
    return Model.from_proto(proto)


@functools.lru_cache(maxsize=None)
def _parsed(pipeline: str):
    # Parsing lists entry points (~10 ms); property tests parse the same few texts thousands of times.
    return parse_pipeline(pipeline)


def run(model: Model, pipeline: str, ctx: PassContext | None = None) -> list[PassRecord]:
    """Run `pipeline` on `model` in place, verifying the input and the IR after every pass."""
    return PassManager(_parsed(pipeline).build(), verify_each=True).run(model, ctx)


def serialized(model: Model) -> bytes:
    return model.to_proto().SerializeToString(deterministic=True)


def ops(model: Model) -> list[str]:
    return [node.op for node in model.nodes()]


def node(model: Model, name: str) -> gs.Node:
    return next(n for n in model.nodes() if n.name == name)


def random_inputs(proto: onnx.ModelProto, rng: np.random.Generator, flag: bool) -> dict[str, np.ndarray]:
    """Inputs for every non-initializer graph input: normal floats, small non-negative ints, and a
    scalar bool set to `flag` (so both branches of an If on it can be run). Symbolic dims become 2."""
    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tensor_type.shape.dim]
        if dtype == np.bool_:
            feeds[info.name] = np.full(shape, flag) if not shape else rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[info.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def feeds_for(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return random_inputs(proto, np.random.default_rng(seed), seed % 2 == 0)


def run_ort(model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    proto = model.to_proto() if isinstance(model, Model) else model
    if proto.ir_version > 10:
        proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def within_budget(got: np.ndarray, reference: np.ndarray, rel: float = 1e-2, atol: float = 1e-3) -> bool:
    """max |got - reference| <= rel * max |reference| + atol, where NaN in both counts as agreement (a random
    graph's Sqrt or Log of negatives gives NaN in float32 and in float16 alike)."""
    both_nan = np.isnan(reference) & np.isnan(got)
    error = np.where(both_nan, 0.0, np.abs(got - reference))
    return bool(np.max(error, initial=0) <= rel * np.max(np.abs(np.where(both_nan, 0.0, reference)), initial=0) + atol)


def assert_same_outputs(before: Model, after: Model, *, atol: float = 0.0, rtol: float = 0.0,
                        seeds: tuple[int, ...] = (0, 1)) -> None:
    """Both models give the same outputs (same names, dtypes, shapes; values within tolerance)."""
    for seed in seeds:
        feeds = feeds_for(before.to_proto(), seed)
        ref, got = run_ort(before, feeds), run_ort(after, feeds)
        assert sorted(ref) == sorted(got)
        for name in ref:
            assert ref[name].dtype == got[name].dtype and ref[name].shape == got[name].shape, name
            if atol == 0.0 and rtol == 0.0:
                np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
            else:
                np.testing.assert_allclose(got[name], ref[name], atol=atol, rtol=rtol, err_msg=name)
