"""Small torch models exported to ONNX for the fp16, quant-dynamic, fold-scale and placement tests (seeded, cached
per session)."""

from __future__ import annotations

import functools
import io
import warnings

import onnx

D_MODEL, HEADS, D_FF, SEQ = 64, 4, 256, 16
VOCAB, TOKENS = 1000, 24  # the sentence encoder's vocabulary and padded sentence length


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


def _sentence_encoder_class():
    torch = _torch()
    nn = torch.nn

    class SentenceEncoder(nn.Module):
        """A MiniLM-shaped sentence embedder as Hugging Face exports one: int64 input_ids and attention_mask,
        word + position + token-type embeddings, post-norm BERT layers whose padding mask is added to the
        attention scores, GELU MLPs, and mask-weighted mean pooling. `padding`: "finfo", the bias is
        (1 - mask) * finfo(float32).min (BERT's extended mask); "inf", masked_fill(mask == 0, -inf), the
        boolean-mask form newer exports use."""

        def __init__(self, padding: str):
            super().__init__()
            self.padding = padding
            self.word, self.position = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(TOKENS, D_MODEL)
            self.token_type = nn.Embedding(2, D_MODEL)
            self.norm = nn.LayerNorm(D_MODEL)
            self.layers = nn.ModuleList(_BertLayer() for _ in range(3))

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.word(input_ids) + self.position(positions) + self.token_type(torch.zeros_like(input_ids))
            x = self.norm(x)
            mask = attention_mask[:, None, None, :].to(x.dtype)
            if self.padding == "inf":
                bias = torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))
            else:
                bias = (1.0 - mask) * torch.finfo(torch.float32).min
            for layer in self.layers:
                x = layer(x, bias)
            weights = attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    class _BertLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (nn.Linear(D_MODEL, D_MODEL) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.fc1, self.fc2 = nn.Linear(D_MODEL, D_FF), nn.Linear(D_FF, D_MODEL)

        def forward(self, x, bias):
            b, t, d = x.shape

            def heads(y):
                return y.view(b, t, HEADS, d // HEADS).transpose(1, 2)

            scores = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / (d // HEADS) ** 0.5 + bias
            context = (torch.softmax(scores, -1) @ heads(self.v(x))).transpose(1, 2).reshape(b, t, d)
            x = self.ln1(x + self.out(context))
            return self.ln2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))

    return SentenceEncoder


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


def _export_sentence_encoder(module) -> bytes:
    torch = _torch()
    buffer = io.BytesIO()
    ids, mask = torch.randint(1, VOCAB, (2, TOKENS)), torch.ones(2, TOKENS, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (ids, mask), buffer, dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}})
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _exported(kind: str) -> bytes:
    torch = _torch()
    torch.manual_seed(0)
    if kind == "encoder":
        return _export(_encoder_class()(), (2, SEQ, 32))
    if kind.startswith("sentence-"):
        return _export_sentence_encoder(_sentence_encoder_class()(kind.removeprefix("sentence-")))
    module = _cnn_class()()
    _randomize_batchnorm(module)
    return _export(module, (2, 3, 16, 16))


def encoder_proto() -> onnx.ModelProto:
    """Two pre-norm encoder blocks (d_model 64, 4 heads, MLP 256) on [2, 16, 32] inputs; output [2, 16, 64]."""
    proto = onnx.load_from_string(_exported("encoder"))
    proto.ir_version = 8
    return proto


def sentence_encoder_proto(padding: str = "finfo") -> onnx.ModelProto:
    """The MiniLM-shaped sentence embedder (3 layers, d_model 64): int64 input_ids and attention_mask of
    [batch, tokens <= 24], both dims dynamic as Hugging Face exports them; output [batch, 64]. `padding`:
    "finfo" or "inf", how the mask reaches the scores."""
    proto = onnx.load_from_string(_exported(f"sentence-{padding}"))
    proto.ir_version = 8
    return proto


def cnn_proto() -> onnx.ModelProto:
    """Conv-BN-ReLU x2, grouped Conv, MaxPool, mean, Linear on [2, 3, 16, 16] inputs; output [2, 10]."""
    proto = onnx.load_from_string(_exported("cnn"))
    proto.ir_version = 8
    return proto


def _attention_class(kind: str):
    """timm's Attention (one qkv Linear, unbind, scaled_dot_product_attention: q and k each by d^-1/4) or torch's
    nn.MultiheadAttention (its fused in_proj picked apart by Gather), width 48, 4 heads."""
    torch = _torch()
    nn = torch.nn

    class Timm(nn.Module):
        def __init__(self, width: int = 48, heads: int = 4):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            a = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(a.transpose(1, 2).reshape(b, t, c))

    class Multihead(nn.Module):
        def __init__(self, width: int = 48, heads: int = 4):
            super().__init__()
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    return Timm if kind == "timm" else Multihead


@functools.lru_cache(maxsize=None)
def _exported_attention(kind: str, dynamic_batch: bool) -> bytes:
    torch = _torch()
    torch.manual_seed(0)
    buffer = io.BytesIO()
    axes = {"dynamic_axes": {"x": {0: "b"}, "y": {0: "b"}}} if dynamic_batch else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_attention_class(kind)().eval(), (torch.randn(2, 6, 48),), buffer, dynamo=False,
                          input_names=["x"], output_names=["y"], opset_version=17, **axes)
    return buffer.getvalue()


def attention_proto(kind: str, dynamic_batch: bool = False) -> onnx.ModelProto:
    """An attention block with a fused qkv projection (`kind`: "timm" or "multihead", see _attention_class) on
    [2, 6, 48] inputs (the batch dynamic if asked), legacy export; output [batch, 6, 48]."""
    return onnx.load_from_string(_exported_attention(kind, dynamic_batch))
