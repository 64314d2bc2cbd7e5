"""calibrate takes bias-correct{mode=empirical}'s float pass (irtool/calibration/reference.py): the layer means and
the float outputs of the min-sqnr check come from calibrate's pass over the same samples, and bias-correct runs the
float model only where those cannot serve it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from golden._quant_blocks import depthwise_chain, gelu_mlp, wide_chain
from irtool.api import optimize
from irtool.calibration.reference import Recorded, fingerprints
from irtool.calibration.tap import _Reduced, channel_sums, sample_channel_sums
from tests.quant.test_bias_empirical import _worst_output_sqnr

CHECKED = "bias-correct{mode=empirical,samples=%d,min-sqnr=10},insert-qdq{min-sqnr=10}"


def _biases(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each layer's bias as the model computes it: its int32 integers times their scale, or its float values."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    made = {n.output[0]: n for n in proto.graph.node}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        bias = node.input[2]
        dq = made.get(bias)
        found[node.name] = values[bias] if dq is None else values[dq.input[0]] * values[dq.input[1]]
    return found


@pytest.mark.parametrize("mode", ["empirical", "analytic"])
def test_calibrate_takes_the_float_pass_and_the_corrections_equal_bias_corrects_own(mode):
    """calibrate, then bias-correct (empirical: with the min-sqnr check), in one pipeline: calibrate records the
    three layers' output means per sample and the outputs (empirical) or their input sums over every sample
    (analytic), and bias-correct runs no float pass. Run apart (calibrate in its own optimize call, so nothing is
    recorded), bias-correct runs one, and the corrected biases (and the checked SQNR) are the same."""
    proto = depthwise_chain()
    x = np.random.default_rng(21).standard_normal((32, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    passes = CHECKED % 16 if mode == "empirical" else "bias-correct,insert-qdq"
    together = optimize(proto, "calibrate," + passes, calibration_data=data)
    assert together.stats("calibrate")["recorded"] == 3
    assert together.stats("bias-correct")["float_passes"] == 0
    calibrated = optimize(proto, "calibrate", calibration_data=data)
    assert "recorded" not in calibrated.stats("calibrate")
    apart = optimize(calibrated.model.to_proto(), passes, calibration_data=data)
    assert apart.stats("bias-correct")["float_passes"] == 1
    if mode == "empirical":
        assert together.stats("bias-correct")["output_sqnr"] == apart.stats("bias-correct")["output_sqnr"]
        assert together.stats("bias-correct")["samples_checked"] == 16
        written = _worst_output_sqnr(proto, together.model.to_proto(), x[:16])
        assert abs(together.stats("bias-correct")["output_sqnr"] - written) < 0.01
    ours, theirs = _biases(together.model.to_proto()), _biases(apart.model.to_proto())
    assert sorted(ours) == sorted(theirs) == ["dw", "expand", "y"]
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(ours[name], _biases(calibrated.model.to_proto())[name]) for name in ours)


def test_other_samples_on_the_second_read_make_bias_correct_run_its_own_float_pass():
    """A source that gives other samples each time it is read: calibrate's record is of samples bias-correct does
    not see (their fingerprints differ), so bias-correct takes its float means from its own pass, over the samples
    it measures. Its corrections then equal those of a run where calibrate recorded nothing and bias-correct read
    the same samples."""
    proto = depthwise_chain()
    reads = []

    def changing():
        reads.append(np.random.default_rng(len(reads)).standard_normal((16, 1, 3, 8, 8)).astype(np.float32))
        return iter({"x": s} for s in reads[-1])

    result = optimize(proto, "calibrate," + CHECKED % 16, calibration_data=changing)
    assert result.stats("calibrate")["recorded"] == 3
    assert result.stats("bias-correct")["float_passes"] == 1
    calibrated = optimize(proto, "calibrate", calibration_data=lambda: iter({"x": s} for s in reads[-2]))
    apart = optimize(calibrated.model.to_proto(), CHECKED % 16,
                     calibration_data=lambda: iter({"x": s} for s in reads[-1]))
    analytic = optimize(proto, "calibrate,bias-correct", calibration_data=changing)
    assert analytic.stats("bias-correct")["float_passes"] == 1
    ours, theirs = _biases(result.model.to_proto()), _biases(apart.model.to_proto())
    assert sorted(ours) == sorted(theirs) == ["dw", "expand", "y"]
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


def test_more_samples_than_calibrate_recorded_or_a_cached_calibration_mean_a_float_pass(tmp_path):
    """calibrate records the samples bias-correct asks for; statistics read from the calibration cache come with
    no pass over the data, so nothing is recorded and bias-correct runs its own."""
    proto = depthwise_chain()
    x = np.random.default_rng(23).standard_normal((24, 1, 3, 8, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    first = optimize(proto, "calibrate," + CHECKED % 8, calibration_data=data, calib_cache=tmp_path)
    assert first.stats("bias-correct")["float_passes"] == 0 and first.stats("bias-correct")["samples"] == 8
    again = optimize(proto, "calibrate," + CHECKED % 8, calibration_data=data, calib_cache=tmp_path)
    assert "recorded" not in again.stats("calibrate")
    assert again.stats("bias-correct")["float_passes"] == 1
    assert again.stats("bias-correct")["output_sqnr"] == first.stats("bias-correct")["output_sqnr"]


def test_weights_rounded_before_calibrate_take_the_means_from_calibrate_and_the_outputs_from_a_float_copy():
    """gptq rounds the weights before calibrate: the float means are of the model as it is (calibrate's), but the
    check compares with the float model's outputs, which only a copy with the weights restored gives."""
    proto = wide_chain()
    x = np.random.default_rng(24).standard_normal((16, 1, 3, 32, 32)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    result = optimize(proto, "gptq,calibrate," + CHECKED % 16, calibration_data=data)
    assert result.stats("calibrate")["recorded"] == 3
    assert result.stats("bias-correct")["float_passes"] == 1  # the outputs alone
    written = _worst_output_sqnr(proto, result.model.to_proto(), x)
    assert abs(result.stats("bias-correct")["output_sqnr"] - written) < 0.01


def test_token_layers_are_recorded_per_sample():
    """gelu_mlp's MatMul layers on [1, 4, 8] tokens are recorded per sample (sums over the tokens), and the check
    compares the outputs of every sample measured."""
    proto = gelu_mlp()
    x = np.random.default_rng(25).standard_normal((64, 1, 4, 8)).astype(np.float32)
    data = lambda: iter({"x": s} for s in x)  # noqa: E731
    result = optimize(proto, "calibrate," + CHECKED % 64, calibration_data=data)
    assert result.stats("calibrate")["recorded"] == 2 and result.stats("bias-correct")["float_passes"] == 0
    assert result.stats("bias-correct")["samples_checked"] == result.stats("bias-correct")["samples_last"] == 64
    written = _worst_output_sqnr(proto, result.model.to_proto(), x)
    assert abs(result.stats("bias-correct")["output_sqnr"] - written) < 0.01


def test_per_sample_sums_add_up_to_the_batch_sums():
    """sample_channel_sums over a batch sums to channel_sums of it, for each way a value comes out of the graph:
    pooled per sample ([N, C, 1, 1] means), summed over tokens ([N, C] with the shape), and whole."""
    rng = np.random.default_rng(26)
    image, tokens, rows = rng.standard_normal((5, 3, 4, 4)), rng.standard_normal((5, 6, 7)), 5
    values = {"pooled": image.mean(axis=(2, 3), keepdims=True), "sums": tokens.sum(axis=1),
              "shape": np.array(tokens.shape), "whole": tokens}
    cases = [("a", 1, _Reduced(mean="pooled")), ("b", -1, _Reduced(sums="sums", shape="shape")), ("whole", -1, None),
             ("whole", 1, None)]
    for name, axis, reduced in cases:
        per_sample, count = sample_channel_sums(values, name, axis, reduced, rows)
        total, total_count = channel_sums(values, name, axis, reduced)
        assert len(per_sample) == rows and count * rows == total_count
        np.testing.assert_allclose(per_sample.sum(axis=0), total, rtol=1e-12)
    assert sample_channel_sums(values, "whole", 0, None, rows) is None  # the batch axis is no channel axis
    assert sample_channel_sums({"v": tokens.reshape(30, 7)}, "v", -1, None, rows) is None  # tokens, not samples


def test_a_record_serves_only_its_own_samples_and_cuts_its_outputs_into_the_batches_asked():
    x = np.arange(2 * 6 * 3, dtype=np.float32).reshape(6, 2, 3)
    recorded = Recorded({"v": [(np.ones(2), 1)] * 6}, fingerprints({"x": x}), {"y": np.arange(5.0)})
    assert recorded.serves(["v"], [{"x": x[:4]}, {"x": x[4:]}])
    assert not recorded.serves(["v", "w"], [{"x": x}])  # w was not recorded
    assert not recorded.serves(["v"], [{"x": x[1:]}])  # other samples
    assert not recorded.serves(["v"], [{"x": np.concatenate([x, x[:1]])}])  # more samples than recorded
    totals = Recorded({}, fingerprints({"x": x}), None, {"v": (np.ones(2), 6)})
    assert totals.serves(["v"], [{"x": x[:4]}, {"x": x[4:]}], every=True)
    assert not totals.serves(["v"], [{"x": x[:4]}], every=True)  # the means are over all six samples
    assert not totals.serves(["v"], [{"x": x}])  # no per-sample sums
    cut = recorded.output_batches([2, 2, 2])
    assert [list(c["y"]) for c in cut] == [[0.0, 1.0], [2.0, 3.0]]  # the third batch is not all kept
