"""Compact plain-torch versions of the architectures pruning must handle (torchvision-free).

Widths, depths and image sizes are shrunk so that export and ONNX Runtime runs stay fast, but every
model keeps the coupling structure of the original: residual adds with downsample convs (ResNet-18/50),
inverted residuals with depthwise convs and ReLU6 (MobileNetV2), MBConv with squeeze-excitation and SiLU
(EfficientNet-B0), chunk + concat + channel shuffle (ShuffleNetV2), depthwise 7x7 + NHWC LayerNorm + MLP
+ layer scale (ConvNeXt-Tiny), patch embedding + cls token + multi-head attention + MLP (ViT-B/16; also with
torchvision's nn.MultiheadAttention, exported with the heads folded into the batch), and a
YOLO-style detector with C2f blocks, SPPF and an FPN/PAN neck with three detection heads, and a keyword
spotter with a Conv1d front end and two LSTM layers, and a Llama-style decoder (RMSNorm, RoPE, grouped-query
attention, SwiGLU).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def conv_bn(c_in: int, c_out: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU):
    layers = [nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, width, 3, stride)
        self.conv2 = conv_bn(width, width, 3, act=None)
        self.down = conv_bn(c_in, width, 1, stride, act=None) if stride != 1 or c_in != width else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv_bn(c_in, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, c_out, 1, act=None)
        self.down = conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers: tuple[int, ...], widths=(16, 32, 64, 128), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            for j in range(n):
                blocks.append(block(c, w, 2 if j == 0 and i > 0 else 1))
                c = w * block.expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18():
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50():
    return ResNet(Bottleneck, (2, 2, 2, 2), widths=(8, 16, 32, 64))


# ---------------------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, c_out, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, stride s) as in the paper, narrowed and shortened
    CONFIG = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 1, 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, c = [conv_bn(3, 16, 3, 2, act=nn.ReLU6)], 16
        for t, c_out, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers.append(conv_bn(c, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ------------------------------------------------------------------------------------- EfficientNet-B0
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, c_in // 4)), conv_bn(hidden, c_out, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNetB0(nn.Module):
    # (expansion, kernel, stride, channels, repeats): the B0 stages, narrowed and shortened
    CONFIG = ((1, 3, 1, 8, 1), (6, 3, 2, 12, 2), (6, 5, 2, 20, 2), (6, 3, 2, 40, 1), (6, 5, 1, 48, 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, c = [conv_bn(3, 16, 3, 2, act=nn.SiLU)], 16
        for t, k, s, c_out, n in self.CONFIG:
            for i in range(n):
                layers.append(MBConv(c, c_out, k, s if i == 0 else 1, t))
                c = c_out
        layers.append(conv_bn(c, 96, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(96, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.reshape(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        half = c_out // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, act=None), conv_bn(c_in, half, 1))
        b2_in = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn(b2_in, half, 1), conv_bn(half, half, 3, stride, groups=half, act=None),
                                     conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(2, 3, 2), widths=(24, 48, 96), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        units, c = [], 16
        for n, w in zip(repeats, widths, strict=True):
            for i in range(n):
                units.append(ShuffleUnit(c, w, 2 if i == 0 else 1))
                c = w
        self.stages = nn.Sequential(*units)
        self.conv5 = conv_bn(c, 128, 1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


# ------------------------------------------------------------------------------------------ ConvNeXt
class LayerNorm2d(nn.Module):
    """ConvNeXt's channels_first LayerNorm, written out as in the reference implementation."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, depths=(2, 2, 2, 1), dims=(16, 32, 48, 64), classes: int = 10):
        super().__init__()
        self.down = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.down.append(nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for n, d in zip(depths, dims, strict=True)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        for down, stage in zip(self.down, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


# ----------------------------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape

        def heads(y):
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchvisionBlock(EncoderBlock):
    """torchvision's ViT encoder block: nn.MultiheadAttention, whose export folds the heads into the batch."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__(dim, heads, mlp)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """ViT-B/16's topology at toy size: 8x8 patches of a 32x32 image (16 tokens + cls)."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp: int = 256, classes: int = 10, block: type[EncoderBlock] = EncoderBlock):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ------------------------------------------------------------------------------------------------ Swin
class WindowAttention(nn.Module):
    """timm's Swin window attention: one fused qkv Linear split into heads by reshape [B, N, 3, H, D] and
    permute, a relative position bias per head, and the shifted windows' mask added per window."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn + self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: int):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("mask", self._mask() if shift else None)

    def _mask(self) -> torch.Tensor:
        r, w, s = self.resolution, self.window, self.shift
        regions = torch.zeros(1, r, r, 1)
        for i, (hs, ws) in enumerate((hs, ws) for hs in (slice(0, -w), slice(-w, -s), slice(-s, None))
                                     for ws in (slice(0, -w), slice(-w, -s), slice(-s, None))):
            regions[:, hs, ws, :] = i
        ids = self._partition(regions).squeeze(-1)
        return (ids.unsqueeze(1) - ids.unsqueeze(2)).ne(0).float() * -100.0

    def _partition(self, x):
        b, h, w, c = x.shape
        k = self.window
        return x.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        k = self.window
        y = self.attn(self._partition(y), self.mask)
        y = y.view(b, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated on the channels (strided slices of H and W), normed, then reduced 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    """Swin-T's topology at toy size: 4x4 patches of a 32x32 image, windows of 4x4 tokens, a shifted-window block
    pair per stage, patch merging between the two stages."""

    def __init__(self, dim: int = 32, heads: tuple[int, int] = (2, 4), classes: int = 10):
        super().__init__()
        self.patch, self.patch_norm = nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(SwinBlock(dim, heads[0], 8, 4, 0), SwinBlock(dim, heads[0], 8, 4, 2))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(SwinBlock(2 * dim, heads[1], 4, 4, 0), SwinBlock(2 * dim, heads[1], 4, 4, 0))
        self.norm, self.head = nn.LayerNorm(2 * dim), nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean((1, 2)))


# ------------------------------------------------------------------------------------------ YOLO-style
def cbs(c_in: int, c_out: int, k: int = 1, s: int = 1):
    return conv_bn(c_in, c_out, k, s, act=nn.SiLU)


class YoloBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cbs(c, c, 3), cbs(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """conv -> split in two -> n bottlenecks on the second half -> concat all -> conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = cbs(c_in, 2 * self.c)
        self.cv2 = cbs((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in // 2
        self.cv1, self.cv2 = cbs(c_in, hidden), cbs(hidden * 4, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Yolo(nn.Module):
    def __init__(self, w=(8, 16, 32, 64, 64), outputs: int = 14):
        super().__init__()
        self.stem = nn.Sequential(cbs(3, w[0], 3, 2), cbs(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True))
        self.p3 = nn.Sequential(cbs(w[1], w[2], 3, 2), C2f(w[2], w[2], 2, True))
        self.p4 = nn.Sequential(cbs(w[2], w[3], 3, 2), C2f(w[3], w[3], 1, True))
        self.p5 = nn.Sequential(cbs(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(w[4] + w[3], w[3])
        self.top_down3 = C2f(w[3] + w[2], w[2])
        self.down3, self.bottom_up4 = cbs(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.down4, self.bottom_up5 = cbs(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4])
        self.heads = nn.ModuleList(nn.Sequential(cbs(c, c, 3), cbs(c, c, 3), nn.Conv2d(c, outputs, 1))
                                   for c in (w[2], w[3], w[4]))

    def features(self, x):
        """The neck's three maps (strides 8, 16, 32), which the heads read."""
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], 1))
        return n3, n4, self.bottom_up5(torch.cat([self.down4(n4), p5], 1))

    def forward(self, x):
        return tuple(head(f) for head, f in zip(self.heads, self.features(x), strict=True))


# ------------------------------------------------------------------------------------- keyword spotting
class SpeechLSTM(nn.Module):
    """Keyword spotting on feature frames [N, 10, T]: a Conv1d front end, two LSTM layers, a classifier on the
    last step."""

    def __init__(self, features: int = 10, channels: int = 64, hidden: int = 96, classes: int = 12):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(features, channels, 3, padding=1), nn.BatchNorm1d(channels), nn.ReLU())
        self.lstm = nn.LSTM(channels, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        y, _ = self.lstm(self.front(x).transpose(1, 2))
        return self.head(y[:, -1])


# ------------------------------------------------------------------------------------- super-resolution
class EDSRBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class EDSR(nn.Module):
    """EDSR's topology at toy size (x2): a head conv, residual blocks without BatchNorm and a global skip, then
    the sub-pixel upsampler (a conv to 4x the channels, PixelShuffle(2)) and the RGB tail conv after it."""

    def __init__(self, channels: int = 48, blocks: int = 2, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[EDSRBlock(channels) for _ in range(blocks)],
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.upsample = nn.Sequential(nn.Conv2d(channels, channels * scale ** 2, 3, padding=1),
                                      nn.PixelShuffle(scale))
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        return self.tail(self.upsample(self.body(h) + h))


# --------------------------------------------------------------------------------- Llama-style decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GQAttention(nn.Module):
    """Llama's attention: rotary position embedding (rotate-half) on q and k, and grouped-query heads: each of the
    `kv` k/v heads is expanded to heads // kv query heads ([B, KV, 1, T, D] -> [B, KV, G, T, D] -> [B, H, T, D])."""

    def __init__(self, dim: int, heads: int, kv: int, seq: int):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, dim // heads
        self.q, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.k, self.v = nn.Linear(dim, kv * self.d, bias=False), nn.Linear(dim, kv * self.d, bias=False)
        freqs = torch.outer(torch.arange(seq).float(), 1.0 / 10000 ** (torch.arange(0, self.d, 2).float() / self.d))
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos())
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin())

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, count, self.d).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        cos, sin = self.cos[:t], self.sin[:t]
        q, k, v = self._heads(self.q(x), self.heads), self._heads(self.k(x), self.kv), self._heads(self.v(x), self.kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv
        k, v = (z[:, :, None].expand(b, self.kv, group, t, self.d).reshape(b, self.heads, t, self.d) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv: int, hidden: int, seq: int):
        super().__init__()
        self.n1, self.attn, self.n2 = RMSNorm(dim), GQAttention(dim, heads, kv, seq), RMSNorm(dim)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """A Llama-style decoder on token embeddings [B, T, C] (the lookup stays outside): RMSNorm written out, RoPE,
    grouped-query causal attention (4 query heads on 2 k/v heads), SwiGLU MLPs, a final norm and the LM head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, kv: int = 2, hidden: int = 128,
                 seq: int = 16, vocab: int = 100):
        super().__init__()
        self.blocks = nn.Sequential(*[LlamaBlock(dim, heads, kv, hidden, seq) for _ in range(depth)])
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)))


ARCHS = {
    "resnet18": (resnet18, (2, 3, 32, 32)),
    "resnet50": (resnet50, (2, 3, 32, 32)),
    "mobilenet_v2": (MobileNetV2, (2, 3, 32, 32)),
    "efficientnet_b0": (EfficientNetB0, (2, 3, 32, 32)),
    "shufflenet_v2": (ShuffleNetV2, (2, 3, 32, 32)),
    "convnext_tiny": (ConvNeXtTiny, (2, 3, 32, 32)),
    "vit_b16": (ViT, (2, 3, 32, 32)),
    "vit_torchvision": (functools.partial(ViT, block=TorchvisionBlock), (2, 3, 32, 32)),
    "swin_tiny": (Swin, (2, 3, 32, 32)),
    "yolo": (Yolo, (2, 3, 64, 64)),
    "speech_lstm": (SpeechLSTM, (2, 10, 32)),
    "edsr": (EDSR, (2, 3, 16, 16)),
    "llama": (Llama, (2, 16, 64)),
}


def init_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded default init, plus non-trivial norm statistics and scales so that every op matters."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, RMSNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
        elif isinstance(m, (nn.LayerNorm, LayerNorm2d)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, nn.MultiheadAttention):  # its reset is private (_reset_parameters), left unseeded above;
            nn.init.xavier_uniform_(m.in_proj_weight)  # zero biases: one initializer for every block once exported
            nn.init.normal_(m.in_proj_bias, std=0.1)
            nn.init.normal_(m.out_proj.bias, std=0.1)
    for name, p in module.named_parameters(recurse=True):
        if name.split(".")[-1] in ("gamma", "cls", "pos", "table"):
            nn.init.normal_(p, mean=0.5 if name.endswith("gamma") else 0.0, std=0.2)
    return module.eval()


_EXPORTS: dict[tuple[str, bool], object] = {}


def export_arch(name: str, dynamo: bool):
    """ONNX export of ARCHS[name], cached per session (the dynamo exporter takes seconds per model)."""
    import io

    import onnx

    key = (name, dynamo)
    if key not in _EXPORTS:
        factory, shape = ARCHS[name]
        module = init_weights(factory())
        x = torch.randn(*shape)
        with torch.no_grad():
            outputs = module(x)
        count = len(outputs) if isinstance(outputs, tuple) else 1
        buffer = io.BytesIO()
        torch.onnx.export(module, (x,), buffer, dynamo=dynamo, input_names=["x"],
                          output_names=[f"y{i}" for i in range(count)], opset_version=18 if dynamo else 17)
        _EXPORTS[key] = onnx.load_from_string(buffer.getvalue())
    return _EXPORTS[key]
