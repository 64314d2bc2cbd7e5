"""Random CNN-style ONNX graphs for pruning property tests: stacks of blocks that exercise every
channel handler (residual adds, concats, splits, slices, depthwise and grouped convs, BN, transposes
to NHWC with MatMul, squeeze/unsqueeze, SE-style gating, channel shuffle, multi-head self-attention
over the 4x4 positions (also in nn.MultiheadAttention's sequence-first, heads-in-batch layout, and with timm's
fused qkv projection, and with learned queries as a constant operand of the scores),
GroupNormalization and its Reshape-InstanceNormalization-Reshape form (back to a
constant shape or to the conv output's Shape), pixel shuffles (DepthToSpace CRD/DCR, SpaceToDepth),
flatten -> Gemm)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0
        self.value_info: list[onnx.ValueInfoProto] = []

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, *shape: int, scale: float = 0.4) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("k")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"{op}_"), **attrs))
        return outs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 1, group: int = 1) -> str:
        w = self.weight(c_out, c_in // group, k, k)
        return self.op("Conv", [x, w, self.weight(c_out)], kernel_shape=[k, k], pads=[k // 2] * 4, group=group)[0]


def _block(b: GraphBuilder, x: str, c: int, kind: str) -> tuple[str, int]:
    rng = b.rng
    if kind == "conv":
        c2 = int(rng.integers(4, 12))
        return b.op("Relu", [b.conv(x, c, c2, int(rng.choice([1, 3])))])[0], c2
    if kind == "bn":
        y = b.conv(x, c, c)
        y = b.op("BatchNormalization", [y, b.weight(c), b.weight(c), b.weight(c),
                                        b.const(np.abs(b.rng.standard_normal(c)) + 0.5, np.float32)])[0]
        return b.op("Relu", [y])[0], c
    if kind == "depthwise":
        return b.op("Relu", [b.conv(x, c, c, 3, group=c)])[0], c
    if kind == "residual":
        inner = b.op("Relu", [b.conv(x, c, c, 3)])[0]
        return b.op("Add", [x, b.conv(inner, c, c)])[0], c
    if kind == "concat":
        c1, c2 = int(rng.integers(2, 8)), int(rng.integers(2, 8))
        left, right = b.conv(x, c, c1), b.op("Sigmoid", [b.conv(x, c, c2, 3)])[0]
        return b.op("Concat", [left, right], axis=1)[0], c1 + c2
    if kind == "split" and c >= 4:
        half = c // 2
        a, d = b.op("Split", [x, b.const([half, c - half])], outputs=2, axis=1)
        return b.op("Concat", [b.conv(a, half, half), b.conv(d, c - half, c - half)], axis=1)[0], c
    if kind == "slice" and c >= 4:
        start = int(rng.integers(0, c // 2))
        end = int(rng.integers(start + 2, c + 1))
        y = b.op("Slice", [x, b.const([start]), b.const([end]), b.const([1])])[0]
        return b.op("Relu", [b.conv(y, end - start, c)])[0], c
    if kind == "nhwc":
        c2 = int(rng.integers(4, 10))
        t = b.op("Transpose", [x], perm=[0, 2, 3, 1])[0]
        m = b.op("MatMul", [t, b.weight(c, c2)])[0]
        return b.op("Transpose", [b.op("Relu", [m])[0]], perm=[0, 3, 1, 2])[0], c2
    if kind == "se":
        pooled = b.op("GlobalAveragePool", [x])[0]
        squeezed = b.op("Relu", [b.conv(pooled, c, max(2, c // 2))])[0]
        gate = b.op("Sigmoid", [b.conv(squeezed, max(2, c // 2), c)])[0]
        return b.op("Mul", [x, gate])[0], c
    if kind == "grouped" and c % 2 == 0:
        g = 3 if c % 3 == 0 and rng.random() < 0.5 else 2
        c2 = g * int(rng.integers(1, 4))
        return b.op("Relu", [b.conv(x, c, c2, int(rng.choice([1, 3])), group=g)])[0], c2
    if kind == "shuffle" and c % 2 == 0:
        g = 3 if c % 3 == 0 and rng.random() < 0.5 else 2
        five = b.op("Reshape", [x, b.const([2, g, c // g, 4, 4])])[0]
        swapped = b.op("Transpose", [five], perm=[0, 2, 1, 3, 4])[0]
        back = b.const([2, -1, 4, 4] if rng.random() < 0.5 else [2, c, 4, 4])
        return b.op("Relu", [b.op("Reshape", [swapped, back])[0]])[0], c
    if kind == "attention":
        return _attention(b, x, c), c
    if kind == "attention_seq_first":
        return _seq_first_attention(b, x, c), c
    if kind == "attention_fused":
        return _fused_attention(b, x, c), c
    if kind == "attention_queries":
        return _query_attention(b, x, c), c
    if kind == "attention_gqa":
        return _grouped_query_attention(b, x, c), c
    if kind == "groupnorm" and c % 2 == 0:
        g = 3 if c % 3 == 0 and rng.random() < 0.5 else 2
        y = b.op("GroupNormalization", [b.conv(x, c, c), b.weight(c), b.weight(c)], num_groups=g)[0]
        # onnx infers no type for GroupNormalization (a function op): declare it, as exporters do
        b.value_info.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, c, 4, 4]))
        return b.op("Relu", [y])[0], c
    if kind == "groupnorm_decomposed" and c % 2 == 0:  # what torch's legacy exporter emits for nn.GroupNorm
        g = 3 if c % 3 == 0 and rng.random() < 0.5 else 2
        grouped = b.op("Reshape", [b.conv(x, c, c), b.const([2, g, -1])])[0]
        normed = b.op("InstanceNormalization", [grouped, b.weight(g), b.weight(g)])[0]
        y = b.op("Reshape", [normed, b.const([2, c, 4, 4])])[0]
        y = b.op("Add", [b.op("Mul", [y, b.weight(c, 1, 1)])[0], b.weight(c, 1, 1)])[0]
        return b.op("Relu", [y])[0], c
    if kind == "groupnorm_shape" and c % 2 == 0:  # the same with dynamic axes: back to the conv output's Shape
        g = 3 if c % 3 == 0 and rng.random() < 0.5 else 2
        conv = b.conv(x, c, c)
        normed = b.op("InstanceNormalization", [b.op("Reshape", [conv, b.const([2, g, -1])])[0], b.weight(g),
                                                b.weight(g)])[0]
        y = b.op("Reshape", [normed, b.op("Shape", [conv])[0]])[0]
        return b.op("Relu", [b.op("Add", [b.op("Mul", [y, b.weight(c, 1, 1)])[0], b.weight(c, 1, 1)])[0]])[0], c
    if kind == "pixel_shuffle":  # to 8x8 (CRD: torch's pixel_shuffle, or DCR) and back (SpaceToDepth)
        c2 = int(rng.integers(2, 5))
        mode = "CRD" if rng.random() < 0.5 else "DCR"
        wide = b.op("DepthToSpace", [b.conv(x, c, 4 * c2)], blocksize=2, mode=mode)[0]
        deep = b.op("SpaceToDepth", [b.op("Relu", [b.conv(wide, c2, c2, 3)])[0]], blocksize=2)[0]
        return b.op("Relu", [b.conv(deep, 4 * c2, c)])[0], c
    if kind == "squeeze":
        s = b.op("Unsqueeze", [x, b.const([2])])[0]
        return b.op("Squeeze", [b.op("Relu", [s])[0], b.const([2])])[0], c
    return x, c


def _tokens(b: GraphBuilder, x: str, c: int) -> str:
    """[2, c, 4, 4] -> [2, 16, c]."""
    return b.op("Reshape", [b.op("Transpose", [x], perm=[0, 2, 3, 1])[0], b.const([2, 16, c])])[0]


def _attend(b: GraphBuilder, x: str, scores: str, v: str, width: int, c: int) -> str:
    """softmax(scores)·V, heads merged to [2, 16, width], projected to c, back to [2, c, 4, 4] and added to x."""
    mixed = b.op("MatMul", [b.op("Softmax", [scores], axis=-1)[0], v])[0]
    merged = b.op("Reshape", [b.op("Transpose", [mixed], perm=[0, 2, 1, 3])[0], b.const([2, 16, -1])])[0]
    out = b.op("MatMul", [merged, b.weight(width, c)])[0]
    out = b.op("Transpose", [b.op("Reshape", [out, b.const([2, 4, 4, c])])[0]], perm=[0, 3, 1, 2])[0]
    return b.op("Add", [x, out])[0]


def _attention(b: GraphBuilder, x: str, c: int) -> str:
    """Pre-projection multi-head self-attention over the 16 positions, residual back onto x:
    Q/K/V = t·W (t = x as [2, 16, c]); heads [2, 16, H, D] -> [2, H, 16, D]; softmax(Q·Kᵀ·s)·V;
    heads merged back to [2, 16, H·D] and projected to c. The three head reshapes share one constant."""
    heads, dim = int(b.rng.integers(2, 4)), int(b.rng.integers(2, 4))
    tokens = _tokens(b, x, c)
    split = b.const([2, 16, heads, dim] if b.rng.random() < 0.5 else [2, 16, heads, -1])

    def project(perm: list[int]) -> str:
        y = b.op("MatMul", [tokens, b.weight(c, heads * dim)])[0]
        if b.rng.random() < 0.5:
            y = b.op("Add", [y, b.weight(heads * dim)])[0]
        return b.op("Transpose", [b.op("Reshape", [y, split])[0]], perm=perm)[0]

    q, k, v = project([0, 2, 1, 3]), project([0, 2, 3, 1]), project([0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k])[0], b.const(dim ** -0.5, np.float32)])[0]
    return _attend(b, x, scores, v, heads * dim, c)


def _fused_attention(b: GraphBuilder, x: str, c: int) -> str:
    """timm's ViT and Swin attention: one packed projection to 3·H·D, split by a Reshape [2, 16, 3, H, D] and
    Transpose [3, 2, H, 16, D], then q, k, v picked on the leading axis (Gather, or Split and Squeeze: unbind);
    sometimes a per-head bias [1, H, 16, 16] (Swin's relative positions) is added to the scores."""
    heads, dim = int(b.rng.integers(2, 4)), int(b.rng.integers(2, 4))
    tokens = _tokens(b, x, c)
    packed = b.op("Add", [b.op("MatMul", [tokens, b.weight(c, 3 * heads * dim)])[0], b.weight(3 * heads * dim)])[0]
    split = b.const([2, 16, 3, heads, dim] if b.rng.random() < 0.5 else [2, 16, 3, heads, -1])
    qkv = b.op("Transpose", [b.op("Reshape", [packed, split])[0]], perm=[2, 0, 3, 1, 4])[0]
    if b.rng.random() < 0.5:
        q, k, v = (b.op("Gather", [qkv, b.const(i)], axis=0)[0] for i in range(3))
    else:
        parts = b.op("Split", [qkv, b.const([1, 1, 1])], outputs=3, axis=0)
        q, k, v = (b.op("Squeeze", [p, b.const([0])])[0] for p in parts)
    scores = b.op("MatMul", [b.op("Mul", [q, b.const(dim ** -0.5, np.float32)])[0],
                             b.op("Transpose", [k], perm=[0, 1, 3, 2])[0]])[0]
    if b.rng.random() < 0.5:
        scores = b.op("Add", [scores, b.weight(1, heads, 16, 16)])[0]
    return _attend(b, x, scores, v, heads * dim, c)


def _query_attention(b: GraphBuilder, x: str, c: int) -> str:
    """Four learned queries attend to the 16 positions (DETR's decoder, whose query side folds to constants at a
    static batch): q is a constant [1, H, 4, D] read by the score MatMul; the answers, projected back to c and
    averaged over the queries, are added to x per channel."""
    heads, dim = int(b.rng.integers(2, 4)), int(b.rng.integers(2, 4))
    tokens = _tokens(b, x, c)

    def project(perm: list[int]) -> str:
        y = b.op("MatMul", [tokens, b.weight(c, heads * dim)])[0]
        return b.op("Transpose", [b.op("Reshape", [y, b.const([2, 16, heads, dim])])[0]], perm=perm)[0]

    k, v = project([0, 2, 3, 1]), project([0, 2, 1, 3])
    scores = b.op("MatMul", [b.weight(1, heads, 4, dim), k])[0]
    mixed = b.op("MatMul", [b.op("Softmax", [scores], axis=-1)[0], v])[0]
    merged = b.op("Reshape", [b.op("Transpose", [mixed], perm=[0, 2, 1, 3])[0], b.const([2, 4, heads * dim])])[0]
    answers = b.op("MatMul", [merged, b.weight(heads * dim, c)])[0]
    pooled = b.op("ReduceMean", [answers, b.const([1])], keepdims=0)[0]
    return b.op("Add", [x, b.op("Reshape", [pooled, b.const([2, c, 1, 1])])[0]])[0]


def _grouped_query_attention(b: GraphBuilder, x: str, c: int) -> str:
    """Llama's attention: KV k/v heads, each serving G query heads (H = KV·G); rotate-half RoPE on q and k
    (q·cos + cat(-q₂, q₁)·sin along D); k and v repeated by Unsqueeze, Expand [2, KV, G, 16, D] (KV in the target
    as a number, or as 1) and Reshape [2, H, 16, D]. One kv head is multi-query attention."""
    kv, dim = int(b.rng.integers(1, 4)), 2 * int(b.rng.integers(1, 3))
    group = 2 if kv == 1 else int(b.rng.integers(1, 3))  # at least two query heads, or nothing is free
    heads, tokens = kv * group, _tokens(b, x, c)
    cos, sin = b.weight(16, dim), b.weight(16, dim)

    def project(count: int, rope: bool) -> str:
        y = b.op("MatMul", [tokens, b.weight(c, count * dim)])[0]
        y = b.op("Transpose", [b.op("Reshape", [y, b.const([2, 16, count, dim])])[0]], perm=[0, 2, 1, 3])[0]
        if not rope:
            return y
        first, second = (b.op("Slice", [y, b.const([lo]), b.const([hi]), b.const([3])])[0]
                         for lo, hi in ((0, dim // 2), (dim // 2, dim)))
        rotated = b.op("Concat", [b.op("Neg", [second])[0], first], axis=-1)[0]
        return b.op("Add", [b.op("Mul", [y, cos])[0], b.op("Mul", [rotated, sin])[0]])[0]

    def repeat(y: str) -> str:
        target = b.const([2, kv if b.rng.random() < 0.5 else 1, group, 16, dim])
        wide = b.op("Expand", [b.op("Unsqueeze", [y, b.const([2])])[0], target])[0]
        return b.op("Reshape", [wide, b.const([2, heads, 16, dim])])[0]

    q, k, v = project(heads, True), repeat(project(kv, True)), repeat(project(kv, False))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])[0]])[0]
    return _attend(b, x, scores, v, heads * dim, c)


