"""Probe: irtool on model-zoo architectures with random weights, exported by both torch exporters.

For each model: export (torch.export at opset 18, the legacy exporter at opset 17), `cleanup`, the channel-groups
analysis (free channels of all), `prune{ratio=0.5}` against the masked original (the pruned model must equal the
original with the removed channels' consumer weights zeroed: the error is relative to the output's largest value),
and `quant` (8 fixed-seed calibration inputs) as output SQNR against float. A failure is printed in one line;
nothing is written. Found with it (session 26): Resize sizes naming the channel count (DeepLabV3, SegFormer),
LeViT's Flatten(axis=2), ALBERT's IsNaN.

The zoos are not dependencies of irtool. Hugging Face transformers runs beside the dev install:
    pip install transformers
timm needs torchvision, which on this machine only imports with torch 2.14.1, so use a venv of its own:
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tv/bin/pip install -e .[dev] timm onnxscript

    PYTHONPATH=. python bench/zoo_probe.py --source hf bert gpt2 segformer
    PYTHONPATH=. /tmp/tv/bin/python bench/zoo_probe.py --source timm --size 64 mobilenetv3_small_100 mobileone_s0
    PYTHONPATH=. /tmp/tv/bin/python bench/zoo_probe.py --source torchvision --size 128 deeplabv3_mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import io
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from irtool.analysis.channels import ChannelGroups
from irtool.api import optimize
from irtool.ir import Model
from irtool.passmanager import PassContext
from tests.prune.test_prune_masking import masked, prune

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _text(vocab: int = 100, batch: int = 2, tokens: int = 12) -> dict:
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _image(size: int) -> dict:
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}


def hf_models() -> dict:
    """A few of the Hugging Face configs probed in session 26, at toy size (add more the same way)."""
    import transformers as T

    return {
        "bert": lambda: (T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **SMALL)),
                         _text()),
        "albert": lambda: (T.AlbertModel(T.AlbertConfig(vocab_size=100, embedding_size=32, **SMALL)), _text()),
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                                        use_cache=False)), _text()),
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, use_cache=False,
                                                           **SMALL)), _text()),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=10,
                                                                **SMALL)), _image(32)),
        "levit": lambda: (T.LevitForImageClassification(T.LevitConfig(
            image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=10)), _image(64)),
        "segformer": lambda: (T.SegformerForSemanticSegmentation(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            decoder_hidden_size=32, num_labels=4, patch_sizes=[7, 3], strides=[4, 2])), _image(64)),
        "whisper_encoder": lambda: (T.WhisperForAudioClassification(T.WhisperConfig(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=16, num_labels=3, classifier_proj_size=32)),
            {"input_features": torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))}),
    }


class _Positional(torch.nn.Module):
    """The model called with `names` as keywords, returning its first output (logits, a segmentation map): the legacy
    exporter otherwise turns parameters with defaults into graph inputs (transformers' logits_to_keep)."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args, strict=True)))
        return out["out"] if isinstance(out, dict) and "out" in out else out[0] if isinstance(out, (tuple, dict)) \
            else out


def vision_model(source: str, name: str, size: int):
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        import torchvision

        for module in (torchvision.models.segmentation, torchvision.models.detection, torchvision.models):
            if hasattr(module, name):
                dense = module is not torchvision.models
                model = getattr(module, name)(weights=None, num_classes=5,
                                              **({"weights_backbone": None} if dense else {}))
                break
        else:
            raise SystemExit(f"torchvision has no model {name!r}")
    return model, {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}


def _realistic(model: torch.nn.Module) -> torch.nn.Module:
    """Norm statistics and layer scales of a trained model's order, so no branch is silent (a fresh layer scale of
    1e-6 leaves a residual branch with nothing to quantize)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
    for name, p in model.named_parameters():
        if name.endswith("gamma") and p.dim() == 1:
            p.data.uniform_(0.1, 0.5)
        elif p.dim() == 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def export(model, inputs: dict, dynamo: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Positional(model, list(inputs)), tuple(inputs.values()), buffer, dynamo=dynamo,
                          input_names=list(inputs), opset_version=18 if dynamo else 17,
                          **({"verbose": False} if dynamo else {}))
    return onnx.load_from_string(buffer.getvalue())


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds.values(), strict=False)))


def _like(feeds: dict, seed: int) -> dict:
    rng = np.random.default_rng(100 + seed)
    return {k: (rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f"
                else rng.integers(0, 100, v.shape).astype(v.dtype) if k == "input_ids" else v)
            for k, v in feeds.items()}


def probe(make, dynamo: bool) -> str:
    torch.manual_seed(0)  # the same weights for both exporters
    model, inputs = make()
    proto = export(_realistic(model), inputs, dynamo)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    clean = optimize(proto, "cleanup").model.to_proto()
    feeds = dict(zip([i.name for i in clean.graph.input], feeds.values(), strict=False))
    groups = PassContext().analysis(ChannelGroups, Model.from_proto(clean)).groups
    free, total = sum(g.size for g in groups if g.locked is None), sum(g.size for g in groups)
    pruned, removed, records = prune(clean, "prune{ratio=0.5}")
    oracle = _run(masked(clean, removed), feeds)
    error = max(float(np.abs(a - b).max()) for a, b in zip(_run(pruned.to_proto(), feeds), oracle, strict=True))
    scale = max(float(np.abs(b).max()) for b in oracle) or 1.0
    quant = optimize(clean, "quant", calibration_data=[_like(feeds, s) for s in range(8)]).model.to_proto()
    ref, out = _run(clean, feeds)[0].astype(np.float64), _run(quant, feeds)[0]
    sqnr = 10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - out) ** 2), 1e-30))
    return (f"free {free}/{total} | prune removed {records[0].stats['channels_removed']}, error {error / scale:.1e} "
            f"of the output's largest | quant {sqnr:.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["hf", "timm", "torchvision"], required=True)
    parser.add_argument("--size", type=int, default=64, help="image side for timm and torchvision models")
    parser.add_argument("names", nargs="*", help="models (hf: the keys of hf_models(); default all of them)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    zoo = hf_models() if args.source == "hf" else {}
    for name in args.names or list(zoo):
        make = zoo.get(name) or (lambda name=name: vision_model(args.source, name, args.size))
        for dynamo in (False, True):
            try:
                line = probe(make, dynamo)
            except Exception as error:  # one line per failure: the probe goes on with the next model
                line = f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            print(f"{name} ({'torch.export' if dynamo else 'legacy'}): {line}", flush=True)


if __name__ == "__main__":
    main()
