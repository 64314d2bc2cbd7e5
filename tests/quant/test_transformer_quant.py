"""Transformers: the default `quant` pipeline must reach embedding cosine >= 0.98 even where the plain
static INT8 recipe fails (outlier channels, as real BERT-style encoders have)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from irtool.api import optimize
from irtool.errors import InputError
from irtool.passes.pipelines import QUANT
from tests.passes.helpers import serialized
from tests.quant.torch_models import TOKENS, VOCAB, encoder_proto, sentence_encoder_proto


def with_outliers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Two hidden channels of the first LayerNorm get 60x gain: the activation outliers of real encoders."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name == "blocks.0.ln1.weight":
            w = numpy_helper.to_array(t).copy()
            w[[3, 17]] *= 60.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            return out
    raise AssertionError("encoder has no blocks.0.ln1.weight")


def data(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 16, 32)).astype(np.float32)} for _ in range(count)]


def embeddings(proto: onnx.ModelProto, batches) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, b)[0].reshape(-1, 64) for b in batches])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
def test_default_quant_keeps_embedding_cosine(outliers):
    proto = with_outliers(encoder_proto()) if outliers else encoder_proto()
    calib, test = data(0, 16), data(1, 8)
    reference = embeddings(proto, test)
    result = optimize(proto, "quant", calibration_data=calib, verify_each=True)
    cosine = mean_cosine(reference, embeddings(result.model.to_proto(), test))
    assert cosine >= 0.98, cosine
    kept = result.stats("insert-qdq")["layers_kept_float"]
    assert bool(kept) == outliers  # mixed precision only where plain INT8 falls short
    if outliers:
        plain = optimize(proto, "cleanup,calibrate,insert-qdq", calibration_data=calib).model.to_proto()
        assert mean_cosine(reference, embeddings(plain, test)) < 0.98  # the plain static recipe fails here


def test_quant_dynamic_keeps_cosine_099():
    proto = encoder_proto()
    test = data(2, 8)
    out = optimize(proto, "quant-dynamic").model.to_proto()
    assert mean_cosine(embeddings(proto, test), embeddings(out, test)) >= 0.99


def sentences(seed: int, count: int, batch: int = 8, per_batch: bool = False) -> list[dict[str, np.ndarray]]:
    """Token batches padded as a tokenizer pads them: lengths 4..24, id 0 and mask 0 past each sentence's end;
    padded to 24 tokens, or with `per_batch` to the batch's longest sentence."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(4, TOKENS + 1, batch)
        width = int(lengths.max()) if per_batch else TOKENS
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
        out.append({"input_ids": rng.integers(1, VOCAB, (batch, width)) * mask, "attention_mask": mask})
    return out


QUANT_STATIC_ONLY = QUANT.replace(",quant-dynamic{op-types=[Gather]}", "")


def test_quant_stores_embedding_tables_as_int8():
    """The static recipe leaves a lookup table float; `quant` ends with quant-dynamic{op-types=[Gather]}, so the
    word and position tables are int8 with a scale per row (the 2-row token-type table is below quant-dynamic's
    min-size and stays float), and the model's weight bytes fall below 0.65x."""
    proto = sentence_encoder_proto()
    calibration = sentences(0, 8)
    static = optimize(proto, "quant", calibration_data=calibration)
    before = sum(t.ByteSize() for t in static.model.to_proto().graph.initializer)
    tables = {n.inputs[0].values.shape[0]: n.inputs[0].values.dtype for n in static.model.graph.nodes
              if n.op == "Gather" and hasattr(n.inputs[0], "values") and n.inputs[0].values.ndim == 2}
    assert tables == {VOCAB: np.int8, TOKENS: np.int8, 2: np.float32}
    assert static.stats("quant-dynamic")["weights_quantized"] == 2
    without = optimize(proto, QUANT_STATIC_ONLY, calibration_data=calibration).model.to_proto()
    assert before < 0.65 * sum(t.ByteSize() for t in without.graph.initializer)


