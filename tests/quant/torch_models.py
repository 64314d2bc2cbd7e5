"""Small torch models exported to ONNX for the fp16 and quant-dynamic tests (seeded, cached per session)."""

from __future__ import annotations

import functools
import io
import warnings

import onnx

D_MODEL, HEADS, D_FF, SEQ = 64, 4, 256, 16


def _torch():
    import pytest

    return pytest.importorskip("torch")


def _encoder_class():
    torch = _torch()
    nn = torch.nn

    class EncoderBlock(nn.Module):
        """Pre-norm transformer encoder: embedding, LayerNorm, multi-head attention, GELU MLP, pooled output."""

        def __init__(self, vocab_dim: int = 32, layers: int = 2):
            super().__init__()
            self.embed = nn.Linear(vocab_dim, D_MODEL)
            self.blocks = nn.ModuleList(_Block() for _ in range(layers))
            self.norm = nn.LayerNorm(D_MODEL)
            self.head = nn.Linear(D_MODEL, D_MODEL)

        def forward(self, x):
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    class _Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
            self.proj = nn.Linear(D_MODEL, D_MODEL)
            self.fc1, self.fc2 = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ k.transpose(-2, -1) / (d // HEADS) ** 0.5, dim=-1)
            x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    return EncoderBlock


def _cnn_class():
    torch = _torch()
    nn = torch.nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(), nn.MaxPool2d(2))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    return SmallCNN


def _randomize_batchnorm(module) -> None:
    torch = _torch()
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)


def _export(module, shape: tuple[int, ...]) -> bytes:
    torch = _torch()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(*shape),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _exported(kind: str) -> bytes:
    torch = _torch()
    torch.manual_seed(0)
    if kind == "encoder":
        return _export(_encoder_class()(), (2, SEQ, 32))
    module = _cnn_class()()
    _randomize_batchnorm(module)
    return _export(module, (2, 3, 16, 16))


def encoder_proto() -> onnx.ModelProto:
    """Two pre-norm encoder blocks (d_model 64, 4 heads, MLP 256) on [2, 16, 32] inputs; output [2, 16, 64]."""
    proto = onnx.load_from_string(_exported("encoder"))
    proto.ir_version = 8
    return proto


def cnn_proto() -> onnx.ModelProto:
    """Conv-BN-ReLU x2, grouped Conv, MaxPool, mean, Linear on [2, 3, 16, 16] inputs; output [2, 10]."""
    proto = onnx.load_from_string(_exported("cnn"))
    proto.ir_version = 8
    return proto
