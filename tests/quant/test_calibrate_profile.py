"""calibrate{profile=...}: observe only what one Q/DQ profile quantizes, give it the same ranges as a
calibration for every profile, and refuse to feed the other profile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from golden._quant_blocks import residual
from irtool.api import optimize
from irtool.errors import InputError
from irtool.passes.quant.calibrate import METADATA_KEY


def batches():
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]


def ranges(text: str) -> dict:
    return json.loads(optimize(residual(), text, calibration_data=batches).model.metadata[METADATA_KEY])["ranges"]


def test_a_profile_observes_its_own_tensors_with_the_ranges_of_a_full_calibration():
    everything = ranges("calibrate{method=entropy}")
    trt, ort = ranges("calibrate{method=entropy,profile=trt}"), ranges("calibrate{method=entropy,profile=ort-cpu}")
    # trt quantizes conv inputs and the residual's skip branch; ort-cpu also the conv2 output and the Add.
    assert sorted(trt) == ["relu1", "stem_relu", "x"]
    assert set(ort) == set(everything) and len(everything) > len(trt)
    assert trt == {name: everything[name] for name in trt}


@pytest.mark.parametrize("profile", ["trt", "ort-cpu"])
def test_insert_qdq_gives_the_same_model_from_either_calibration(profile):
    def quantized(calibrate: str) -> bytes:
        text = f"{calibrate},insert-qdq{{profile={profile}}}"
        return optimize(residual(), text, calibration_data=batches).model.to_proto().SerializeToString(
            deterministic=True)

    assert quantized(f"calibrate{{profile={profile}}}") == quantized("calibrate")


def test_insert_qdq_refuses_ranges_measured_for_the_other_profile():
    with pytest.raises(InputError, match=r"calibrate\{profile=trt\} measured only .* insert-qdq\{profile=ort-cpu\}"):
        optimize(residual(), "calibrate{profile=trt},insert-qdq", calibration_data=batches)
