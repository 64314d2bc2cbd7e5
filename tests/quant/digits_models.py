"""CNNs trained in seconds on scikit-learn's digits for quantization tests: plain, residual, a
MobileNet-like net with depthwise blocks, a MobileNetV3-like one (HardSwish, HardSigmoid gates), and an
EfficientNet/YOLO-like net (SiLU, squeeze-excitation gates, a C2f split -> concat with a LeakyReLU branch).
Exported with BatchNormalization kept (fold-bn runs in the pipeline) and a dynamic batch axis."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from tests.prune.digits import DigitsNet, digits_split, export_digits, fit


def plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 16, 10))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4, act: type[nn.Module] = nn.ReLU6):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), act(),
                                  nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h), act(),
                                  nn.Conv2d(h, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def mobilenet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                         InvertedResidual(16), InvertedResidual(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def mobilenet_imbalanced() -> nn.Module:
    """The MobileNet failure mode of Nagel et al. 2019 (their Fig. 2): after BatchNorm folding, the
    depthwise channels' weight ranges span orders of magnitude, so per-tensor INT8 weights round the small
    channels to almost nothing. Made explicit here (a short training run does not get there): depthwise
    BatchNorm scales start log-uniform over [1e-3, 1]. ReLU, as in that paper, so equalization is exact."""
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        InvertedResidual(16, act=nn.ReLU), InvertedResidual(16, act=nn.ReLU),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    spread = torch.Generator().manual_seed(1)
    for block in (net[3], net[4]):
        bn = block.body[4]
        with torch.no_grad():
            bn.weight.copy_(10 ** (torch.rand(bn.num_features, generator=spread) * 3 - 3))
    return net


class MBConvSE(nn.Module):
    """EfficientNet's block: expand, depthwise, squeeze-excitation gate (x * sigmoid(...)), project, residual."""

    def __init__(self, c: int, expand: int = 4, squeeze: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), nn.SiLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h), nn.SiLU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, squeeze, 1), nn.SiLU(),
                                  nn.Conv2d(squeeze, h, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.expand(x)
        return x + self.project(y * self.gate(y))


class C2fLite(nn.Module):
    """YOLOv8's C2f: conv, split in two, a conv on the second half, concat of all three, conv."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.SiLU())
        self.m = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.LeakyReLU(0.1))
        self.cv2 = nn.Sequential(nn.Conv2d(c * 3 // 2, c, 1), nn.BatchNorm2d(c), nn.SiLU())

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


def efficient_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                         MBConvSE(16), C2fLite(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class HardSE(nn.Module):
    """MobileNetV3's squeeze-excitation: a gate with HardSigmoid."""

    def __init__(self, c: int, squeeze: int = 8):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), nn.ReLU(),
                                  nn.Conv2d(squeeze, c, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.gate(x)


def mobilenet_v3_like() -> nn.Module:
    """MobileNetV3's block: expand and depthwise convs with HardSwish, a HardSigmoid gate, a linear projection."""
    def block(c: int, h: int) -> nn.Module:
        return Residual(nn.Sequential(
            nn.Conv2d(c, h, 1), nn.BatchNorm2d(h), nn.Hardswish(),
            nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h), nn.Hardswish(), HardSE(h),
            nn.Conv2d(h, c, 1), nn.BatchNorm2d(c)))

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
                         block(16, 64), block(16, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


ARCHS = {"plain": plain, "residual": DigitsNet, "mobilenet": mobilenet_like,
         "mobilenet-imbalanced": mobilenet_imbalanced, "efficient": efficient_like, "mobilenetv3": mobilenet_v3_like}


# Epochs to a net that is good at the task (the SiLU net is at 0.91 after 8, 0.98 after 16): an undertrained
# net has many near-ties, and its top-1 then moves with any perturbation, quantized or not.
EPOCHS = {"efficient": 16, "mobilenetv3": 16}


def train(arch: str, epochs: int | None = None, seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    torch.manual_seed(seed)
    (xt, yt), calib, test = digits_split(seed)
    net = ARCHS[arch]()
    fit(net, xt, yt, epochs or EPOCHS.get(arch, 8), batch=50)
    return export_digits(net, test[0][:1], keep_batchnorm=True), {"calib": calib, "test": test}


def logits(proto: onnx.ModelProto, x: np.ndarray, optimized_path: str | None = None) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - test) ** 2)))
