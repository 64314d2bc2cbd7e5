"""Safe loading (every unusable input is a one-line InputError, nothing outside the folder is read)
and atomic, deterministic saving with round-trip fidelity."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from irtool.errors import InputError
from irtool.ir import Model
from irtool.ir import io as ir_io
from tests.ir.helpers import add_proto, conv_proto


def load_error(path) -> str:
    with pytest.raises(InputError) as info:
        Model.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------- bad files
def test_missing_path(tmp_path):
    assert load_error(tmp_path / "absent.onnx").endswith("absent.onnx: no such file")


def test_directory(tmp_path):
    assert "is a directory" in load_error(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    assert "file is empty" in load_error(tmp_path / "e.onnx")


def test_random_bytes(tmp_path):
    (tmp_path / "r.onnx").write_bytes(np.random.default_rng(0).bytes(1000))
    assert "not a valid ONNX protobuf" in load_error(tmp_path / "r.onnx")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_protobuf(tmp_path, keep):
    data = conv_proto().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: int(len(data) * keep)])
    message = load_error(tmp_path / "t.onnx")
    assert "not a valid ONNX protobuf" in message or "not an ONNX model" in message


def test_every_truncation_is_refused(tmp_path):
    data = conv_proto().SerializeToString()
    for length in range(1, len(data)):
        (tmp_path / "t.onnx").write_bytes(data[:length])
        with pytest.raises(InputError):
            Model.load(tmp_path / "t.onnx")


@pytest.mark.parametrize("message", [
    numpy_helper.from_array(np.ones(10, np.float32), "t"),   # a TensorProto
    conv_proto().graph,                                       # a GraphProto
])
def test_protobuf_that_is_not_a_model(tmp_path, message):
    (tmp_path / "m.onnx").write_bytes(message.SerializeToString())
    text = load_error(tmp_path / "m.onnx")
    assert "not a valid ONNX protobuf" in text or "not an ONNX model" in text


def test_opset_below_minimum_loads_upgraded(tmp_path):
    onnx.save(conv_proto(opset=11), tmp_path / "m.onnx")
    model = Model.load(tmp_path / "m.onnx")
    assert (model.source_opset, model.opset) == (11, 13)


def test_opset_newer_than_onnx(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    onnx.save(conv_proto(opset=newest + 1), tmp_path / "m.onnx")
    assert f"opset {newest + 1} is newer than this onnx supports ({newest})" in load_error(tmp_path / "m.onnx")


# ----------------------------------------------------------------------------------------- external data
def save_with_location(folder: Path, location: str) -> Path:
    """A model whose weight claims to live at `location` (written by hand, nothing checked)."""
    proto = add_proto()
    tensor = proto.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def outside_secret(tmp_path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(2048, dtype=np.float32).tobytes())
    (tmp_path / "models").mkdir()
    return secret


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path opened through builtins.open during the test."""
    paths: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        paths.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return paths


def test_external_data_file_missing(tmp_path):
    path = save_with_location(tmp_path, "weights.bin")
    assert "external data file 'weights.bin' is missing" in load_error(path)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_folder_is_refused_unread(tmp_path, outside_secret, opened, kind):
    folder = tmp_path / "models"
    if kind == "absolute":
        location, expected = str(outside_secret), "is absolute; refused"
    elif kind == "dotdot":
        location, expected = "../secret.bin", "leaves the model folder; refused"
    else:
        (folder / "link.bin").symlink_to(outside_secret)
        location, expected = "link.bin", "leaves the model folder; refused"
    path = save_with_location(folder, location)
    assert expected in load_error(path)
    assert str(outside_secret.resolve()) not in opened
    assert str(path.resolve()) in opened   # the spy does see reads


def test_external_data_inside_the_folder_loads(tmp_path):
    path = save_with_location(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.arange(2048, dtype=np.float32).tobytes())
    model = Model.load(path)
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[1].values, np.arange(2048, dtype=np.float32))


# ----------------------------------------------------------------------------------------- saving
def test_save_is_deterministic_and_leaves_no_temp_files(tmp_path):
    model = Model.from_proto(conv_proto())
    model.save(tmp_path / "a.onnx")
    model.save(tmp_path / "b.onnx")
    Model.from_proto(conv_proto()).save(tmp_path / "c.onnx")
    first = (tmp_path / "a.onnx").read_bytes()
    assert first == (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]


