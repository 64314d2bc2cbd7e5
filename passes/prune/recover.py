"""Training-free recovery after channel removal, from calibration data.

bias   For a consumer y = W·x + b that lost input channels R, the removed part contributed
       Σ_{c∈R} W[:, c]·x_c. Replacing x_c by its mean over the data gives the bias update
       b' = b + Σ_{c∈R} Σ_k W[:, c, k]·E[x_c]   (Conv sums over the kernel; edge padding ignored).
lstsq  ThiNet / He et al. 2017 style reconstruction: for each consumer in topological order, refit
       its weights and bias so that, fed with the *pruned* network's activations X', it reproduces
       the *unpruned* network's output Y:  min ||[X' 1]·θ − Y||² + λ||θ||², solved through the normal
       equations AᵀA θ = AᵀY, which are accumulated batch by batch (memory does not grow with the
       number of samples). Conv inputs are unfolded into k×k patches (im2col); λ = 1e-4·tr(AᵀA)/d.
       Refitting in order lets later layers absorb what earlier refits could not reconstruct.
Consumers are Conv (group 1), Gemm (alpha = beta = 1, transA = 0) and MatMul with a constant 2-D
weight; others are left as they are and counted as skipped.
"""

from __future__ import annotations

import enum
import logging

import numpy as np
import onnx_graphsurgeon as gs

from irtool.calibration.tap import channel_means, tap
from irtool.errors import InputError
from irtool.ir.model import Model
from irtool.ir.topo import topo_order
from irtool.passmanager import PassContext

log = logging.getLogger(__name__)
MAX_ROWS_PER_BATCH = 4096


class Recover(enum.Enum):
    NONE = "none"
    BIAS = "bias"
    LSTSQ = "lstsq"


def recover(kind: Recover, reference: Model, pruned: Model, removed: dict[str, list[int]], ctx: PassContext) -> int:
    """Apply recovery in place on `pruned`; return the number of consumers updated."""
    if ctx.calibration_data is None:
        raise InputError(f"recover={kind.value} needs calibration data (--calib-data or calibration_data=)")
    consumers = [n for n in _ordered(pruned) if _refittable(n) and n.inputs[0].name in removed]
    if kind is Recover.BIAS:
        return _bias_correct(consumers, reference, removed, ctx)
    return sum(_refit(node, reference, pruned, removed, ctx) for node in consumers)


def _ordered(model: Model) -> list[gs.Node]:
    nodes = model.graph.nodes
    return [nodes[i] for i in topo_order(nodes)]


def _refittable(node: gs.Node) -> bool:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    if node.op == "Conv":
        return int(node.attrs.get("group", 1)) == 1 and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") \
            and all(d == 1 for d in node.attrs.get("dilations", [1]))
    if node.op == "Gemm":
        return not node.attrs.get("transA", 0) and node.attrs.get("alpha", 1.0) == 1.0 \
            and node.attrs.get("beta", 1.0) == 1.0
    return node.op == "MatMul" and np.asarray(node.inputs[1].values).ndim == 2


# ----------------------------------------------------------------------------------- bias
def _bias_correct(consumers: list[gs.Node], reference: Model, removed: dict[str, list[int]],
                  ctx: PassContext) -> int:
    axes = {n.inputs[0].name: 1 if n.op == "Conv" else -1 for n in consumers}
    means = channel_means(reference, axes, ctx.calibration_data())
    original = {n.name: n for n in reference.graph.nodes}
    updated = 0
    for node in consumers:
        if node.op == "MatMul":
            continue  # no bias to fold into
        w = np.asarray(original[node.name].inputs[1].values, dtype=np.float64)
        gone = np.asarray(removed[node.inputs[0].name])
        mean = means[node.inputs[0].name][gone]
        if node.op == "Conv":
            delta = np.einsum("oc,c->o", w[:, gone].reshape(w.shape[0], len(gone), -1).sum(axis=2), mean)
        else:
            w2 = w if node.attrs.get("transB", 0) else w.T
            delta = w2[:, gone] @ mean
        # The consumer may have lost output channels too: keep the entries of its survivors.
        lost = set(removed.get(node.outputs[0].name, ()))
        delta = delta[[i for i in range(len(delta)) if i not in lost]]
        _set_bias(node, _bias(node) + delta)
        updated += 1
    return updated


def _bias(node: gs.Node) -> np.ndarray:
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.broadcast_to(np.asarray(node.inputs[2].values, dtype=np.float64), (_out_channels(node),)).copy()
    return np.zeros(_out_channels(node))


def _out_channels(node: gs.Node) -> int:
    w = np.asarray(node.inputs[1].values)
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.shape[0]
    return w.shape[1]


def _set_bias(node: gs.Node, bias: np.ndarray) -> None:
    dtype = np.asarray(node.inputs[1].values).dtype
    constant = gs.Constant(f"{node.name}_recovered_bias", bias.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = constant
    else:
        node.inputs.append(constant)


# ----------------------------------------------------------------------------------- lstsq
def _refit(node: gs.Node, reference: Model, pruned: Model, removed: dict[str, list[int]], ctx: PassContext) -> int:
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    lost = set(removed.get(y_name, ()))
    with_bias = node.op != "MatMul"
    ata = aty = None
    rng = np.random.default_rng(ctx.seed)
    batches = ctx.calibration_data()
    targets = tap(reference, [y_name], ctx.calibration_data())
    for xs, ys in zip(tap(pruned, [x_name], batches), targets, strict=True):
        a, y = _rows(node, xs[x_name]), _target_rows(node, ys[y_name])
        if lost:  # the consumer's own removed outputs are not reconstructed
            y = y[:, [i for i in range(y.shape[1]) if i not in lost]]
        if len(a) > MAX_ROWS_PER_BATCH:
            keep = rng.choice(len(a), MAX_ROWS_PER_BATCH, replace=False)
            a, y = a[keep], y[keep]
        if with_bias:
            a = np.hstack([a, np.ones((len(a), 1))])
        ata = a.T @ a if ata is None else ata + a.T @ a
        aty = a.T @ y if aty is None else aty + a.T @ y
    if ata is None:
        raise InputError("calibration data is empty")
    ridge = 1e-4 * np.trace(ata) / len(ata) + 1e-12
    theta = np.linalg.solve(ata + ridge * np.eye(len(ata)), aty)
    _store(node, theta, with_bias)
    return 1


def _rows(node: gs.Node, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    if node.op != "Conv":
        return x.reshape(-1, x.shape[-1])
    w = np.asarray(node.inputs[1].values)
    kh, kw = w.shape[2], w.shape[3]
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = list(node.attrs.get("strides", [1, 1]))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def _target_rows(node: gs.Node, y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    if node.op == "Conv":
        return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _store(node: gs.Node, theta: np.ndarray, with_bias: bool) -> None:
    w_old = np.asarray(node.inputs[1].values)
    weights = theta[:-1] if with_bias else theta
    if node.op == "Conv":
        new_w = weights.T.reshape(w_old.shape)
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        new_w = weights.T
    else:
        new_w = weights
    node.inputs[1] = gs.Constant(f"{node.name}_recovered_w", new_w.astype(w_old.dtype))
    if with_bias:
        _set_bias(node, theta[-1])
