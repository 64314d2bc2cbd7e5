"""TensorRT readiness: would TensorRT's ONNX parser (onnx-tensorrt 10.x) take this model, and how well?

Pure Python over the ONNX protobuf, so it runs without TensorRT or a GPU. It cannot promise that a
build succeeds (kernels, memory and shapes are only known to the builder); it finds what is known to
fail or to change numbers before anyone reaches a GPU machine. Each finding has a severity:

    error    the parser or builder rejects this (unsupported op or attribute, UINT8 or non-zero-point
             Q/DQ, a per-channel weight scale on the wrong axis, an opset outside 9..24, a bad profile)
    warning  it builds, but something needs attention (dynamic input without a profile, INT64 values
             TensorRT may clamp, a layer left in float between Q/DQ, FP16 range or precision risks)
    info     worth knowing (If/Loop restrictions, opsets newer than TensorRT 10.0 parses)

A model is ready when there is no error. The operator table is the support matrix of onnx-tensorrt's
docs/operators.md for TensorRT 10.15 ("supports operators in the inclusive range of opset 9 to opset
24"; github.com/onnx/onnx-tensorrt, docs/operators.md, release/10.x), including the restrictions column
for the ops checked below. Quantization rules are TensorRT's explicit quantization: symmetric signed
INT8 (zero points 0), per-tensor activations, per-channel weights along the output-channel axis; UINT8
"is only supported as network input or output tensor types" (same document).

Shape profiles (`NAME:MIN,OPT,MAX`, each `DxDxD`; a single shape means MIN = OPT = MAX) are parsed here
too, so the CLI, the readiness check and the TensorRT runner share one definition.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from irtool.errors import InputError

# ----------------------------------------------------------------------------------------- constants
OPSET_MIN, OPSET_MAX = 9, 24          # onnx-tensorrt 10.15; TensorRT 10.0 parsed 9..20
OPSET_MAX_TRT_10_0 = 20
FP16_MAX = 65504.0
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LARGE_INT64_BYTES = 1 << 20
INT8_NEEDS_QDQ = ("INT8 needs a model with explicit QuantizeLinear/DequantizeLinear nodes (TensorRT 11 removed "
                  "implicit INT8 calibration): run `irtool opt MODEL -o OUT --pipeline "
                  "'calibrate,insert-qdq{profile=trt}' --calib-data DATA` first")

# "Y" rows of the support matrix (TensorRT 10.15).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())

# "N" rows: listed as not supported (anything in neither set is unknown to the parser as well).
UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement
QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

# Ops whose float16 results are known to lose range or precision (accumulations, exponentials).
FP16_RISKS = {
    "ReduceSum": "sums accumulate in float16 and can overflow 65504",
    "ReduceSumSquare": "squares and sums overflow float16 quickly",
    "ReduceL2": "squares and sums overflow float16 quickly",
    "ReduceProd": "products overflow or underflow float16",
    "CumSum": "running sums accumulate rounding error and can overflow",
    "Pow": "powers overflow float16 (x**2 above 256); typical in hand-written LayerNorm variance",
    "Exp": "exp(x) overflows float16 for x > 11",
    "LayerNormalization": "the variance is sensitive to float16 overflow; keep it in float32 if outputs drift",
}

_STANDARD_DOMAINS = ("", "ai.onnx")
_QUANT_TYPES_OK = {TensorProto.INT8: "INT8", TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8"}
_BAD_INPUT_TYPES = {TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128, TensorProto.UINT16,
                    TensorProto.UINT32, TensorProto.UINT64, TensorProto.INT16}
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str            # stable kebab-case id, e.g. "unsupported-op", "uint8-qdq"
    message: str
    node: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["severity"] = self.severity.value
        return data


@dataclass
class Readiness:
    findings: list[Finding]
    opset: int | None

    @property
    def ready(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(f.severity is s for f in self.findings) for s in Severity}

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict:
        return {"ready": self.ready, "opset": self.opset, "counts": self.counts(),
                "findings": [f.to_dict() for f in self.findings]}


# ----------------------------------------------------------------------------------------- shape profiles
@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile for one input: the smallest, typical and largest shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise InputError(f"shape profile {self}: MIN, OPT and MAX must have the same rank")
        bad = [i for i, (a, b, c) in enumerate(zip(self.min, self.opt, self.max, strict=True)) if not 0 < a <= b <= c]
        if bad:
            raise InputError(f"shape profile {self}: need 0 < MIN <= OPT <= MAX in every dim (dims {bad} are not)")

    def __str__(self) -> str:
        return ",".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))


def parse_shape_profile(text: str) -> tuple[str, ShapeProfile]:
    """`x:1x3x224x224,8x3x224x224,16x3x224x224` -> ("x", ShapeProfile); one shape means min = opt = max."""
    name, sep, shapes_text = text.rpartition(":")
    parts = shapes_text.split(",")
    if not sep or not name or len(parts) not in (1, 3):
        raise InputError(f"--shapes {text!r}: expected NAME:MIN,OPT,MAX (or NAME:SHAPE), "
                         "e.g. x:1x3x224x224,8x3x224x224,16x3x224x224")
    try:
        shapes = [tuple(int(d) for d in part.lower().split("x")) for part in parts]
    except ValueError:
        raise InputError(f"--shapes {text!r}: dims must be integers joined by 'x'") from None
    if len(shapes) == 1:
        shapes *= 3
    return name, ShapeProfile(*shapes)


def parse_shape_profiles(texts: Iterable[str]) -> dict[str, ShapeProfile]:
    profiles: dict[str, ShapeProfile] = {}
    for text in texts:
        name, profile = parse_shape_profile(text)
        if name in profiles:
            raise InputError(f"--shapes {name!r} given twice")
        profiles[name] = profile
    return profiles


def profile_problems(dims: list[int | str | None], profile: ShapeProfile) -> list[str]:
    """Why `profile` does not fit an input of `dims` (ints fixed; str/None/<=0 dynamic); empty when it fits."""
    if len(dims) != len(profile.min):
        return [f"the profile has rank {len(profile.min)}, the input has rank {len(dims)}"]
    problems = []
    for i, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0 and not profile.min[i] == profile.opt[i] == profile.max[i] == dim:
            problems.append(f"dim {i} is fixed to {dim}, the profile gives "
                            f"{profile.min[i]},{profile.opt[i]},{profile.max[i]}")
    return problems


# ----------------------------------------------------------------------------------------- model view
@dataclass(frozen=True)
class Site:
    """A node and the name findings show for it (subgraph nodes are prefixed by their owner's name)."""

    node: onnx.NodeProto
    name: str


@dataclass
class ModelView:
    """Read-only indexes over a ModelProto, main graph and subgraphs together."""

    proto: onnx.ModelProto
    sites: list[Site] = field(default_factory=list)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    producers: dict[str, Site] = field(default_factory=dict)
    consumers: dict[str, list[tuple[Site, int]]] = field(default_factory=lambda: defaultdict(list))
    _arrays: dict[str, np.ndarray | None] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> ModelView:
        view = cls(proto)
        view._index(proto.graph, "")
        return view

    def _index(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.initializers.update({t.name: t for t in graph.initializer})
        for i, node in enumerate(graph.node):
            site = Site(node, prefix + (node.name or f"{node.op_type}#{i}"))
            self.sites.append(site)
            for out in node.output:
                if out:
                    self.producers[out] = site
            for j, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((site, j))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    self._index(sub, f"{site.name}/{attr.name}/")

    @property
    def opset(self) -> int | None:
        return next((o.version for o in self.proto.opset_import if o.domain in _STANDARD_DOMAINS), None)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None (computed at run time)."""
        if name not in self._arrays:
            self._arrays[name] = self._load_const(name)
        return self._arrays[name]

    def _load_const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        site = self.producers.get(name)
        if site is not None and site.node.op_type == "Constant":
            for attr in site.node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def is_const(self, name: str) -> bool:
        site = self.producers.get(name)
        return name in self.initializers or (site is not None and site.node.op_type == "Constant")

    def const_dtype(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        site = self.producers.get(name)
        if site is not None and site.node.op_type == "Constant":
            return next((a.t.data_type for a in site.node.attribute if a.name == "value"), None)
        return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _error(code: str, message: str, site: Site | None = None) -> Finding:
    return Finding(Severity.ERROR, code, message, site.name if site else None)


def _warning(code: str, message: str, site: Site | None = None) -> Finding:
    return Finding(Severity.WARNING, code, message, site.name if site else None)


def _info(code: str, message: str, site: Site | None = None) -> Finding:
    return Finding(Severity.INFO, code, message, site.name if site else None)


# ----------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class CheckOptions:
    profiles: dict[str, ShapeProfile] = field(default_factory=dict)
    fp16: bool = False
    int8: bool = False


Check = Callable[[ModelView, CheckOptions], Iterable[Finding]]


def check_opset(view: ModelView, _: CheckOptions) -> Iterator[Finding]:
    opset = view.opset
    if opset is None:
        yield _error("opset", "the model imports no standard ONNX opset")
    elif opset < OPSET_MIN:
        yield _error("opset", f"opset {opset} is older than TensorRT parses ({OPSET_MIN}..{OPSET_MAX}); "
                              "`irtool opt MODEL -o OUT --passes cleanup` writes it at opset 13")
    elif opset > OPSET_MAX:
        yield _warning("opset", f"opset {opset} is newer than onnx-tensorrt 10.x documents ({OPSET_MIN}..{OPSET_MAX})")
    elif opset > OPSET_MAX_TRT_10_0:
        yield _info("opset", f"opset {opset}: TensorRT 10.0 parses opsets up to {OPSET_MAX_TRT_10_0}; "
                             "use a newer TensorRT 10.x (10.15 parses up to 24)")


def check_ops(view: ModelView, _: CheckOptions) -> Iterator[Finding]:
    for site in view.sites:
        op, domain = site.node.op_type, site.node.domain
        if domain not in _STANDARD_DOMAINS:
            yield _error("custom-op", f"node '{site.name}' ({domain}::{op}): TensorRT's ONNX parser has no importer "
                                      f"for the '{domain}' domain; it needs a TensorRT plugin named '{op}'", site)
        elif op in UNSUPPORTED_OPS:
            yield _error("unsupported-op", f"node '{site.name}' ({op}): not supported by TensorRT's ONNX parser "
                                           "(onnx-tensorrt support matrix)", site)
        elif op not in SUPPORTED_OPS:
            yield _error("unsupported-op", f"node '{site.name}' ({op}): not in TensorRT's ONNX operator support "
                                           "matrix; it needs a TensorRT plugin of that name", site)
        else:
            yield from _RESTRICTIONS.get(op, _no_restriction)(view, site)


def _no_restriction(view: ModelView, site: Site) -> Iterator[Finding]:
    return iter(())


# Per-op restrictions from the support matrix's last column, keyed by op type (one function per rule set).
_RESTRICTIONS: dict[str, Callable[[ModelView, Site], Iterable[Finding]]] = {}


def _restriction(*ops: str):
    def register(func):
        _RESTRICTIONS.update({op: func for op in ops})
        return func
    return register


@_restriction("AveragePool", "MaxPool", "LpPool")
def _pooling(view: ModelView, site: Site) -> Iterator[Finding]:
    node = site.node
    kernel = _attr(node, "kernel_shape", [])
    if kernel and len(kernel) not in (2, 3):
        yield _error("op-restriction", f"node '{site.name}' ({node.op_type}): TensorRT pools in 2D or 3D only, "
                                       f"this kernel has {len(kernel)} dims", site)
    if any(d != 1 for d in _attr(node, "dilations", [])):
        yield _error("op-restriction", f"node '{site.name}' ({node.op_type}): dilations must be empty or all ones",
                     site)
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        yield _error("op-restriction", f"node '{site.name}' (MaxPool): the Indices output is not supported", site)


_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@_restriction("Resize")
def _resize(view: ModelView, site: Site) -> Iterator[Finding]:
    node = site.node
    checks = [("mode", _attr(node, "mode", "nearest"), _RESIZE_MODES),
              ("coordinate_transformation_mode", _attr(node, "coordinate_transformation_mode", "half_pixel"),
               _RESIZE_COORDS),
              ("nearest_mode", _attr(node, "nearest_mode", "round_prefer_floor"), _RESIZE_NEAREST),
              ("keep_aspect_ratio_policy", _attr(node, "keep_aspect_ratio_policy", "stretch"), {"stretch"})]
    for key, value, allowed in checks:
        if value not in allowed:
            yield _error("op-restriction", f"node '{site.name}' (Resize): {key}={value!r} is not supported "
                                           f"(TensorRT takes {sorted(allowed)})", site)
    if _attr(node, "antialias", 0):
        yield _error("op-restriction", f"node '{site.name}' (Resize): antialiasing is not supported", site)


@_restriction("TopK")
def _topk(view: ModelView, site: Site) -> Iterator[Finding]:
    if not _attr(site.node, "sorted", 1):
        yield _error("op-restriction", f"node '{site.name}' (TopK): sorted must be 1", site)
    k = view.const(_input(site.node, 1))
    if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= 3840:
        yield _error("op-restriction", f"node '{site.name}' (TopK): K={int(k.reshape(-1)[0])}, TensorRT needs K < 3840",
                     site)


@_restriction("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare")
def _reduce(view: ModelView, site: Site) -> Iterator[Finding]:
    axes = _input(site.node, 1)
    if axes and not view.is_const(axes):
        yield _error("op-restriction", f"node '{site.name}' ({site.node.op_type}): `axes` must be an initializer", site)


@_restriction("CumSum")
def _cumsum(view: ModelView, site: Site) -> Iterator[Finding]:
    if not view.is_const(_input(site.node, 1)):
        yield _error("op-restriction", f"node '{site.name}' (CumSum): `axis` must be a build-time constant", site)


@_restriction("ScatterND")
def _scatter_nd(view: ModelView, site: Site) -> Iterator[Finding]:
    reduction = _attr(site.node, "reduction", "none")
    if reduction != "none":
        yield _error("op-restriction", f"node '{site.name}' (ScatterND): reduction={reduction!r} is not supported",
                     site)


@_restriction("LSTM")
def _lstm(view: ModelView, site: Site) -> Iterator[Finding]:
    for key in ("input_forget", "layout"):
        if _attr(site.node, key, 0):
            yield _error("op-restriction", f"node '{site.name}' (LSTM): `{key}` must be 0", site)


@_restriction("LayerNormalization")
def _layer_norm(view: ModelView, site: Site) -> Iterator[Finding]:
    if any(site.node.output[1:]):
        yield _error("op-restriction", f"node '{site.name}' (LayerNormalization): only the first output Y is "
                                       "supported (Mean / InvStdDev are not)", site)


@_restriction("Dropout")
def _dropout(view: ModelView, site: Site) -> Iterator[Finding]:
    training = _input(site.node, 2)
    if training:
        value = view.const(training)
        if value is None or bool(value.reshape(-1)[0]):
            yield _error("op-restriction", f"node '{site.name}' (Dropout): training_mode must be an initializer "
                                           "that is False", site)


@_restriction("Constant")
def _constant(view: ModelView, site: Site) -> Iterator[Finding]:
    for attr in site.node.attribute:
        if attr.name in ("sparse_value", "value_string", "value_strings"):
            yield _error("op-restriction", f"node '{site.name}' (Constant): `{attr.name}` is not supported", site)


@_restriction("If")
def _if(view: ModelView, site: Site) -> Iterator[Finding]:
    branches = [_attr(site.node, key) for key in ("then_branch", "else_branch")]
    if all(b is not None for b in branches):
        shared = sorted({o.name for o in branches[0].output} & {o.name for o in branches[1].output})
        if shared:
            yield _error("op-restriction", f"node '{site.name}' (If): the two branches must name their outputs "
                                           f"differently, both produce {shared}", site)
    yield _info("subgraph", f"node '{site.name}' (If): TensorRT needs branch outputs of the same rank; "
                            "nodes inside the branches are checked like the main graph", site)


@_restriction("Loop", "Scan")
def _loop(view: ModelView, site: Site) -> Iterator[Finding]:
    yield _info("subgraph", f"node '{site.name}' ({site.node.op_type}): TensorRT needs a static scan-output length "
                            "and loop-carried values whose shapes stay the same across iterations", site)


def check_inputs(view: ModelView, options: CheckOptions) -> Iterator[Finding]:
    graph = view.proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = {i.name for i in inputs}
    for name in sorted(set(options.profiles) - names):
        yield _error("profile", f"--shapes names '{name}', which is not a model input ({', '.join(sorted(names))})")
    for info in inputs:
        yield from _check_input(info, options.profiles.get(info.name))


def _check_input(info: onnx.ValueInfoProto, profile: ShapeProfile | None) -> Iterator[Finding]:
    tensor_type = info.type.tensor_type
    elem = tensor_type.elem_type
    if elem in _BAD_INPUT_TYPES:
        yield _error("input-type", f"input '{info.name}' has type {TensorProto.DataType.Name(elem)}, which TensorRT "
                                   "does not take as a network input")
    elif elem == TensorProto.DOUBLE:
        yield _warning("input-type", f"input '{info.name}' is DOUBLE: TensorRT casts DOUBLE to FLOAT")
    if not tensor_type.HasField("shape"):
        yield _warning("dynamic-shape", f"input '{info.name}' has no shape in the model: give --shapes "
                                        f"{info.name}:MIN,OPT,MAX")
        return
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    if profile is not None:
        for problem in profile_problems(dims, profile):
            yield _error("profile", f"--shapes {info.name}:{profile}: {problem}")
    elif any(not (isinstance(d, int) and d > 0) for d in dims):
        shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in dims)
        yield _warning("dynamic-shape", f"input '{info.name}' has dynamic dims {_format_dims(dims)}: TensorRT needs "
                                        f"an optimization profile; give --shapes {info.name}:MIN,OPT,MAX "
                                        f"(e.g. {info.name}:{shown},{shown},{shown})")


def _format_dims(dims: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_int64(view: ModelView, _: CheckOptions) -> Iterator[Finding]:
    total, count = 0, 0
    for name in _int64_constants(view):
        value = view.const(name)
        total, count = total + value.nbytes, count + 1
        if _only_slice_bounds(view, name) or value.size == 0:
            continue  # INT64_MAX "to the end" bounds clamp to the same meaning
        low, high = int(value.min()), int(value.max())
        if low < INT32_MIN or high > INT32_MAX:
            site = view.consumers[name][0][0] if view.consumers.get(name) else None
            yield _warning("int64-range", f"INT64 constant '{name}' holds values outside the INT32 range "
                                          f"({low}..{high}): where a TensorRT layer has no INT64 support the parser "
                                          "casts to INT32 and clamps", site)
    if total > LARGE_INT64_BYTES:
        yield _info("int64-size", f"{count} INT64 constants hold {total / 2**20:.1f} MiB; TensorRT before 10 casts "
                                  "them to INT32 and most layers compute in INT32: storing INT32 halves them")


def _int64_constants(view: ModelView) -> list[str]:
    names = [n for n, t in view.initializers.items() if t.data_type == TensorProto.INT64]
    names += [s.node.output[0] for s in view.sites if s.node.op_type == "Constant" and s.node.output
              and view.const_dtype(s.node.output[0]) == TensorProto.INT64]
    return names


def _only_slice_bounds(view: ModelView, name: str) -> bool:
    uses = view.consumers.get(name, [])
    return bool(uses) and all(site.node.op_type == "Slice" and index in (1, 2) for site, index in uses)


# ----------------------------------------------------------------------------------------- Q/DQ
def _qdq_sites(view: ModelView) -> list[Site]:
    return [s for s in view.sites if s.node.op_type in ("QuantizeLinear", "DequantizeLinear")]


def has_qdq(proto: onnx.ModelProto) -> bool:
    return any(s.node.op_type in ("QuantizeLinear", "DequantizeLinear") for s in ModelView.of(proto).sites)


def has_float16(proto: onnx.ModelProto) -> bool:
    """Whether the model computes in float16 anywhere (float16 weights, values or Casts to float16)."""
    graph = proto.graph
    if any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer):
        return True
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    if any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in values):
        return True
    return any(n.op_type == "Cast" and _attr(n, "to") == TensorProto.FLOAT16 for n in graph.node)


def _quant_type(view: ModelView, site: Site) -> int | None:
    """The integer/fp8 type a Q produces or a DQ consumes (ONNX: a Q without zero point and output_dtype is UINT8)."""
    node = site.node
    zero = _input(node, 2)
    if zero:
        return view.const_dtype(zero)
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype", 0) or TensorProto.UINT8
    source = _input(node, 0)
    if view.is_const(source):
        return view.const_dtype(source)
    producer = view.producers.get(source)
    return _quant_type(view, producer) if producer and producer.node.op_type == "QuantizeLinear" else None


def check_qdq(view: ModelView, _: CheckOptions) -> Iterator[Finding]:
    for site in _qdq_sites(view):
        yield from _check_qdq_type(view, site)
        yield from _check_qdq_zero_point(view, site)
        yield from _check_qdq_scale(view, site)
    yield from _check_partial_quantization(view)


def _check_qdq_type(view: ModelView, site: Site) -> Iterator[Finding]:
    qtype = _quant_type(view, site)
    op = site.node.op_type
    if qtype == TensorProto.UINT8:
        yield _error("uint8-qdq", f"{op} '{site.name}' uses UINT8: TensorRT quantizes to signed INT8 only (UINT8 is "
                                  "allowed only as a network input or output); re-quantize with "
                                  "insert-qdq{profile=trt} (symmetric INT8)", site)
    elif qtype is not None and qtype not in _QUANT_TYPES_OK:
        yield _error("qdq-type", f"{op} '{site.name}' uses {TensorProto.DataType.Name(qtype)}: TensorRT quantizes to "
                                 f"{', '.join(_QUANT_TYPES_OK.values())} only", site)


def _check_qdq_zero_point(view: ModelView, site: Site) -> Iterator[Finding]:
    zero = _input(site.node, 2)
    if not zero:
        return
    value = view.const(zero)
    if value is None:
        yield _error("zero-point", f"{site.node.op_type} '{site.name}': the zero point must be a constant", site)
    elif np.any(value.astype(np.float64) != 0):
        yield _error("zero-point", f"{site.node.op_type} '{site.name}': zero point {_short(value)} is not 0; "
                                   "TensorRT needs symmetric quantization (zero points of 0)", site)


def _check_qdq_scale(view: ModelView, site: Site) -> Iterator[Finding]:
    scale = view.const(_input(site.node, 1))
    if scale is None:
        yield _warning("qdq-scale", f"{site.node.op_type} '{site.name}': the scale is computed at run time; "
                                    "TensorRT needs build-time scales", site)
        return
    if np.any(scale <= 0):
        yield _error("qdq-scale", f"{site.node.op_type} '{site.name}': scales must be positive", site)
    if scale.size > 1:
        yield from _check_per_channel(view, site, scale)


def _check_per_channel(view: ModelView, site: Site, scale: np.ndarray) -> Iterator[Finding]:
    node = site.node
    weight = view.const(_input(node, 0)) if node.op_type == "DequantizeLinear" else None
    if weight is None:
        yield _warning("per-channel-activation", f"{node.op_type} '{site.name}' quantizes an activation per channel "
                                                 f"({scale.size} scales): TensorRT quantizes INT8 activations per "
                                                 "tensor", site)
        return
    axis = int(_attr(node, "axis", 1)) % max(weight.ndim, 1)
    for consumer, index in view.consumers.get(node.output[0], []):
        expected = _weight_axis(consumer.node, weight) if index == 1 else None
        if expected is None:
            continue
        if axis != expected or scale.size != weight.shape[expected]:
            yield _error("qdq-axis", f"DequantizeLinear '{site.name}' scales the weight of {consumer.node.op_type} "
                                     f"'{consumer.name}' per channel along axis {axis} ({scale.size} scales); "
                                     f"TensorRT needs the output-channel axis {expected} "
                                     f"({weight.shape[expected]} channels)", site)


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """Output-channel axis of a weight: Conv [O,I,k] 0, ConvTranspose [I,O/g,k] 1, Gemm per transB, MatMul [K,N] 1."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if _attr(node, "group", 1) == 1 else None
    if op == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if op == "MatMul" and weight.ndim == 2:
        return 1
    return None


def _check_partial_quantization(view: ModelView) -> Iterator[Finding]:
    for site in view.sites:
        node = site.node
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq_input, dq_weight = (_dequantized(view, name) for name in node.input[:2])
        if "cast" in (dq_input, dq_weight):
            yield _warning("cast-after-dq", f"{node.op_type} '{site.name}': a DequantizeLinear reaches it through a "
                                            "Cast, and TensorRT fuses only a DequantizeLinear that feeds the layer "
                                            "directly, so this layer runs in float; make the Q/DQ float16 (opset 19, "
                                            "as irtool's fp16 pass does)", site)
        elif dq_weight and not dq_input:
            yield _warning("partial-qdq", f"{node.op_type} '{site.name}': the weight is quantized but the input is "
                                          "not, so TensorRT runs this layer in float; put a Q/DQ pair on its input "
                                          "(insert-qdq{profile=trt})", site)


def _dequantized(view: ModelView, name: str) -> str | None:
    """"direct" where a DequantizeLinear makes `name`, "cast" where it does through a Cast, else None."""
    if _produced_by(view, name, "DequantizeLinear"):
        return "direct"
    site = view.producers.get(name)
    if site is not None and site.node.op_type == "Cast" and _produced_by(view, site.node.input[0], "DequantizeLinear"):
        return "cast"
    return None


def _produced_by(view: ModelView, name: str, op: str) -> bool:
    site = view.producers.get(name)
    return site is not None and site.node.op_type == op


def _short(value: np.ndarray) -> str:
    flat = value.reshape(-1)
    return str(flat[0].item()) if flat.size == 1 else f"[{', '.join(str(v) for v in flat[:4].tolist())}...]"


# ----------------------------------------------------------------------------------------- precision
def check_int8(view: ModelView, options: CheckOptions) -> Iterator[Finding]:
    if options.int8 and not _qdq_sites(view):
        yield _error("int8-needs-qdq", INT8_NEEDS_QDQ)


def check_fp16(view: ModelView, options: CheckOptions) -> Iterator[Finding]:
    if not options.fp16:
        return
    for site in view.sites:
        risk = FP16_RISKS.get(site.node.op_type)
        if risk:
            yield _warning("fp16-precision", f"node '{site.name}' ({site.node.op_type}): {risk}", site)
    for name, tensor in view.initializers.items():
        if tensor.data_type != TensorProto.FLOAT:
            continue
        value = view.const(name)
        finite = value[np.isfinite(value)]
        if finite.size and float(np.abs(finite).max()) > FP16_MAX:
            yield _warning("fp16-range", f"weight '{name}' holds |values| up to {float(np.abs(finite).max()):.4g}, "
                                         f"beyond float16's {FP16_MAX:g}: they become inf in FP16")


CHECKS: tuple[Check, ...] = (check_opset, check_ops, check_inputs, check_int64, check_qdq, check_int8, check_fp16)


# ----------------------------------------------------------------------------------------- entry points
def check_trt_readiness(model, *, shapes: dict[str, ShapeProfile] | None = None, fp16: bool = False,
                        int8: bool = False) -> Readiness:
    """Run every check on `model` (an irtool Model, a ModelProto or a path) and return the findings."""
    proto = _as_proto(model)
    view = ModelView.of(proto)
    options = CheckOptions(profiles=dict(shapes or {}), fp16=fp16, int8=int8)
    findings = [finding for check in CHECKS for finding in check(view, options)]
    return Readiness(findings=findings, opset=view.opset)


def _as_proto(model) -> onnx.ModelProto:
    # Paths go through the safe loader (external data included, so weights are checked too).
    from irtool.backends.ort import as_proto

    return as_proto(model)


def format_readiness(readiness: Readiness, origin: str) -> str:
    counts = readiness.counts()
    verdict = "ready" if readiness.ready else "not ready"
    tally = ", ".join(f"{counts[s.value]} {s.value}" + ("s" if counts[s.value] != 1 and s is not Severity.INFO else "")
                      for s in Severity)
    lines = [f"trt-check {origin}: {verdict} ({tally})"]
    lines += [f"  {f.severity.value:<8} {f.code:<22} {f.message}" for f in readiness.findings]
    return "\n".join(lines) + "\n"
