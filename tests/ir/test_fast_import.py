"""irtool.ir.convert must build the same graphs as graphsurgeon's import_onnx and the same protos as
its export_onnx (byte for byte), on varied models: subgraphs with outer-scope references, functions
with attribute references, opset imports of custom domains, value_info, sparse initializers,
metadata, external data, optional inputs, attributes of every kind and graphs edited after import.
No timing assertions here: speed is measured by bench/ir_roundtrip.py.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.util.misc import SynchronizedList

from irtool.ir import Model, convert, io
from irtool.ir.topo import is_topologically_sorted, topo_order

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import models as bench_models  # noqa: E402

F = TensorProto.FLOAT


def _vi(name, shape=(1, 4), elem=F):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def _w(name, shape, seed=0, dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(dtype), name)


def _model(graph, opsets=(("", 17),), functions=(), ir_version=8, **fields):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              functions=list(functions), **fields)
    model.ir_version = ir_version
    return model


# ------------------------------------------------------------------------------------- models
def plain_model():
    """Initializers, value_info with symbolic dims, unnamed nodes, an optional input, all attr kinds."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"]),  # unnamed
        helper.make_node("Clip", ["r", "", "hi"], ["c"], name="clip"),  # omitted optional input
        helper.make_node("LeakyRelu", ["c"], ["l"], name="leaky", alpha=0.25),
        helper.make_node("Constant", [], ["k"], name="const", value=numpy_helper.from_array(
            np.arange(4, dtype=np.float32).reshape(1, 4), "kval")),
        helper.make_node("Mul", ["l", "k"], ["m"], name="mul"),
        helper.make_node("ReduceSum", ["m", "axes"], ["y"], name="sum", keepdims=1),
        helper.make_node("Custom", ["y"], ["z"], name="custom", domain="my.domain", f=1.5, i=3,
                         s="text", fs=[1.0, 2.5], ints=[1, 2, 3], strs=["a", "b"]),
    ]
    graph = helper.make_graph(
        nodes, "plain", [_vi("x", ("N", 4)), _vi("b", (1, 4))], [_vi("y", ("N", 1)), _vi("z", None)],
        [_w("b", (1, 4)), numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
        value_info=[_vi("s", ("N", 4)), _vi("m", None), helper.make_empty_tensor_value_info("r")],
        doc_string="a graph doc")
    model = _model(graph, opsets=(("", 17), ("my.domain", 2)), producer_name="tests",
                   producer_version="1.0", doc_string="model doc", model_version=7)
    helper.set_model_props(model, {"author": "irtool", "license": "Apache-2.0"})
    return model


def if_loop_model():
    """If branches and a Loop body reading outer values; an If nested inside the Loop body."""
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t_out"], name="then_add")],
                               "then", [], [_vi("t_out")])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e_out"], name="else_sub"),
                                helper.make_node("Identity", ["e_out"], ["e_id"], name="else_id")],
                               "else", [], [_vi("e_id")], value_info=[_vi("e_out"), _vi("x")])
    inner_then = helper.make_graph([helper.make_node("Mul", ["acc", "w"], ["it"], name="inner_mul")],
                                   "inner_then", [], [_vi("it")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["acc"], ["ie"], name="inner_id")],
                                   "inner_else", [], [_vi("ie")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("If", ["cond"], ["acc_new"], name="inner_if", then_branch=inner_then,
                          else_branch=inner_else)],
        "body", [_vi("iter", (), TensorProto.INT64), _vi("cond_in", (), TensorProto.BOOL), _vi("acc")],
        [_vi("cond_out", (), TensorProto.BOOL), _vi("acc_new")],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "body_const")])
    nodes = [
        helper.make_node("If", ["cond"], ["if_out"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "if_out"], ["loop_out"], name="loop", body=body),
        helper.make_node("Relu", ["loop_out"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "main", [_vi("x"), _vi("cond", (), TensorProto.BOOL)], [_vi("y")],
        [_w("w", (1, 4)), numpy_helper.from_array(np.array(3, np.int64), "trip")])
    return _model(graph)


def function_model():
    """A model-local function with an attribute reference, called twice."""
    fn = helper.make_function(
        "local", "Scale", ["a"], ["b"],
        [helper.make_node("Constant", [], ["s"], value_float=2.0),
         helper.make_node("Mul", ["a", "s"], ["m"]),
         helper.make_node("LeakyRelu", ["m"], ["b"], alpha=0.1)],
        [helper.make_opsetid("", 17)], attributes=["unused"])
    leaky = fn.node[2].attribute[0]
    leaky.ClearField("f")
    leaky.ref_attr_name = "alpha"
    fn.attribute_proto.append(helper.make_attribute("alpha", 0.2))
    graph = helper.make_graph(
        [helper.make_node("Scale", ["x"], ["h"], name="call1", domain="local"),
         helper.make_node("Scale", ["h"], ["y"], name="call2", domain="local", alpha=0.3)],
        "with_function", [_vi("x")], [_vi("y")])
    return _model(graph, opsets=(("", 17), ("local", 1)), functions=[fn])


def sparse_and_odd_attrs_model():
    """A sparse initializer, a float16 and a string initializer, attributes graphsurgeon skips."""
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [1, 4])
    odd = helper.make_node("Custom", ["x"], ["c"], name="odd", domain="my.domain")
    odd.attribute.append(helper.make_attribute("graphs", [helper.make_graph([], "g0", [], [])]))
    odd.attribute.append(helper.make_attribute("tp", helper.make_tensor_type_proto(F, [1])))
    odd.attribute.append(helper.make_attribute_ref("ref", onnx.AttributeProto.FLOAT,
                                                   ref_attr_name="outer_alpha"))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "sp"], ["a"], name="add"),
         helper.make_node("Cast", ["h"], ["hf"], name="cast", to=F),
         helper.make_node("Add", ["a", "hf"], ["y"], name="add2"), odd],
        "sparse", [_vi("x")], [_vi("y"), _vi("c", None)],
        [numpy_helper.from_array(np.ones((1, 4), np.float16), "h"),
         helper.make_tensor("names", TensorProto.STRING, [2], [b"a", b"b"])],
        sparse_initializer=[sparse])
    return _model(graph, opsets=(("", 17), ("my.domain", 1)))