def activation_scales(proto: onnx.ModelProto) -> list[float]:
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [float(values[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in values and values[n.input[1]].size == 1]


@pytest.mark.parametrize("padding", ["finfo", "inf"])
@pytest.mark.parametrize("pipeline, target", [("quant", 0.98), ("quant-dynamic", 0.99)])
def test_sentence_encoder_on_padded_batches(pipeline, target, padding):
    """A MiniLM-shaped export (int64 ids and mask, the padding added to the scores as finfo.min or -inf)
    keeps its sentence embeddings on padded batches. A quantized range that took in the padding bias (scale
    ~1e36) would round every attention score of the batch to one value; an infinity in calibration must not
    stop it (softmax makes it a 0)."""
    proto = sentence_encoder_proto(padding)
    test = sentences(1, 6)
    reference = embeddings(proto, test)
    result = optimize(proto, pipeline, calibration_data=sentences(0, 8) if pipeline == "quant" else None)
    quantized = result.model.to_proto()
    assert mean_cosine(reference, embeddings(quantized, test)) >= target
    if pipeline == "quant":
        stats = result.stats("insert-qdq")
        assert stats["layers_kept_float"] == [] and stats["layers_quantized"] == 24  # 18 Linear + 6 attention MatMul
        scales = activation_scales(quantized)
        assert len(scales) == stats["qdq_pairs"] and 0.0 < min(scales) and max(scales) < 1.0


def test_sentence_encoder_random_calibration_stays_finite():
    """Random integer inputs are 0 or 1: valid ids and mask values. With 2 or 3, (1 - mask) * finfo.min
    overflowed to inf and calibration stopped on a NaN/Inf the data, not the model, made."""
    shapes = {"input_ids": [8, TOKENS], "attention_mask": [8, TOKENS]}  # the export's token axis is dynamic
    result = optimize(sentence_encoder_proto(), "cleanup,calibrate,insert-qdq", calibration_data="random",
                      input_shapes=shapes, calib_batch_size=8)
    scales = activation_scales(result.model.to_proto())
    assert len(scales) == result.stats("insert-qdq")["qdq_pairs"] > 0
    assert all(np.isfinite(scales)) and 0.0 < min(scales)


def test_sentence_encoder_calibrates_on_batches_padded_to_their_own_length():
    """Each batch padded to its longest sentence, as a data loader does: the calibration batches (16) would mix
    lengths, so a batch ends where the length changes; the ranges are the same with batches of 1, 8 and 16, and
    the INT8 model keeps its embeddings on batches of other lengths."""
    from irtool.passes.quant.calibrate import stored_ranges

    proto = sentence_encoder_proto()
    calib, test = sentences(0, 6, per_batch=True), sentences(1, 4, per_batch=True)
    assert len({b["input_ids"].shape[1] for b in calib}) > 1
    ranges = [stored_ranges(optimize(proto, "cleanup,calibrate{method=percentile}", calibration_data=calib,
                                     calib_batch_size=size).model) for size in (1, 8, 16)]
    assert ranges[0] == ranges[1] == ranges[2] and len(ranges[0]) > 20
    quantized = optimize(proto, "quant", calibration_data=calib).model.to_proto()
    assert mean_cosine(embeddings(proto, test), embeddings(quantized, test)) >= 0.98


def test_input_shapes_that_fold_shapes_become_the_written_models_inputs():
    """fold-constants folds the export's position ids and token types for the given 8 x 24 (Shape ops of the
    inputs): the model written takes only that shape, and says so. Its inputs stayed symbolic before, and a batch
    of 16 failed inside ONNX Runtime ("Attempting to broadcast an axis by a dimension other than 1"). Calibration
    batches of a multiple of that batch are split to it (the statistics are per sample); others are refused in one
    line naming the input."""
    proto = sentence_encoder_proto()
    shapes = {"input_ids": [8, TOKENS], "attention_mask": [8, TOKENS]}
    result = optimize(proto, "cleanup", input_shapes=shapes)
    written = result.model.to_proto()
    assert {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in written.graph.input} == shapes
    fold = next(r for r in result.records if r.name == "fold-constants")
    assert fold.stats["nodes_folded"] > 0 and fold.stats["inputs_pinned"] == ["attention_mask", "input_ids"]
    batches = sentences(3, 2)
    np.testing.assert_allclose(embeddings(written, batches), embeddings(proto, batches), rtol=1e-5, atol=1e-5)
    sixteen = sentences(4, 1, batch=16)
    eights = [{k: v[:8] for k, v in sixteen[0].items()}, {k: v[8:] for k, v in sixteen[0].items()}]
    split, halves = (optimize(proto, "cleanup,calibrate,insert-qdq", input_shapes=shapes, calibration_data=data)
                     for data in (sixteen, eights))
    assert next(r for r in split.records if r.name == "calibrate").stats["observed"] > 0
    assert serialized(split.model) == serialized(halves.model)  # the same scales as batches of 8
    with pytest.raises(InputError, match=r"input 'input_ids' has shape \[12, 24\], the model declares \[8, 24\] "
                                         r"\(--calib-batch-size"):
        optimize(proto, "cleanup,calibrate", input_shapes=shapes, calibration_data=sentences(4, 1, batch=12))


def padding_mask_attention_proto() -> onnx.ModelProto:
    """nn.MultiheadAttention with a key_padding_mask, as torch's dynamo exporter writes it: Where(mask == 0, -inf,
    0) expanded over the heads and added to the scores (the 1/sqrt(d) is folded into q, so a MatMul feeds the
    Add), then Softmax."""
    import torch
    from torch import nn

    from irtool.frontends.torch import export_module

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)
            self.ln = nn.LayerNorm(32)

        def forward(self, ids, mask):
            x = self.emb(ids)
            y, _ = self.att(x, x, x, key_padding_mask=mask == 0)
            return self.ln(x + y).mean(1)

    torch.manual_seed(0)
    example = {"ids": torch.randint(0, 100, (2, 12)), "mask": torch.ones(2, 12, dtype=torch.int64)}
    return export_module(Masked().eval(), example, exporter="dynamo")


def padded_batches(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        lengths = rng.integers(3, 13, 8)
        batches.append({"ids": rng.integers(0, 100, (8, 12)),
                        "mask": (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)})
    return batches


@pytest.mark.parametrize("pipeline", ["quant", "quant-trt"])
def test_an_attention_padding_mask_stays_float(pipeline):
    """The mask holds -inf: quant-trt took the scores + mask Add for a residual and quantized the mask, and
    calibration stopped ("holds NaN or Inf")."""
    proto = padding_mask_attention_proto()
    result = optimize(proto, pipeline, calibration_data=padded_batches(0, 8), verify_each=True)
    softmax = next(n for n in result.model.graph.nodes if n.op == "Softmax")
    add = softmax.inputs[0].inputs[0]
    assert add.op == "Add" and not [t for t in add.inputs if t.inputs and t.inputs[0].op == "DequantizeLinear"]
    assert any(n.op == "QuantizeLinear" for n in result.model.graph.nodes)
    test = padded_batches(1, 4)

    def outputs(model_proto):
        session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, b)[0] for b in test])

    reference, got = outputs(proto), outputs(result.model.to_proto())
    assert np.isfinite(got).all() and mean_cosine(reference, got) > 0.999
