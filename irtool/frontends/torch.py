"""The PyTorch frontend: export an nn.Module to the ONNX that irtool's passes take.

torch is an optional extra (`pip install 'irtool[torch]'`) and is imported only when a module is exported.
Exporters: torch's `dynamo` exporter (torch.export, then onnxscript's optimizer; torch's own default since
2.9) and the legacy TorchScript tracer (`torchscript`). `auto` tries dynamo and falls back to the tracer
with a warning that says why, since torch.export refuses some modules the tracer takes (data-dependent
Python control flow, which the tracer records for the example input only).

The module is exported in eval mode (BatchNorm with its running statistics, no Dropout) and every
submodule's training flag is put back afterwards. Example inputs are a tensor, a tuple of them (passed in
order; input names default to the parameter names of `forward`), or a mapping from forward's parameter
names to tensors, as a Hugging Face tokenizer returns them: those are passed by name, so their order does not
matter and optional parameters can be left out (`{"input_ids": ..., "attention_mask": ...}` on a forward that
also takes token_type_ids=None). The ONNX inputs then follow forward's order. Where the given names are not
forward's first parameters, the module is called through a small wrapper that passes them by keyword; the
wrapper's own scope is removed from the exported names, so node and weight names (what `exclude=` regexes
match) read as in a positional export. The batch dim (dim 0 of every input and output) is dynamic unless
`dynamic_batch=False`, so calibration and deployment can use other batch sizes than the example's (where
torch.export fixes a symbolic dim at an example size of 1, as nn.MultiheadAttention makes it, the module is
exported again with the examples repeated to size 2 along it; a dim the module's code fixes is named in a
warning);
`dynamic_axes` makes more dims symbolic ({"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}}: one
name ties dims together).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from irtool.errors import InputError
from irtool.usercode import first_line

log = logging.getLogger(__name__)
EXPORTERS = ("auto", "dynamo", "torchscript")
INSTALL_HINT = "exporting a PyTorch module needs torch: pip install 'irtool[torch]'"


def is_torch_module(obj: Any) -> bool:
    """Whether `obj` is a torch.nn.Module, without importing torch (a module object implies it is imported)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def export_module(module: Any, example_inputs: Any, *, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None, dynamic_batch: bool = True,
                  dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, exporter: str = "auto",
                  opset: int | None = None) -> onnx.ModelProto:
    """`module` as an ONNX ModelProto, traced on `example_inputs`: a tensor or array, a tuple of them, or a
    mapping from forward's parameter names to them (see the module docstring)."""
    torch = _torch()
    if exporter not in EXPORTERS:
        raise InputError(f"exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    label = type(module).__name__
    traced, args, names = _bind(torch, module, example_inputs, input_names, label)
    dims = _symbolic_dims(names, args, dynamic_batch, dynamic_axes or {})
    with _eval_mode(module), torch.no_grad():
        if output_names is None:
            output_names = _output_names(torch, traced, args, label)
        proto = _export(torch, traced, args, names, output_names, dims, dynamic_batch, opset, exporter, label)
    if traced is not module:
        _drop_scope(proto.graph, KEYWORD_SCOPE)
    return proto


def _export(torch: Any, module, args, names, output_names, dims, dynamic_batch, opset, exporter,
            label) -> onnx.ModelProto:
    if exporter in ("auto", "dynamo"):
        try:
            with _quiet(stderr=True):
                return _dynamo_keeping_dims(torch, module, args, names, output_names, dims, opset, label)
        except Exception as e:  # torch.export raises many types; the tracer may still take the module
            if exporter == "dynamo":
                raise InputError(f"exporting {label} with torch's dynamo exporter failed: {first_line(e)}") from e
            log.warning("exporting %s: the dynamo exporter failed (%s); using the TorchScript tracer",
                        label, first_line(e))
    try:
        # Grad on: under no_grad an eval-mode nn.MultiheadAttention (nn.Transformer*, torchvision's ViT) takes its
        # fused fast path, aten::_native_multi_head_attention, which the TorchScript exporter cannot export.
        with _quiet(stderr=False), torch.enable_grad():
            return _torchscript(torch, module, args, names, output_names, dims, dynamic_batch, opset)
    except Exception as e:
        raise InputError(f"exporting {label} with the TorchScript exporter failed: {first_line(e)}") from e


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise InputError(INSTALL_HINT) from e
    return torch


def _bind(torch: Any, module: Any, example_inputs: Any, input_names: Sequence[str] | None,
          label: str) -> tuple[Any, tuple, list[str]]:
    """(the module to trace, its positional example args, the input names): `module` itself unless the example
    inputs name parameters that are not forward's first ones, which a keyword-passing wrapper then takes."""
    if not isinstance(example_inputs, Mapping):
        items = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        args = _as_args(torch, items, list(range(len(items))))
        names = list(input_names) if input_names is not None else _forward_names(module, len(args))
        if len(names) != len(args):
            raise InputError(f"{len(names)} input name(s) for {len(args)} example input(s)")
        return module, args, names
    if input_names is not None and list(input_names) != list(example_inputs):
        raise InputError("example inputs given by name are named by their keys; leave input_names out")
    names = _keyword_order(module, example_inputs, label)
    args = _as_args(torch, tuple(example_inputs[name] for name in names), names)
    if names == _positional_names(module)[:len(names)]:
        return module, args, names
    return _keyword_call(torch, module, names), args, names


def _as_args(torch: Any, items: tuple, labels: list) -> tuple:
    if not items:
        raise InputError("example_inputs is empty: give the tensors the module's forward takes")
    args = []
    for label, item in zip(labels, items, strict=True):
        if isinstance(item, np.ndarray):  # np.require: ascontiguousarray makes a 0-d array (a timestep) 1-d
            item = torch.from_numpy(np.require(item, requirements="C"))
        if not isinstance(item, torch.Tensor):
            shown = label if isinstance(label, int) else repr(label)
            raise InputError(f"example input {shown} is a {type(item).__name__}; expected a tensor or an array")
        args.append(item)
    return tuple(args)


def _parameters(module: Any) -> list[inspect.Parameter] | None:
    """forward's parameters, or None where Python cannot read them (a builtin or C-implemented forward)."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _positional_names(module: Any) -> list[str]:
    return [p.name for p in _parameters(module) or [] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def binds_by_name(module: Any, names: Sequence[str]) -> bool:
    """Whether every name is a parameter forward declares (so inputs can be passed by name, in any order)."""
    declared = {p.name for p in _parameters(module) or [] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return bool(names) and set(names) <= declared


def missing_parameters(module: Any, names: Sequence[str]) -> list[str]:
    """forward's parameters without a default that `names` leaves out (none when they cannot be read)."""
    return _without_default(_parameters(module) or [], names)


def _without_default(params: list, given: Collection[str]) -> list[str]:
    return [p.name for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given]


def _keyword_order(module: Any, example_inputs: Mapping, label: str) -> list[str]:
    """The mapping's keys in forward's parameter order (keys only a **kwargs takes last, as given); a key
    forward does not take, or a parameter without a default that no key gives, is the caller's error."""
    params = _parameters(module)
    if params is None:
        raise InputError(f"{label}.forward's parameters cannot be read: give the example inputs as a tuple, in order")
    keyword = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in example_inputs:
        if not isinstance(key, str) or not key.isidentifier():
            raise InputError(f"example input key {key!r}: expected the name of a parameter of {label}.forward")
        if key not in keyword and not takes_any:
            raise InputError(f"example input {key!r}: {label}.forward takes no such parameter "
                             f"(it takes {', '.join(keyword) or 'none by name'})")
    needed = _without_default(params, example_inputs)
    if needed:
        raise InputError(f"{label}.forward needs {needed[0]!r}, which has no default: give an example input for it")
    return [name for name in keyword if name in example_inputs] + [k for k in example_inputs if k not in keyword]


# The attribute the keyword wrapper holds the module under; `_drop_scope` removes it from exported names.
KEYWORD_SCOPE = "irtool_keyword_call"


def _keyword_call(torch: Any, module: Any, names: list[str]) -> Any:
    """A module whose forward(*tensors) calls `module` with them by name. One wrapper serves both exporters:
    the tracer's own keyword form (a dict as the last example arg) lost an input of the graph."""

    class KeywordCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, KEYWORD_SCOPE, module)

        def forward(self, *tensors):
            return getattr(self, KEYWORD_SCOPE)(**dict(zip(names, tensors, strict=True)))

    # torch.export binds the example args and dynamic shapes to forward's signature: one parameter per name.
    KeywordCall.forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
    call = KeywordCall()
    call.training = False  # itself only: export_module puts the module's own flags back after the export
    return call


