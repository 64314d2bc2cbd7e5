"""Image folders as calibration data, and the preprocessing spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from irtool.calibration.data import CalibrationData, Preprocess
from irtool.errors import InputError
from tests.calibration.models import F32, concat

Image = pytest.importorskip("PIL.Image")

SPEC = "resize=256,crop=224,mean=0.485;0.456;0.406,std=0.229;0.224;0.225,layout=nchw,order=rgb"


def pixels(height: int, width: int, start: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image whose every pixel value is distinct (mod 256) and traceable."""
    return ((np.arange(height * width * 3).reshape(height, width, 3) + start) % 256).astype(np.uint8)


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_the_issue_spec_parses_to_typed_fields():
    spec = Preprocess.parse(SPEC)
    assert spec == Preprocess(resize=(256,), crop=(224, 224), mean=(0.485, 0.456, 0.406),
                              std=(0.229, 0.224, 0.225), scale=None, layout="nchw", order="rgb")
    assert spec.for_input("x", np.dtype(np.float32)).scale == 1 / 255  # the default for a float input
    assert Preprocess.parse("crop=4x6,scale=1,layout=NHWC,order=bgr") == Preprocess(
        crop=(4, 6), scale=1.0, layout="nhwc", order="bgr")


@pytest.mark.parametrize("text, fragment", [
    ("size=3", "key one of resize, crop, mean, std, scale, layout, order"),
    ("layout=chw", "expected one of nchw, nhwc"),
    ("crop=0", "positive sizes"),
    ("mean=1;2", "one value or three"),
    ("resize", "expected key=value"),
])
def test_bad_specs_are_input_errors(text: str, fragment: str):
    with pytest.raises(InputError, match=fragment):
        Preprocess.parse(text)


def test_png_and_bmp_folders_give_exact_normalized_nchw_values(tmp_path: Path):
    images = [pixels(6, 8, start=10 * k) for k in range(3)]
    write(tmp_path / "b.png", images[1])
    write(tmp_path / "a.bmp", images[0])
    write(tmp_path / "sub" / "c.png", images[2])
    (tmp_path / "labels.txt").write_text("ignored")
    spec = "crop=4x6,mean=0.5,std=0.25"
    data = CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 4, 6))], preprocess=spec, batch_size=2)
    got = concat(data)["x"]
    expected = np.stack([(im[1:5, 1:7].astype(np.float32) / 255 - 0.5) / 0.25 for im in images]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)  # x * (1/255) vs x / 255


def test_nhwc_bgr_and_per_channel_mean_std(tmp_path: Path):
    image = pixels(4, 4)
    write(tmp_path / "a.png", image)
    spec = Preprocess(mean=(1.0, 2.0, 3.0), std=(1.0, 2.0, 4.0), scale=1.0, layout="nhwc", order="bgr")
    got = concat(CalibrationData.from_path(tmp_path, [("x", F32, (None, 4, 4, 3))], preprocess=spec))["x"]
    expected = (image[:, :, ::-1].astype(np.float32) - [1, 2, 3]) / np.float32([1, 2, 4])
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_resize_shorter_side_then_center_crop(tmp_path: Path):
    write(tmp_path / "wide.png", np.full((20, 40, 3), 200, np.uint8))  # uniform: resizing keeps the value
    write(tmp_path / "tall.jpg", np.full((30, 10, 3), 100, np.uint8))
    data = CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 8, 8))], preprocess="resize=10,crop=8")
    got = concat(data)["x"]  # sorted: tall.jpg, wide.png
    assert got.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(got[1], 200 / 255, rtol=1e-6)
    assert abs(float(got[0].mean()) - 100 / 255) < 0.02  # jpeg is lossy


