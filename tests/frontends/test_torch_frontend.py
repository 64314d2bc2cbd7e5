"""The PyTorch frontend: optimize() on an nn.Module and `irtool export`, against torch's own outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from irtool.api import optimize
from irtool.errors import InputError
from irtool.frontends.torch import export_module
from tests.cli.conftest import assert_one_line_error, run_cli, sha256
from tests.passes.helpers import run_ort


class Net(nn.Module):
    """Conv, BatchNorm (running statistics only in eval mode), Dropout (identity only in eval mode), Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, img):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(img))).mean((2, 3))))


class TokenPool(nn.Module):
    """Token ids and a mask of the same length, pooled: the token dim must be one symbol for both."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids, mask):
        return self.fc((self.emb(ids) * mask.unsqueeze(-1)).sum(1))


class Branchy(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, the tracer records one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


def trained_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    net.train()
    with torch.no_grad():  # running statistics that differ from the batch's, so eval mode matters
        for _ in range(3):
            net(torch.randn(8, 3, 16, 16) * 2 + 1)
    return net


def torch_eval(net: nn.Module, x: np.ndarray) -> np.ndarray:
    training = net.training
    net.eval()
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    net.train(training)
    return out


@pytest.mark.parametrize("exporter", ["auto", "dynamo", "torchscript"])
def test_a_module_exports_in_eval_mode_with_a_dynamic_batch_and_forwards_names(exporter):
    net = trained_net()
    net.drop.eval()  # a mixed state, which must come back as it was
    flags = [m.training for m in net.modules()]
    proto = export_module(net, torch.randn(1, 3, 16, 16), exporter=exporter)
    assert [m.training for m in net.modules()] == flags
    assert [i.name for i in proto.graph.input] == ["img"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is symbolic
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    got = next(iter(run_ort(proto, {"img": x}).values()))
    np.testing.assert_allclose(got, torch_eval(net, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_transformer_encoder_exports_with_either_exporter_and_a_dynamic_batch(exporter):
    """Under no_grad an eval-mode nn.MultiheadAttention runs its fused fast path, which the TorchScript exporter
    cannot export ('aten::_native_multi_head_attention ... not supported'): the tracer runs with grad on. With
    an example batch of 1, torch.export fixed the batch at 1 without a word: irtool exports again with 2."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    proto = export_module(net, torch.randn(1, 6, 16), exporter=exporter)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(0).standard_normal((3, 6, 16)).astype(np.float32)
    got = next(iter(run_ort(proto, {proto.graph.input[0].name: x}).values()))
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


class BranchOnBatch(nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] == 3 else x


def test_a_batch_the_module_fixes_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="irtool.frontends.torch"):
        proto = export_module(BranchOnBatch(), torch.randn(3, 6), exporter="dynamo")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert "made dim 0 of 'x' static" in caplog.text


def test_optimize_takes_a_module_with_example_inputs_and_quantizes_it():
    net = trained_net()
    rng = np.random.default_rng(1)
    calib = [{"img": (rng.standard_normal((8, 3, 16, 16)) * 2 + 1).astype(np.float32)} for _ in range(8)]
    result = optimize(net, "quant", example_inputs=torch.randn(1, 3, 16, 16), calibration_data=calib)
    assert result.model.source == "<torch Net>"
    assert sum(n.op == "QuantizeLinear" for n in result.model.graph.nodes) >= 2
    x = (rng.standard_normal((16, 3, 16, 16)) * 2 + 1).astype(np.float32)
    ref, got = torch_eval(net, x), next(iter(run_ort(result.model, {"img": x}).values()))
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 25