def _drop_scope(graph: onnx.GraphProto, scope: str) -> None:
    """Rename `scope.x` (weights) and `/scope/x` (the tracer's node and value names) to `x` and `/x`, in
    `graph` and its subgraphs, unless the shorter name is taken."""
    graphs = list(_graphs(graph))
    taken = set()
    for g in graphs:
        taken |= {t.name for t in (*g.initializer, *g.value_info, *g.input, *g.output, *g.node)}
        taken |= {o for n in g.node for o in n.output}
    renamed = {}
    for name in taken:
        for prefix, keep in ((f"{scope}.", ""), (f"/{scope}/", "/")):
            if name.startswith(prefix) and keep + name[len(prefix):] not in taken:
                renamed[name] = keep + name[len(prefix):]
    for g in graphs:
        for item in (*g.initializer, *g.value_info, *g.input, *g.output, *g.node):
            item.name = renamed.get(item.name, item.name)
        for node in g.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
            node.output[:] = [renamed.get(name, name) for name in node.output]


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph in it (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _graphs(sub)


def _forward_names(module: Any, count: int) -> list[str]:
    """The first `count` positional parameters of forward, or input, input_1, ... when it takes *args."""
    names = _positional_names(module)
    if len(names) >= count:
        return names[:count]
    return ["input" if i == 0 else f"input_{i}" for i in range(count)]


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


# torch's own loggers, which report the steps and a failed torch.export's graph with their own handlers.
_TORCH_LOGGERS = ("torch", "torch._dynamo", "torch._export", "torch.export", "torch.fx", "torch.onnx",
                  "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet(stderr: bool) -> Iterator[None]:
    """torch.onnx prints its steps (and, when torch.export fails, the traced graph) on stdout, where the CLI
    writes JSON, and on stderr; that goes to the debug log. The tracer's stderr stays: its TracerWarnings say
    where a trace may not generalize."""
    captured = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in _TORCH_LOGGERS}
    try:
        for name in _TORCH_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(captured), \
                (contextlib.redirect_stderr(captured) if stderr else contextlib.nullcontext()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if captured.getvalue():
            log.debug("torch.onnx output:\n%s", captured.getvalue())


def _output_names(torch: Any, module: Any, args: tuple, label: str) -> list[str]:
    """Names for the flattened outputs of one forward: a dict's keys, else output, output_1, ... (the exporters'
    own names are op names or numbers, and the tracer's dynamic axes need the names)."""
    try:
        outputs = module(*args)
    except Exception as e:
        raise InputError(f"running {label} on the example inputs failed: {first_line(e)}") from e
    leaves = torch.utils._pytree.tree_leaves(outputs)
    if isinstance(outputs, dict) and len(outputs) == len(leaves) and all(str(k).isidentifier() for k in outputs):
        return [str(k) for k in outputs]
    return ["output" if i == 0 else f"output_{i}" for i in range(len(leaves))]


def _symbolic_dims(names: list[str], args: tuple, dynamic_batch: bool,
                   dynamic_axes: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, str]]:
    """{input name: {axis: dim name}} for every symbolic input dim."""
    ranks = {name: arg.dim() for name, arg in zip(names, args, strict=True)}
    dims: dict[str, dict[int, str]] = {name: ({0: "batch"} if dynamic_batch and rank else {})
                                       for name, rank in ranks.items()}
    for name, axes in dynamic_axes.items():
        if name not in ranks:
            raise InputError(f"dynamic axes for {name!r}: the inputs are {', '.join(names)}")
        for axis, dim in axes.items():
            if not -ranks[name] <= int(axis) < ranks[name] or not str(dim).isidentifier():
                raise InputError(f"dynamic axis {axis}={dim!r} of {name!r}: needs an axis of its {ranks[name]} "
                                 "and a name of letters, digits and _")
            dims[name][int(axis) % ranks[name]] = str(dim)
    return dims


def _dynamo(torch: Any, module, args, names, output_names, dims, opset) -> onnx.ModelProto:
    shapes = None
    if any(dims.values()):
        made = {dim: torch.export.Dim(dim) for axes in dims.values() for dim in axes.values()}
        shapes = tuple({axis: made[dim] for axis, dim in dims[name].items()} for name in names)
    program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=output_names,
                                dynamic_shapes=shapes, opset_version=opset, verbose=False)
    return program.model_proto