def test_saved_file_gets_umask_permissions(tmp_path):
    # mkstemp would leave 0600; a saved model is readable like any other file the user writes
    Model.from_proto(conv_proto()).save(tmp_path / "a.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("external", [False, True])
def test_failed_rename_leaves_no_output(tmp_path, monkeypatch, external):
    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        Model.from_proto(add_proto()).save(tmp_path / "out.onnx", external_data=external)
    assert list(tmp_path.iterdir()) == []


def test_failed_model_rename_withdraws_published_data(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_data_only(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError("disk on fire")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_data_only)
    with pytest.raises(OSError):
        Model.from_proto(add_proto()).save(tmp_path / "out.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_its_input(tmp_path):
    onnx.save(conv_proto(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    model = Model.load(tmp_path / "m.onnx")
    (tmp_path / "alias").symlink_to(tmp_path)
    for same_file in (tmp_path / "m.onnx", tmp_path / "alias" / "m.onnx"):
        with pytest.raises(InputError, match="refusing to overwrite the input model"):
            model.save(same_file)
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_input_bytes_unchanged_after_load_and_save_elsewhere(tmp_path):
    onnx.save(conv_proto(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    Model.load(tmp_path / "m.onnx").save(tmp_path / "out.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert (tmp_path / "out.onnx").exists()


def test_round_trip_preserves_model_fields(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Custom", ["r"], ["y"], name="custom", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, ir_version=9, model_version=7, doc_string="what it does", domain="org.x",
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 3)])
    helper.set_model_props(proto, {"b": "2", "a": "1"})
    onnx.save(proto, tmp_path / "in.onnx")
    Model.load(tmp_path / "in.onnx").save(tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    assert (out.ir_version, out.model_version, out.doc_string, out.domain) == (9, 7, "what it does", "org.x")
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 3)}
    assert [(p.key, p.value) for p in out.metadata_props] == [("a", "1"), ("b", "2")]
    assert [(n.name, n.domain, n.op_type) for n in out.graph.node] == [
        ("relu", "", "Relu"), ("custom", "com.example", "Custom")]


def test_external_data_code_path_round_trips(tmp_path, monkeypatch):
    # The >2 GB path, exercised cheaply: any tensor data above 1 KB counts as "too big for protobuf".
    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    proto = add_proto()
    Model.from_proto(proto).save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size == 2048 * 4
    stored = onnx.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer[0]
    assert external_data_helper.uses_external_data(stored)
    loaded = Model.load(tmp_path / "m.onnx")
    np.testing.assert_array_equal(loaded.graph.nodes[0].inputs[1].values, np.arange(2048, dtype=np.float32))


def test_writing_external_data_leaves_the_proto_as_it_was(tmp_path):
    proto = add_proto()
    before = proto.SerializeToString()
    ir_io.write_model_proto(proto, tmp_path / "m.onnx", external_data=True)
    assert proto.SerializeToString() == before


def test_tensor_bytes_counts_dims_times_itemsize():
    proto = conv_proto()
    assert ir_io.tensor_bytes(proto) == (4 * 3 * 3 * 3 + 4) * 4


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IRTOOL_SLOW") != "1", reason="needs ~8 GB RAM and ~1 min; set IRTOOL_SLOW=1")
@pytest.mark.parametrize("opset", [17, 11])  # 11: upgraded on load, its weights held out of the converter
def test_real_model_over_2gb_round_trips(tmp_path, opset):
    import onnx_graphsurgeon as gs

    n = 1_100_000_000 // 4     # two 1.1 GB initializers: 2.2 GB, past protobuf's 2 GiB
    x, y, z = (gs.Variable(name, np.float32, [n]) for name in ("x", "y", "z"))
    a = gs.Constant("a", np.full(n, 1.0, np.float32))
    b = gs.Constant("b", np.full(n, 2.0, np.float32))
    graph = gs.Graph(nodes=[gs.Node("Add", "add", inputs=[x, a], outputs=[y]),
                            gs.Node("Mul", "mul", inputs=[y, b], outputs=[z])], inputs=[x], outputs=[z], opset=opset)
    Model(graph).save(tmp_path / "big.onnx")
    del graph, a, b
    assert (tmp_path / "big.onnx.data").stat().st_size == 2 * n * 4
    assert (tmp_path / "big.onnx").stat().st_size < 4096
    loaded = Model.load(tmp_path / "big.onnx")
    values = loaded.graph.nodes[1].inputs[1].values
    assert values.shape == (n,) and values[0] == 2.0 and values[-1] == 2.0
    assert (loaded.source_opset, loaded.opset) == (opset, max(opset, 13))
