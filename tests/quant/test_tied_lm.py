"""`quant` (and `quant-gptq`) on a small language model whose head is tied to its embedding table, exported by either
torch exporter: the table is stored once as int8 (the lookup reads the head's integers, quant-dynamic{share-head}).
When this was written: 116447 -> 81535 bytes of weights (dynamo; torchscript 116711 -> 81784), logits SQNR
36.12 -> 34.76 dB (36.42 -> 34.90), next-token top-1 agreement with float 1.000 either way, on 256 held-out token
positions."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from irtool.api import optimize
from tests.passes.helpers import run_ort
from tests.quant.digits_models import sqnr_db

torch = pytest.importorskip("torch")
VOCAB, WIDTH = 512, 64


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.norm1 = torch.nn.LayerNorm(WIDTH)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(4 * WIDTH, WIDTH))
        self.norm2 = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2 and most small LMs

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(self.norm1(h))
        return self.head(self.norm2(h))


def _logits(model, feeds: list[dict]) -> np.ndarray:
    return np.concatenate([next(iter(run_ort(model, f).values())) for f in feeds]).astype(np.float64)


def _quantized(module, pipelines: dict[str, str], exporter: str = "dynamo") -> dict[str, dict]:
    """{label: the int8 tables of the model `pipelines[label]` makes, its weight bytes, logits SQNR and top-1
    agreement with float on held-out tokens, the tables quant-dynamic shared}."""
    from irtool.frontends.torch import export_module

    proto = export_module(module.eval(), {"ids": torch.randint(0, VOCAB, (2, 8))}, exporter=exporter)
    rng = np.random.default_rng(0)
    calibration = [{"ids": rng.integers(0, VOCAB, (2, 8))} for _ in range(16)]
    held_out = [{"ids": rng.integers(0, VOCAB, (2, 8))} for _ in range(16)]
    reference = _logits(proto, held_out)
    found = {}
    for label, text in pipelines.items():
        result = optimize(proto, text, calibration_data=calibration)
        logits = _logits(result.model, held_out)
        tables = [t for t in result.model.to_proto().graph.initializer
                  if t.data_type == TensorProto.INT8 and VOCAB in t.dims and WIDTH in t.dims]
        found[label] = {"shared": result.stats("quant-dynamic")["tables_shared"], "tables": len(tables),
                        "bytes": sum(t.ByteSize() for t in result.model.to_proto().graph.initializer),
                        "sqnr": sqnr_db(reference, logits),
                        "agree": float(np.mean(reference.argmax(-1) == logits.argmax(-1)))}
    return found


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_quant_stores_a_tied_lms_table_once(exporter):
    torch.manual_seed(0)
    found = _quantized(TinyLM(), {"shared": "quant", "own": "quant{share-head=false}"}, exporter)
    shared, own = found["shared"], found["own"]
    assert (shared["shared"], shared["tables"]) == (1, 1) and (own["shared"], own["tables"]) == (0, 2), found
    assert shared["bytes"] < own["bytes"] - 0.99 * VOCAB * WIDTH, found
    assert shared["sqnr"] > 30.0 and shared["sqnr"] > own["sqnr"] - 3.0, found
    assert shared["agree"] >= 0.99, found


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_quant_gptq_stores_a_tied_lms_table_once_too(exporter):
    """gptq rounds the head's weights its own way, not to the nearest step, so the lookup could not tell the head's
    integers for its table's and stored a second int8 table: 116 KB, the float model's size (logits SQNR 36.2 dB).
    insert-qdq notes the weight each gptq-rounded int8 weight came from (a digest), and the lookup reads the head's
    integers: 82 KB, 34.8 dB, as `quant` (whose shared table costs the same: the head's 7-bit grid)."""
    torch.manual_seed(0)
    found = _quantized(TinyLM(), {"quant": "quant", "shared": "quant-gptq", "own": "quant-gptq{share-head=false}"},
                       exporter)
    shared, own, plain = found["shared"], found["own"], found["quant"]
    assert (shared["shared"], shared["tables"]) == (1, 1) and (own["shared"], own["tables"]) == (0, 2), found
    assert shared["bytes"] < own["bytes"] - 0.99 * VOCAB * WIDTH and abs(shared["bytes"] - plain["bytes"]) < 256
    assert shared["sqnr"] > plain["sqnr"] - 0.5 and shared["agree"] >= 0.99, found


class UntiedLM(TinyLM):
    """The same, with a head of its own: its weight has the table's shape and other values."""

    def __init__(self):
        super().__init__()
        self.head.weight = torch.nn.Parameter(torch.randn(VOCAB, WIDTH) * 0.05)


def test_a_lookup_does_not_take_the_integers_of_a_gptq_head_rounded_from_another_weight():
    torch.manual_seed(0)
    found = _quantized(UntiedLM(), {"gptq": "quant-gptq"})["gptq"]
    assert (found["shared"], found["tables"]) == (0, 2), found