def _seq_first_attention(b: GraphBuilder, x: str, c: int) -> str:
    """nn.MultiheadAttention as torch exports it: tokens [16, 2, c] (sequence first), one packed projection to
    3·H·D split by a Reshape [16, 2, 3, H·D] and Gathers, heads folded into the batch ([16, 2·H, D]), moved first
    and unfolded ([2, H, 16, D]) for the scores, then merged back to [32, H·D] for the output projection."""
    heads, dim = int(b.rng.integers(2, 4)), int(b.rng.integers(2, 4))
    width = heads * dim
    tokens = b.op("Reshape", [b.op("Transpose", [x], perm=[2, 3, 0, 1])[0], b.const([16, 2, c])])[0]
    packed = b.op("Add", [b.op("MatMul", [tokens, b.weight(c, 3 * width)])[0], b.weight(3 * width)])[0]
    qkv = b.op("Reshape", [packed, b.const([16, 2, 3, width])])[0]
    fold = b.const([16, 2 * heads, dim] if b.rng.random() < 0.5 else [16, -1, dim])
    unfold = b.const([2, heads, 16, dim])

    def head_major(index: int) -> str:
        part = b.op("Gather", [qkv, b.const(index)], axis=2)[0]
        return b.op("Transpose", [b.op("Reshape", [part, fold])[0]], perm=[1, 0, 2])[0]

    q = b.op("Reshape", [head_major(0), unfold])[0]
    k = b.op("Reshape", [b.op("Transpose", [head_major(1)], perm=[0, 2, 1])[0], b.const([2, heads, dim, 16])])[0]
    v = b.op("Reshape", [head_major(2), unfold])[0]
    scores = b.op("MatMul", [b.op("Mul", [q, b.const(dim ** -0.5, np.float32)])[0], k])[0]
    mixed = b.op("MatMul", [b.op("Softmax", [scores], axis=-1)[0], v])[0]
    merged = b.op("Reshape", [b.op("Transpose", [mixed], perm=[2, 0, 1, 3])[0], b.const([32, width])])[0]
    out = b.op("Gemm", [merged, b.weight(c, width), b.weight(c)], transB=1)[0]
    out = b.op("Reshape", [out, b.const([4, 4, 2, c])])[0]
    return b.op("Add", [x, b.op("Transpose", [out], perm=[2, 3, 0, 1])[0]])[0]