def test_auto_falls_back_to_the_tracer_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="irtool"):
        proto = export_module(Branchy(), torch.ones(2, 4))
    assert "the dynamo exporter failed (GuardOnDataDependentSymNode" in caplog.text
    assert "using the TorchScript tracer" in caplog.text
    assert [n.op_type for n in proto.graph.node] == ["Gemm"]  # the branch the example input took
    with pytest.raises(InputError, match=r"^exporting Branchy with torch's dynamo exporter failed: "):
        export_module(Branchy(), torch.ones(2, 4), exporter="dynamo")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_axes_make_the_token_dim_symbolic_and_tie_it_across_inputs(exporter):
    torch.manual_seed(0)
    module = TokenPool().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    tokens = {"ids": {1: "tokens"}, "mask": {1: "tokens"}}
    proto = export_module(module, (ids, mask), dynamic_axes=tokens, exporter=exporter)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", "tokens"], ["batch", "tokens"]]
    rng = np.random.default_rng(0)
    for count in (3, 11):
        feeds = {"ids": rng.integers(0, 50, (3, count)), "mask": rng.integers(0, 2, (3, count)).astype(np.float32)}
        with torch.no_grad():
            ref = module(torch.from_numpy(feeds["ids"]), torch.from_numpy(feeds["mask"])).numpy()
        np.testing.assert_allclose(next(iter(run_ort(proto, feeds).values())), ref, rtol=1e-5, atol=1e-6)