def _dynamo_keeping_dims(torch: Any, module, args, names, output_names, dims, opset, label) -> onnx.ModelProto:
    """_dynamo, exported again with the examples repeated along a symbolic dim that came out static: torch.export
    fixes a dim whose example size is 1 where the code branches on it (nn.MultiheadAttention: a batch of 1 gave
    a model that takes batch 1 only, without a word); a warning names what stays static."""
    proto = _dynamo(torch, module, args, names, output_names, dims, opset)
    lost = _fixed_dims(proto, dims)
    ones = {dims[name][axis] for name, axis in lost if args[names.index(name)].shape[axis] == 1}
    if ones:
        log.info("exporting %s: the dynamo exporter fixed %s at the example's size 1; exporting with size 2",
                 label, ", ".join(sorted(ones)))
        args = tuple(_repeated(torch, arg, dims[name], ones) for name, arg in zip(names, args, strict=True))
        proto = _dynamo(torch, module, args, names, output_names, dims, opset)
        lost = _fixed_dims(proto, dims)
    if lost:
        log.warning("exporting %s: the dynamo exporter made %s static (the module's code fixes them)", label,
                    ", ".join(f"dim {axis} of {name!r}" for name, axis in lost))
    return proto


def _fixed_dims(proto: onnx.ModelProto, dims: dict[str, dict[int, str]]) -> list[tuple[str, int]]:
    """(input, axis) of the dims asked to be symbolic that the exported model has static."""
    shapes = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    return [(name, axis) for name, axes in dims.items() for axis in axes
            if name in shapes and axis < len(shapes[name]) and not shapes[name][axis].dim_param]


