"""Builders shared by the fold-bn and cleanup golden cases: BatchNormalization parameters and nodes,
named initializers, typed values and an opset-17 model that ONNX Runtime 1.31 accepts."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _bn_params(rng, prefix, channels):
    return [
        _init(f"{prefix}_gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        _init(f"{prefix}_beta", rng.normal(0, 0.5, channels).astype(np.float32)),
        _init(f"{prefix}_mean", rng.normal(0, 0.5, channels).astype(np.float32)),
        _init(f"{prefix}_var", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
    ]


def _bn(prefix, x, y, **attrs):
    names = [x] + [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", names, [y], name=prefix, **attrs)


def _model(nodes, inputs, outputs, initializers, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.31 refuses onnx 1.23's default IR version
    return model


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
