"""Images as calibration samples: decode with Pillow (optional: pip install 'irtool[images]') and prepare.

Steps, in order: convert to RGB (or L for order=gray); resize so the shorter side is `resize` (or to
exactly HxW), bilinear; center-crop to `crop`; reverse channels for order=bgr; x * scale (default
1/255); (x - mean) / std per channel, so mean and std are given in the output channel order;
transpose to CHW for layout=nchw. Text form, as `--calib-preprocess`:
resize=256,crop=224,mean=0.485;0.456;0.406,std=0.229;0.224;0.225,scale=1/255,layout=nchw,order=rgb

Detectors (YOLO and its kin) take letterboxed images instead: `letterbox=640` (or HxW) resizes the image to
fit inside the box with its aspect ratio kept, bilinear, and centers it on a canvas of `pad` (default 114,
YOLO's gray), in place of resize and crop.

A model whose image input is an integer tensor (uint8 pixels, normalized inside the model, as edge exports
with the preprocessing baked in take them) gets the pixels themselves: resize, crop, order and layout apply,
the arithmetic does not (`for_input`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from irtool.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a sample. Text form: resize=256,crop=224,mean=0.485;0.456;0.406,..."""

    resize: tuple[int, ...] | None = None  # (shorter side,) or (height, width)
    crop: tuple[int, int] | None = None  # center crop (height, width)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float | None = None  # None: 1/255 for a float input; integer inputs take the pixels unscaled
    layout: str = "nchw"
    order: str = "rgb"
    pixels: bool = False  # set by for_input: uint8 pixel values, no arithmetic
    letterbox: tuple[int, int] | None = None  # (height, width) of the box; replaces resize and crop
    pad: int = 114

    def __post_init__(self):
        if self.letterbox is not None and (self.resize is not None or self.crop is not None):
            raise InputError("--calib-preprocess: letterbox replaces resize and crop; give one or the other")
        if not 0 <= self.pad <= 255:
            raise InputError(f"--calib-preprocess: pad is a pixel value in 0..255, got {self.pad}")

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SPEC_PARSERS:
                raise InputError(f"--calib-preprocess {item!r}: expected key=value with key one of "
                                 f"{', '.join(_SPEC_PARSERS)}")
            try:
                values[key] = _SPEC_PARSERS[key](value.strip().lower())
            except ValueError as e:
                raise InputError(f"--calib-preprocess {item!r}: {e}") from e
        return cls(**values)

    def text(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def for_input(self, name: str, dtype: np.dtype | None) -> Preprocess:
        """This spec for a model input of `dtype`: float inputs get scale 1/255 unless given; integer inputs
        get the pixels, and a scale, mean or std asked for them is an error (the model normalizes itself)."""
        if dtype is None or np.dtype(dtype).kind not in "iu":
            return self if self.scale is not None else replace(self, scale=1 / 255)
        if self.scale not in (None, 1.0) or set(self.mean) != {0.0} or set(self.std) != {1.0}:
            raise InputError(f"input {name!r} takes {np.dtype(dtype)} pixels, which the model normalizes itself: "
                             "drop scale, mean and std from --calib-preprocess")
        return replace(self, scale=1.0, pixels=True)

    def apply(self, image: Any) -> np.ndarray:
        """A PIL image -> sample in the spec's layout (CHW or HWC): float32, or uint8 pixels (`pixels`)."""
        image = image.convert("L" if self.order == "gray" else "RGB")
        if self.letterbox is not None:
            image = _letterbox(image, self.letterbox, self.pad)
        image = _resize(image, self.resize)
        image = _center_crop(image, self.crop)
        kind = np.uint8 if self.pixels else np.float32
        array = np.asarray(image, dtype=kind).reshape(image.size[1], image.size[0], -1)
        if self.order == "bgr":
            array = array[:, :, ::-1]
        if not self.pixels:
            if {len(self.mean), len(self.std)} - {1, array.shape[2]}:
                raise InputError(f"mean/std give {len(self.mean)}/{len(self.std)} values for "
                                 f"{array.shape[2]} channel(s)")
            scale = np.float32(1 / 255 if self.scale is None else self.scale)
            array = (array * scale - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(array.transpose(2, 0, 1) if self.layout == "nchw" else array, kind)


def _dims(value: str, count: tuple[int, ...]) -> tuple[int, ...]:
    dims = tuple(int(v) for v in value.replace("x", ";").split(";"))
    if len(dims) not in count or min(dims) < 1:
        raise ValueError("expected N or HxW with positive sizes")
    return dims


def _floats(value: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in value.split(";"))
    if len(out) not in (1, 3):
        raise ValueError("expected one value or three separated by ';'")
    return out


def _scale(value: str) -> float:
    top, _, bottom = value.partition("/")
    return float(top) / float(bottom or 1)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value
    return parse


_SPEC_PARSERS: dict[str, Callable[[str], Any]] = {
    "resize": lambda v: _dims(v, (1, 2)),
    "crop": lambda v: (lambda d: d * 2 if len(d) == 1 else d)(_dims(v, (1, 2))),
    "mean": _floats, "std": _floats, "scale": _scale,
    "layout": _choice("nchw", "nhwc"), "order": _choice("rgb", "bgr", "gray"),
    "letterbox": lambda v: (lambda d: d * 2 if len(d) == 1 else d)(_dims(v, (1, 2))), "pad": int,
}


def _resize(image: Any, size: tuple[int, ...] | None) -> Any:
    if size is None:
        return image
    width, height = image.size
    if len(size) == 2:
        new = (size[1], size[0])
    else:
        ratio = size[0] / min(width, height)
        new = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return image if new == image.size else image.resize(new, resample=_pil().Image.Resampling.BILINEAR)


def _letterbox(image: Any, box: tuple[int, int], pad: int) -> Any:
    """The image scaled to fit inside box (height, width) with its aspect ratio, centered on a `pad` canvas."""
    height, width = box
    ratio = min(width / image.size[0], height / image.size[1])
    size = (max(1, round(image.size[0] * ratio)), max(1, round(image.size[1] * ratio)))
    if size != image.size:
        image = image.resize(size, resample=_pil().Image.Resampling.BILINEAR)
    canvas = _pil().Image.new(image.mode, (width, height), pad if image.mode == "L" else (pad,) * 3)
    canvas.paste(image, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def _center_crop(image: Any, crop: tuple[int, int] | None) -> Any:
    if crop is None:
        return image
    height, width = crop
    if width > image.size[0] or height > image.size[1]:
        raise InputError(f"crop {height}x{width} is larger than the image ({image.size[1]}x{image.size[0]}); "
                         "resize first")
    left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _pil() -> Any:
    try:
        import PIL.Image
    except ImportError as e:
        raise InputError("image calibration data needs Pillow: pip install 'irtool[images]'") from e
    return PIL


def load_image(path: Path, spec: Preprocess) -> np.ndarray:
    """Decode one image file and prepare it; InputError naming the file when that fails."""
    pil = _pil()
    try:
        with pil.Image.open(path) as image:
            return spec.apply(image)
    except (OSError, pil.UnidentifiedImageError) as e:
        raise InputError(f"calibration image {path} cannot be decoded: {e}") from e
    except InputError as e:
        raise InputError(f"calibration image {path}: {e}") from e