def undefined_input_model():
    """A node reads a value nothing defines; graph inputs listed with their initializers (old style)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["a"], name="add"),
         helper.make_node("Mul", ["a", "w"], ["y"], name="mul")],
        "ghosts", [_vi("x"), _vi("w")], [_vi("y")], [_w("w", (1, 4))])
    return _model(graph, ir_version=3)


MODELS = {
    "plain": plain_model,
    "if_loop": if_loop_model,
    "function": function_model,
    "sparse_odd": sparse_and_odd_attrs_model,
    "undefined_input": undefined_input_model,
    "generated_300": lambda: bench_models.generated(300, seed=1),
    "generated_2000": lambda: bench_models.generated(2000, seed=2),
}


# ------------------------------------------------------------------------------------- helpers
def _fresh(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString(deterministic=True)


def describe(graph: gs.Graph) -> list:
    """Everything observable about an imported graph, with tensor and node identities as indices."""
    ids: dict[int, int] = {}

    def ref(obj):
        return ids.setdefault(id(obj), len(ids))

    def tensor(t):
        entry = [ref(t), type(t).__name__, t.name, [ref(n) for n in t.inputs], [ref(n) for n in t.outputs]]
        assert isinstance(t.inputs, SynchronizedList) and isinstance(t.outputs, SynchronizedList)
        if isinstance(t, gs.Constant):
            values = t._values
            entry += [type(values).__name__, list(values.shape), str(values.dtype), values.nbytes,
                      t.data_location, t._export_dtype]
        else:
            shape = None if t.shape is None else list(t.shape)
            entry += [str(t.dtype), shape, t.type]
        return entry

    def attr(value):
        if isinstance(value, gs.Graph):
            return ["graph", walk(value)]
        if isinstance(value, gs.Tensor):
            return ["tensor", tensor(value)]
        return [type(value).__name__, value]

    def walk(g):
        out = [g.name, g.doc_string, g.opset, g.producer_name, g.producer_version, g.ir_version,
               [(d.domain, d.version) for d in g.import_domains or []], len(g.functions),
               [tensor(t) for t in g.inputs], [tensor(t) for t in g.outputs]]
        for node in g.nodes:
            assert isinstance(node.inputs, SynchronizedList) and isinstance(node.outputs, SynchronizedList)
            out.append([ref(node), node.op, node.name, node.domain, type(node.attrs).__name__,
                        [(k, attr(v)) for k, v in node.attrs.items()],
                        [tensor(t) for t in node.inputs], [tensor(t) for t in node.outputs]])
        return out

    return walk(graph)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_builds_the_same_graph_as_graphsurgeon(name):
    proto = MODELS[name]()
    ours, theirs = convert.import_model(_fresh(proto)), gs.import_onnx(_fresh(proto))
    assert describe(ours) == describe(theirs)
    assert [f.name for f in ours.functions] == [f.name for f in theirs.functions]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_is_byte_identical_to_graphsurgeon(name):
    proto = MODELS[name]()
    expected = _bytes(gs.export_onnx(gs.import_onnx(_fresh(proto)), do_type_check=False))
    assert _bytes(convert.export_model(convert.import_model(_fresh(proto)))) == expected
    # each half on its own, against the other library's half
    assert _bytes(convert.export_model(gs.import_onnx(_fresh(proto)))) == expected
    assert _bytes(gs.export_onnx(convert.import_model(_fresh(proto)), do_type_check=False)) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_with_type_check_matches(name):
    proto = MODELS[name]()
    try:
        expected = _bytes(gs.export_onnx(gs.import_onnx(_fresh(proto)), do_type_check=True))
    except Exception as e:  # graphsurgeon refuses untyped graph inputs/outputs; so must we
        with pytest.raises(type(e)):
            convert.export_model(convert.import_model(_fresh(proto)), do_type_check=True)
        return
    assert _bytes(convert.export_model(convert.import_model(_fresh(proto)), do_type_check=True)) == expected


def test_outer_scope_references_resolve_to_the_outer_tensor():
    graph = convert.import_model(if_loop_model())
    x = graph.inputs[0]
    then_add = graph.nodes[0].attrs["then_branch"].nodes[0]
    assert then_add.inputs[0] is x
    assert then_add in x.outputs
    inner_if = graph.nodes[1].attrs["body"].nodes[1]
    inner_mul = inner_if.attrs["then_branch"].nodes[0]
    acc = graph.nodes[1].attrs["body"].inputs[2]
    assert inner_mul.inputs[0] is acc
    assert inner_mul.inputs[1] is graph.nodes[0].attrs["then_branch"].nodes[0].inputs[1]  # outer w
    assert graph.nodes[1].attrs["body"].functions is graph.functions


def _edit(graph: gs.Graph) -> None:
    """Edits a pass might make: new nodes and constants, numpy and bool attributes, removals."""
    first = graph.nodes[0]
    extra = gs.Variable("edited_out", dtype=np.float32, shape=[1, 4])
    scale = gs.Constant("edited_scale", np.full((1, 4), 0.5, np.float32))
    graph.nodes.append(gs.Node("Mul", "edited_mul", inputs=[first.outputs[0], scale], outputs=[extra],
                               attrs={"np_float": np.float32(0.5), "flag": True, "mixed": [1, 2.5],
                                      "dtype": np.float32}))
    graph.outputs.append(extra)
    first.attrs["added_ints"] = [4, 5]


@pytest.mark.parametrize("name", ["plain", "if_loop", "generated_300"])
def test_edited_graphs_export_identically(name):
    ours, theirs = convert.import_model(MODELS[name]()), gs.import_onnx(MODELS[name]())
    _edit(ours)
    _edit(theirs)
    ours.cleanup()
    theirs.cleanup()
    assert _bytes(convert.export_model(ours)) == _bytes(gs.export_onnx(theirs, do_type_check=False))


def test_unexportable_attribute_fails_like_graphsurgeon():
    for make in (convert.import_model, gs.import_onnx):
        graph = make(plain_model())
        graph.nodes[0].attrs["empty"] = []
    with pytest.raises(ValueError):
        gs.export_onnx(graph, do_type_check=False)
    with pytest.raises(ValueError):
        convert.export_model(graph)


def test_synchronized_lists_stay_synchronized():
    graph = convert.import_model(plain_model())
    add, relu = graph.nodes[0], graph.nodes[1]
    s = add.outputs[0]
    assert s.inputs == [add] and s.outputs == [relu]
    relu.inputs[0] = graph.inputs[0]
    assert s.outputs == [] and relu in graph.inputs[0].outputs
    relu.inputs.clear()
    assert relu not in graph.inputs[0].outputs


def test_external_data_round_trip(tmp_path):
    proto = bench_models.generated(50, seed=3)
    big = _w("big", (64, 64))
    proto.graph.initializer.append(big)
    proto.graph.node.append(helper.make_node("MatMul", ["big", "big"], ["bb"], name="mm"))
    proto.graph.output.append(_vi("bb", (64, 64)))
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=1024)
    loaded = io.read_model_proto(tmp_path / "m.onnx")
    expected = _bytes(gs.export_onnx(gs.import_onnx(_fresh(loaded)), do_type_check=False))
    assert _bytes(convert.export_model(convert.import_model(_fresh(loaded)))) == expected
    model = Model.load(tmp_path / "m.onnx")
    model.save(tmp_path / "out.onnx", external_data=True)
    again = Model.load(tmp_path / "out.onnx")
    assert _bytes(again.to_proto()) == _bytes(model.to_proto())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_round_trip_keeps_model_fields(name, tmp_path):
    proto = MODELS[name]()
    model = Model.from_proto(_fresh(proto))
    out = model.to_proto()
    assert out.ir_version == proto.ir_version
    assert {(o.domain, o.version) for o in out.opset_import} >= {(o.domain, o.version) for o in proto.opset_import}
    assert [(p.key, p.value) for p in out.metadata_props] == sorted((p.key, p.value) for p in proto.metadata_props)
    assert (out.model_version, out.domain, out.doc_string) == (proto.model_version, proto.domain, proto.doc_string)
    assert [f.name for f in out.functions] == [f.name for f in proto.functions]
    assert [t.name for t in out.graph.value_info] == [t.name for t in proto.graph.value_info if t.type.ByteSize()]
    path = tmp_path / "m.onnx"
    model.save(path, proto=out)
    assert path.read_bytes() == _bytes(out)


def test_save_decides_external_data_by_size(tmp_path, monkeypatch):
    model = Model.from_proto(bench_models.generated(30))
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1)  # everything counts as huge
    model.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()


# ------------------------------------------------------------------------------------- topo fast path
@pytest.mark.parametrize("seed", range(8))
def test_sorted_check_agrees_with_the_sort(seed):
    graph = convert.import_model(bench_models.generated(120, seed=seed))
    nodes = list(graph.nodes)
    assert is_topologically_sorted(nodes) and topo_order(nodes) == list(range(len(nodes)))
    rng = random.Random(seed)
    for _ in range(5):
        rng.shuffle(nodes)
        assert is_topologically_sorted(nodes) == (topo_order(nodes) == list(range(len(nodes))))


def test_sorted_check_sees_subgraph_reads_and_double_producers():
    graph = convert.import_model(if_loop_model())
    nodes = list(graph.nodes)
    assert is_topologically_sorted(nodes)
    producer = gs.Node("Identity", "late_w", inputs=[gs.Variable("src")], outputs=[graph.nodes[0].inputs[0]])
    assert not is_topologically_sorted([*nodes, producer])  # If's condition produced after the If
    twice = gs.Node("Identity", "twice", inputs=[graph.inputs[0]], outputs=[nodes[2].outputs[0]])
    assert not is_topologically_sorted([*nodes, twice])