def test_gray_images_give_one_channel(tmp_path: Path):
    write(tmp_path / "a.png", pixels(4, 4))
    got = concat(CalibrationData.from_path(tmp_path, [("x", F32, (None, 1, 4, 4))], preprocess="order=gray"))["x"]
    expected = np.asarray(Image.fromarray(pixels(4, 4)).convert("L"), np.float32) / 255
    np.testing.assert_allclose(got[0, 0], expected, rtol=1e-6)


def test_images_are_checked_against_the_model_before_any_pass(tmp_path: Path):
    write(tmp_path / "a.png", pixels(6, 6))
    with pytest.raises(InputError, match=r"input 'x': file a.png after preprocessing has sample shape \(3, 6, 6\)"):
        CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 4, 4))])
    with pytest.raises(InputError, match="crop 8x8 is larger than the image"):
        CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 8, 8))], preprocess="crop=8")
    (tmp_path / "b.png").write_bytes(b"not an image")
    data = CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 6, 6))])
    with pytest.raises(InputError, match="b.png cannot be decoded"):
        list(data())


def test_preprocess_is_for_images_only(tmp_path: Path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(InputError, match="--calib-preprocess applies to images"):
        CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 4, 4))], preprocess="crop=4")


def test_the_preprocess_spec_is_part_of_the_fingerprint(tmp_path: Path):
    write(tmp_path / "a.png", pixels(6, 6))
    inputs = [("x", F32, (None, 3, 4, 4))]
    one, two = (CalibrationData.from_path(tmp_path, inputs, preprocess=f"crop=4,mean={m}") for m in (0, 0.5))
    assert one.fingerprint() != two.fingerprint()


def test_an_integer_image_input_gets_the_pixels_themselves(tmp_path: Path):
    """Edge exports that normalize inside the model take uint8 pixels: resize, crop, order and layout apply,
    the arithmetic does not, and asking for it is an error rather than a silently different input."""
    images = [pixels(6, 8, start=10 * k) for k in range(2)]
    for k, image in enumerate(images):
        write(tmp_path / f"{k}.png", image)
    data = CalibrationData.from_path(tmp_path, [("img", np.dtype(np.uint8), (None, 4, 6, 3))],
                                     preprocess="crop=4x6,order=bgr,layout=nhwc")
    got = concat(data)["img"]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([im[1:5, 1:7, ::-1] for im in images]))
    with pytest.raises(InputError, match="input 'img' takes uint8 pixels, which the model normalizes itself"):
        CalibrationData.from_path(tmp_path, [("img", np.dtype(np.uint8), (None, 3, 4, 6))],
                                  preprocess="crop=4x6,mean=0.5")
    write(tmp_path / "bright" / "a.png", np.full((4, 6, 3), 200, np.uint8))
    with pytest.raises(InputError, match="outside the range of int8"):
        CalibrationData.from_path(tmp_path / "bright", [("img", np.dtype(np.int8), (None, 3, 4, 6))])


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_yolo_gray(tmp_path: Path):
    write(tmp_path / "wide.png", np.full((20, 40, 3), 200, np.uint8))  # uniform: resizing keeps the value
    data = CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 16, 16))], preprocess="letterbox=16")
    got = concat(data)["x"][0]
    rows = got[0, :, 8]  # one column: the 8-row-high image sits in rows 4..11
    np.testing.assert_allclose(rows[4:12], 200 / 255, rtol=1e-6)
    np.testing.assert_allclose(np.r_[rows[:4], rows[12:]], 114 / 255, rtol=1e-6)
    tall = CalibrationData.from_path(tmp_path, [("x", F32, (None, 3, 8, 16))], preprocess="letterbox=8x16,pad=0")
    np.testing.assert_allclose(concat(tall)["x"][0], 200 / 255, rtol=1e-6)  # 20x40 fits 8x16 exactly: no pad
    with pytest.raises(InputError, match="letterbox replaces resize and crop"):
        Preprocess.parse("letterbox=16,crop=8")
    with pytest.raises(InputError, match="pad is a pixel value in 0..255"):
        Preprocess.parse("letterbox=16,pad=300")
