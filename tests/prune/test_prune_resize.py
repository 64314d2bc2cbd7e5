"""prune through Resize: a feature pyramid's upsampled maps. torch.export writes F.interpolate(size=...) with a
static shape as Resize(x, sizes=[N, C, H, W]), the channel count inside one constant every such resize shares
(Hugging Face's SegFormer decode head). The pruned model kept that count: ONNX Runtime refused it ("'Linear' mode
only supports ... outermost 2 scale values being 1") and a nearest resize would have copied channels back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from irtool.api import optimize
from irtool.frontends.torch import export_module
from tests.prune.archs import init_weights
from tests.prune.test_prune_archs import analysis
from tests.prune.test_prune_masking import masked, prune
from tests.prune.test_prune_recurrent import run


class Pyramid(nn.Module):
    """Three scales of a conv stem, lateral 1x1 convs, every lateral map resized to the finest size and
    concatenated into a 1x1 head (an FPN / SegFormer-style decode head)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.l2 = nn.Conv2d(16, 12, 1)
        self.l3 = nn.Conv2d(16, 12, 1)
        self.head = nn.Conv2d(16 + 24, 4, 1)

    def forward(self, x):
        f1 = torch.relu(self.c1(x))
        f2 = torch.relu(self.c2(f1))
        f3 = torch.relu(self.c3(f2))
        size = f1.shape[2:] if self.mode == "nearest" else (16, 16)
        extra = {} if self.mode == "nearest" else {"align_corners": False}
        ups = [nn.functional.interpolate(self.l2(f2), size=size, mode=self.mode, **extra),
               nn.functional.interpolate(self.l3(f3), size=size, mode=self.mode, **extra)]
        return self.head(torch.cat([f1, *ups], dim=1))


CASES = [(mode, exporter, dynamic) for mode in ("bilinear", "nearest") for exporter in ("torchscript", "dynamo")
         for dynamic in (False, True)]


@pytest.mark.parametrize(("mode", "exporter", "dynamic"), CASES,
                         ids=[f"{m}-{e}-{'dynamic' if d else 'static'}" for m, e, d in CASES])
def test_resized_lateral_maps_prune_and_equal_the_masked_original(mode, exporter, dynamic):
    torch.manual_seed(0)
    proto = export_module(init_weights(Pyramid(mode)), {"x": torch.randn(2, 3, 16, 16)}, exporter=exporter,
                          dynamic_batch=dynamic)
    original = optimize(proto, "cleanup").model.to_proto()
    model, removed, records = prune(original, "prune{ratio=0.5}")
    # c1's 16 (concatenated into the head), c2 and c3's 16 each, the laterals' 12 each: half of every layer
    assert records[0].stats["channels_removed"] == 8 + 8 + 8 + 6 + 6
    x = {"x": np.random.default_rng(1).standard_normal((3 if dynamic else 2, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)


def _resize_model(sizes: list[int], axes: list[int] | None = None) -> onnx.ModelProto:
    """x [1, 8, 4, 4] -> Conv 8 -> Resize(sizes, opset 18) to 8x8 -> Conv 8 -> 2."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 8, 1, 1)), ("w2", (2, 8, 1, 1)))]
    inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]),
             helper.make_node("Resize", ["h", "", "", "sizes"], ["r"], mode="linear",
                              **({"axes": axes} if axes else {})),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("sizes", "axes", "kept"), [([1, 8, 8, 8], None, [1, 4, 8, 8]), ([8, 8], [2, 3], [8, 8])],
                         ids=["every-axis", "spatial-axes"])
def test_sizes_get_the_kept_channel_count_where_they_name_the_channel_axis(sizes, axes, kept):
    model, removed, _ = prune(_resize_model(sizes, axes), "prune{ratio=0.5}")
    resize = next(n for n in model.graph.nodes if n.op == "Resize")
    assert np.asarray(resize.inputs[3].values).tolist() == kept
    x = {"x": np.random.default_rng(3).standard_normal((1, 8, 4, 4)).astype(np.float32)}
    original = _resize_model(sizes, axes)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-5, atol=1e-5)


def test_a_resize_of_the_channel_axis_locks_its_channels():
    proto = _resize_model([1, 16, 8, 8])
    proto.graph.node[1].attribute[0].s = b"nearest"
    proto.graph.node[2].input[1] = "w3"
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((2, 16, 1, 1), np.float32), "w3"))
    reasons = sorted(g.locked for g in analysis(proto).groups if g.locked)
    assert reasons == ["'y' is a graph output", "Resize 'Resize_0' resizes the channel axis"], reasons