def _repeated(torch: Any, arg, axes: dict[int, str], names: set[str]):
    for axis, dim in axes.items():
        if dim in names and arg.shape[axis] == 1:
            arg = torch.cat([arg, arg], dim=axis)
    return arg


def _torchscript(torch: Any, module, args, names, output_names, dims, dynamic_batch, opset) -> onnx.ModelProto:
    axes = None
    if any(dims.values()):
        axes = {name: dict(found) for name, found in dims.items() if found}
        if dynamic_batch:
            axes.update({name: {0: "batch"} for name in output_names})
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, input_names=names, output_names=output_names,
                      dynamic_axes=axes, opset_version=opset or 17)
    return onnx.load_from_string(buffer.getvalue())


def example_inputs_for(shapes: Mapping[str, list[int]], dtypes: Mapping[str, str], seed: int = 0) -> tuple:
    """Example arrays for the CLI: standard normal floats, zeros for integer inputs (valid token ids and
    indices), in the order `shapes` gives them."""
    rng = np.random.default_rng(seed)
    arrays = []
    for name, dims in shapes.items():
        dtype = np.dtype(dtypes.get(name, "float32"))
        arrays.append(rng.standard_normal(dims).astype(dtype) if dtype.kind == "f" else np.zeros(dims, dtype))
    return tuple(arrays)


def load_module(spec: str) -> Any:
    """The nn.Module named by `spec`: `path/to/file.py:NAME` or `package.module:NAME`, NAME an nn.Module or
    a class or function that returns one when called without arguments (irtool.usercode)."""
    from irtool.usercode import load_name

    torch = _torch()
    found = load_name(spec, "MODULE")
    name = spec.rpartition(":")[2]
    if not isinstance(found, torch.nn.Module):
        if not callable(found):
            raise InputError(f"MODULE {spec!r}: {name} is a {type(found).__name__}, not a module or a factory")
        try:
            found = found()
        except Exception as e:
            raise InputError(f"MODULE {spec!r}: calling {name}() failed: {first_line(e)}") from e
    if not isinstance(found, torch.nn.Module):
        raise InputError(f"MODULE {spec!r}: {name}() returned a {type(found).__name__}, not a torch.nn.Module")
    return found
