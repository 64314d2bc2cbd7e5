"""Calibration samples checked against a model's inputs (see irtool.calibration.data for the formats).

Each check raises InputError naming the input and where the data came from (`where`: a file, a key,
a sample index). Per array the rank decides: the input's rank means a stack (first axis = samples),
one less means one sample. Dtypes: float -> float casts, int -> int casts when the values fit, any
other change is refused (int data for a float input usually means unnormalized pixels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from irtool.errors import InputError

Sample = dict[str, np.ndarray]


class ModelInput(NamedTuple):
    """A model input as calibration sees it: None for a symbolic dim, shape None for unknown rank."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None

    @property
    def sample_shape(self) -> tuple[int | None, ...] | None:
        return None if self.shape is None else self.shape[1:]

    @property
    def scalar(self) -> bool:
        """A rank-0 input (a diffusion timestep, a threshold): one value per batch, which has no batch axis."""
        return self.shape == ()


def model_inputs(model: Any, input_shapes: Mapping[str, list[int]] | None = None) -> list[ModelInput]:
    """The real inputs of an irtool Model; `input_shapes` fills symbolic dims except the batch axis, in the inputs
    it names and, through a dim name, in the others (token ids and their attention mask share the sequence)."""
    from irtool.ir.skeleton import symbol_sizes

    shapes = dict(input_shapes or {})
    named = symbol_sizes([(t.name, t.shape) for t in model.graph.inputs], shapes)
    specs = []
    for tensor in model.graph.inputs:
        dims = None if tensor.shape is None else [_static(d) for d in tensor.shape]
        given = shapes.get(tensor.name)
        if dims is not None and given is not None and len(given) == len(dims):
            dims = [d if d is not None or i == 0 else int(g) for i, (d, g) in enumerate(zip(dims, given, strict=True))]
        elif dims is not None:
            dims = [named.get(n) if d is None and i > 0 and isinstance(n, str) else d
                    for i, (d, n) in enumerate(zip(dims, tensor.shape, strict=True))]
        specs.append(ModelInput(tensor.name, _np_dtype(tensor.dtype), None if dims is None else tuple(dims)))
    return specs


def _static(dim: Any) -> int | None:
    return int(dim) if isinstance(dim, (int, np.integer)) and dim > 0 else None


def _np_dtype(dtype: Any) -> np.dtype | None:
    try:
        return None if dtype is None else np.dtype(dtype)
    except TypeError:
        return None


def normalize_inputs(inputs: Iterable[Any]) -> list[ModelInput]:
    """(name, dtype, shape) tuples as ModelInputs: symbolic dims (names, 0, -1) become None."""
    specs = [ModelInput(str(name), _np_dtype(dtype), None if shape is None else tuple(_static(d) for d in shape))
             for name, dtype, shape in inputs]
    if not specs:
        raise InputError("calibration data: the model has no inputs")
    return specs


def format_shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "(any)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def stack_count(inp: ModelInput, shape: tuple[int, ...], where: str) -> int | None:
    """Samples in an array of `shape`: shape[0] for a stack, None for a single sample. A scalar input's sample
    is a 0-d array and its stack a 1-d one (it has no batch axis to share)."""
    rank = None if inp.shape is None else len(inp.shape)
    if inp.scalar and len(shape) <= 1:
        return int(shape[0]) if shape else None
    if (rank is None and len(shape) > 0) or len(shape) == rank:
        return int(shape[0])
    if rank is not None and len(shape) == rank - 1:
        return None
    raise InputError(f"input {inp.name!r}: {where} has shape {tuple(shape)}; expected {format_shape(inp.shape)} "
                     f"(a stack of samples) or {format_shape(inp.sample_shape)} (one sample)")


def check_shape(inp: ModelInput, shape: tuple[int, ...], where: str) -> None:
    """Check one sample's shape (no batch axis) against the input's rank and static dims."""
    want = inp.sample_shape
    if want is None:
        return
    if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape, strict=True)):
        raise InputError(f"input {inp.name!r}: {where} has sample shape {tuple(shape)}, the model wants "
                         f"{format_shape(want)} per sample (input shape {format_shape(inp.shape)})")


def target_dtype(inp: ModelInput, dtype: np.dtype, where: str) -> np.dtype:
    """The dtype data of `dtype` is cast to for this input, or an InputError when it cannot be."""
    want = inp.dtype
    if want is None or dtype == want:
        return dtype
    if dtype.kind == want.kind == "f" or (dtype.kind in "iu" and want.kind in "iu"):
        return want
    hint = " (normalize it to floats first)" if dtype.kind in "iub" and want.kind == "f" else ""
    raise InputError(f"input {inp.name!r}: {where} has dtype {dtype}, the model wants {want}; "
                     f"refusing to cast{hint}")


def check_header(inp: ModelInput, shape: tuple[int, ...], dtype: np.dtype, where: str) -> int:
    """Validate an array's header (shape, dtype) for `inp`; return the number of samples it holds."""
    if dtype.hasobject:
        raise InputError(f"input {inp.name!r}: {where} holds Python objects; save numeric arrays")
    target_dtype(inp, dtype, where)
    count = stack_count(inp, shape, where)
    check_shape(inp, tuple(shape[1:]) if count is not None else tuple(shape), where)
    return 1 if count is None else count


def convert_sample(inp: ModelInput, array: np.ndarray, where: str) -> np.ndarray:
    """One sample cast to the model's dtype, checked for shape, NaN/Inf and integer range."""
    array = np.asarray(array)
    target = target_dtype(inp, array.dtype, where)
    check_shape(inp, array.shape, where)
    if array.dtype.kind in "iu" and target.kind in "iu" and not np.can_cast(array.dtype, target) and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"input {inp.name!r}: {where} has values outside the range of {target}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported below
        converted = array.astype(target, copy=False)
    if converted.dtype.kind in "fc" and not np.isfinite(converted).all():
        raise InputError(f"input {inp.name!r}: {where} holds NaN or Inf values")
    return converted


def map_keys(keys: list[str], inputs: list[ModelInput], where: str) -> dict[str, str]:
    """{input name: key}; a single-input model takes any single key."""
    names = [inp.name for inp in inputs]
    if len(inputs) == 1 and len(keys) == 1:
        return {names[0]: keys[0]}
    missing = [n for n in names if n not in keys]
    if missing:
        held = ", ".join(map(repr, keys)) or "nothing"
        raise InputError(f"input {missing[0]!r}: missing from {where} (it holds {held}; "
                         f"model inputs: {', '.join(map(repr, names))})")
    extra = [k for k in keys if k not in names]
    if extra:
        raise InputError(f"{where} holds {', '.join(map(repr, extra))}, which the model has no input for "
                         f"(model inputs: {', '.join(map(repr, names))})")
    return {n: n for n in names}


def single_input(inputs: list[ModelInput], what: str) -> ModelInput:
    if len(inputs) != 1:
        raise InputError(f"{what} fits only single-input models; the model has inputs "
                         f"{', '.join(repr(i.name) for i in inputs)}: use .npz files keyed by input name")
    return inputs[0]