class Encoder(nn.Module):
    """Hugging Face's calling convention: input_ids, then optional attention_mask and token_type_ids."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = self.emb(input_ids)
        if token_type_ids is not None:
            x = x + token_type_ids.unsqueeze(-1).to(x.dtype)
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1)
        return self.fc(x.sum(1))


def encoder_feeds(seed: int, batch: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 50, (batch, tokens)), "token_type_ids": rng.integers(0, 2, (batch, tokens))}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_example_inputs_by_name_skip_optional_parameters_in_any_order(exporter):
    """token_type_ids without attention_mask: passed by keyword through a wrapper whose scope leaves no trace in
    the names, which match a positional export's (what exclude= regexes are written against)."""
    torch.manual_seed(0)
    module = Encoder().eval()
    example = {name: torch.from_numpy(value) for name, value in reversed(encoder_feeds(0, 2, 5).items())}
    tokens = {"input_ids": {1: "tokens"}, "token_type_ids": {1: "tokens"}}
    proto = export_module(module, example, dynamic_axes=tokens, exporter=exporter)
    assert [i.name for i in proto.graph.input] == ["input_ids", "token_type_ids"]  # forward's order
    names = {n.name for n in proto.graph.node} | {t.name for t in proto.graph.initializer}
    assert not [name for name in names if "irtool" in name]
    assert {"emb.weight", "fc.weight", "fc.bias"} <= {t.name for t in proto.graph.initializer}
    feeds = encoder_feeds(1, 3, 9)  # another batch and length than the example's
    with torch.no_grad():
        ref = module(**{name: torch.from_numpy(value) for name, value in feeds.items()}).numpy()
    np.testing.assert_allclose(next(iter(run_ort(proto, feeds).values())), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_example_inputs_by_name_that_lead_forward_export_as_a_tuple_would(exporter):
    """No wrapper where the names are forward's first parameters: the same bytes as the positional export."""
    torch.manual_seed(0)
    module = TokenPool().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    by_name = export_module(module, {"mask": mask, "ids": ids}, exporter=exporter)
    assert by_name.SerializeToString() == export_module(module, (ids, mask), exporter=exporter).SerializeToString()


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        logits, score = self.a(x), torch.sigmoid(self.b(x))
        return {"logits": logits, "score": score} if self.as_dict else (logits, score)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("as_dict", [False, True])
def test_outputs_are_named_alike_by_both_exporters_and_keep_a_dynamic_batch(exporter, as_dict):
    """A dict's keys, else output, output_1 (dynamo named them after ops, the tracer by numbers, and left the
    second output's batch static)."""
    torch.manual_seed(0)
    proto = export_module(TwoHeads(as_dict).eval(), torch.randn(1, 4), exporter=exporter)
    named = [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in proto.graph.output]
    names = ["logits", "score"] if as_dict else ["output", "output_1"]
    assert named == [(names[0], ["batch", 3]), (names[1], ["batch", 2])]
    assert [v.shape for v in run_ort(proto, {"x": np.ones((5, 4), np.float32)}).values()] == [(5, 3), (5, 2)]


@pytest.mark.parametrize("call, message", [
    (lambda: optimize(Net(), "cleanup"), r"a PyTorch module \(Net\) is exported first: give example_inputs"),
    (lambda: export_module(Net(), "x"), r"example input 0 is a str; expected a tensor or an array"),
    (lambda: export_module(Net(), ()), "example_inputs is empty"),
    (lambda: export_module(Net(), torch.ones(1, 3, 8, 8), exporter="onnx"), "exporter 'onnx': expected one of"),
    (lambda: export_module(Net(), torch.ones(1, 3, 8, 8), input_names=["a", "b"]), r"2 input name\(s\) for 1"),
    (lambda: export_module(Net(), torch.ones(1, 3, 8, 8), dynamic_axes={"x": {2: "h"}}), "the inputs are img"),
    (lambda: export_module(Net(), torch.ones(1, 3, 8, 8), dynamic_axes={"img": {4: "h"}}), "needs an axis of its 4"),
    (lambda: export_module(Net(), {"image": torch.ones(1, 3, 8, 8)}),
     r"example input 'image': Net.forward takes no such parameter \(it takes img\)"),
    (lambda: export_module(Encoder(), {"attention_mask": torch.ones(1, 5)}),
     "Encoder.forward needs 'input_ids', which has no default: give an example input for it"),
    (lambda: export_module(Encoder(), {"input_ids": "ids"}), r"example input 'input_ids' is a str; expected a tensor"),
    (lambda: export_module(Encoder(), {"input_ids": torch.ones(1, 5, dtype=torch.int64)}, input_names=["ids"]),
     "example inputs given by name are named by their keys; leave input_names out"),
])
def test_bad_calls_are_input_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()


MODULE_FILE = '''
import torch
from torch import nn

NUMBER = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids, scale):
        return self.fc(self.emb(ids).mean(1) * scale)


def build():
    torch.manual_seed(0)
    return Net()


def not_a_module():
    return [1]
'''


@pytest.mark.parametrize("shapes, names", [
    (["ids:1x5", "scale:1x1"], ["ids", "scale"]),
    (["scale:1x1", "ids:1x5"], ["ids", "scale"]),  # forward's names: passed by name (this once swapped them)
    (["tokens:1x5", "factor:1x1"], ["tokens", "factor"]),  # other names: in the order given
])
def test_cli_export_writes_an_onnx_file_opt_takes(tmp_path: Path, shapes: list[str], names: list[str]):
    (tmp_path / "models.py").write_text(MODULE_FILE)
    out = tmp_path / "net.onnx"
    ids_name, scale_name = names
    given = [arg for shape in shapes for arg in ("--input-shape", shape)]
    args = ["export", tmp_path / "models.py:build", "-o", out, *given,
            "--input-dtype", f"{ids_name}:int64", "--dynamic", f"{ids_name}:1=tokens"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: Net exported (opset ")
    first = sha256(out)
    assert run_cli(*args).returncode == 0 and sha256(out) == first  # deterministic
    proto = onnx.load(out)
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [
        (ids_name, onnx.TensorProto.INT64), (scale_name, onnx.TensorProto.FLOAT)]
    import importlib.util

    spec = importlib.util.spec_from_file_location("models_under_test", tmp_path / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", "tokens"]
    ids = np.array([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4], [0, 0, 1, 1, 2, 2]])  # 6 tokens: the export saw 5
    scale = np.full((3, 1), 0.5, np.float32)
    with torch.no_grad():
        ref = module.build().eval()(torch.from_numpy(ids), torch.from_numpy(scale)).numpy()
    got = next(iter(run_ort(proto, {ids_name: ids, scale_name: scale}).values()))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    optimized = run_cli("opt", out, "-o", tmp_path / "net.opt.onnx", "--passes", "cleanup")
    assert optimized.returncode == 0, optimized.stderr


def test_cli_export_takes_a_scalar_input_and_opt_calibrates_it(tmp_path: Path):
    """`scale:scalar` traces a 0-d example (numpy's ascontiguousarray had made it 1-d, exported as ['batch']), and
    calibration takes one value per sample from an .npz."""
    (tmp_path / "models.py").write_text(MODULE_FILE)
    out = tmp_path / "net.onnx"
    result = run_cli("export", tmp_path / "models.py:build", "-o", out, "--input-shape", "ids:1x5",
                     "--input-dtype", "ids:int64", "--input-shape", "scale:scalar")
    assert result.returncode == 0, result.stderr
    proto = onnx.load(out)
    assert [len(i.type.tensor_type.shape.dim) for i in proto.graph.input] == [2, 0]
    ids = np.arange(15).reshape(3, 5) % 50
    got = next(iter(run_ort(proto, {"ids": ids, "scale": np.array(2.0, np.float32)}).values()))
    import importlib.util

    spec = importlib.util.spec_from_file_location("models_under_test_scalar", tmp_path / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        ref = module.build().eval()(torch.from_numpy(ids), torch.tensor(2.0)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 50, (12, 5)), scale=np.repeat(np.float32([0.5, 2.0]), 6))
    quantized = run_cli("opt", out, "-o", tmp_path / "net.q.onnx", "--passes", "quant", "--calib-data",
                        tmp_path / "calib.npz")
    assert quantized.returncode == 0, quantized.stderr
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "net.q.onnx").graph.node)


@pytest.mark.parametrize("target, fragment", [
    ("models.py:nope", "models.py has no 'nope'"),
    ("models.py:NUMBER", "NUMBER is a int, not a module or a factory"),
    ("models.py:not_a_module", "not_a_module() returned a list, not a torch.nn.Module"),
    ("missing.py:build", "missing.py: no such file"),
    ("broken.py:build", "importing broken.py failed: ValueError: broken on purpose"),
    ("models.py", "expected path/to/file.py:NAME or package.module:NAME"),
    ("models.py:build --dynamic ids=tokens", "--dynamic 'ids=tokens': expected NAME:AXIS=DIM"),
    ("models.py:build --input-dtype ids:text", "--input-dtype 'ids:text': expected NAME:DTYPE"),
    ("models.py:build --input-dtype other:int64", "--input-dtype 'other': no --input-shape of that name"),
])
def test_cli_export_bad_modules_are_one_line_errors(tmp_path: Path, target: str, fragment: str):
    (tmp_path / "models.py").write_text(MODULE_FILE)
    (tmp_path / "broken.py").write_text("raise ValueError('broken on purpose')\n")
    result = run_cli("export", *target.split(), "-o", "out.onnx", "--input-shape", "ids:1x5", cwd=tmp_path)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "out.onnx").exists()


def test_cli_export_names_the_missing_input_as_an_input_shape(tmp_path: Path):
    """forward(ids, mask=None) given mask alone: the API says to give an example input, the CLI which flag."""
    (tmp_path / "optional.py").write_text("from torch import nn\n\n\nclass Net(nn.Module):\n"
                                          "    def forward(self, ids, mask=None):\n        return ids\n")
    result = run_cli("export", "optional.py:Net", "-o", "out.onnx", "--input-shape", "mask:1x5", cwd=tmp_path)
    assert_one_line_error(result, 2, "Net.forward needs 'ids', which has no default: give --input-shape ids:DxD..")
    assert not (tmp_path / "out.onnx").exists()


def test_opt_on_a_module_spec_says_to_export_it_first(tmp_path: Path):
    (tmp_path / "models.py").write_text(MODULE_FILE)
    result = run_cli("opt", "models.py:build", "-o", "out.onnx", "--passes", "cleanup", cwd=tmp_path)
    assert_one_line_error(result, 2, "models.py:build: a PyTorch module, not an ONNX file; export it first: "
                                     "irtool export models.py:build -o model.onnx")