KINDS = ["conv", "bn", "depthwise", "residual", "concat", "split", "slice", "nhwc", "se", "squeeze", "grouped",
         "shuffle", "attention", "attention_seq_first", "attention_fused", "attention_queries", "attention_gqa",
         "groupnorm",
         "groupnorm_decomposed", "groupnorm_shape", "pixel_shuffle"]


def random_cnn(seed: int, kinds: list[str], head: str = "gap") -> onnx.ModelProto:
    b = GraphBuilder(np.random.default_rng(seed))
    c = 6
    x = b.op("Relu", [b.conv("x", 3, c, 3)])[0]
    for kind in kinds:
        x, c = _block(b, x, c, kind)
    if head == "gap":
        x = b.op("Flatten", [b.op("GlobalAveragePool", [x])[0]], axis=1)[0]
        feat = c
    else:
        x = b.op("Flatten", [x], axis=1)[0]
        feat = c * 16
    hidden = b.op("Relu", [b.op("Gemm", [x, b.weight(7, feat), b.weight(7)], transB=1)[0]])[0]
    b.nodes.append(helper.make_node("Gemm", [hidden, b.weight(7, 5), b.weight(5)], ["y"], name="head"))
    graph = helper.make_graph(b.nodes, "random_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], b.inits,
                              value_info=b.value_info)
    # opset 21: GroupNormalization takes per-channel scale and bias (opset 18 had per-group ones)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
