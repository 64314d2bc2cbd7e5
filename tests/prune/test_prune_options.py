"""prune options: target-macs, global scope, importance criteria, recovery on a trained digits CNN."""

from __future__ import annotations

import numpy as np
import pytest

from irtool.analysis.cost import model_cost
from irtool.errors import InputError, PassError
from irtool.ir import Model
from irtool.passmanager import PassContext, PassManager
from irtool.pipeline import parse_pipeline
from tests.prune.digits import accuracy, calibration, train_digits_net
from tests.prune.test_prune_masking import masked, net_proto, prune, run


@pytest.fixture(scope="module")
def digits():
    proto, data = train_digits_net()
    return proto, data


def pruned(proto, text: str, calib=None, seed: int = 0):
    model = Model.from_proto(proto)
    ctx = PassContext(seed=seed, calibration_data=calib)
    records = PassManager(parse_pipeline(text).build(), verify_each=True).run(model, ctx)
    return model, records[0]


def mac_reduction(before, after_model) -> float:
    shape = {"x": [1, 1, 8, 8]}
    return 1 - model_cost(after_model, shape).total_macs / model_cost(Model.from_proto(before), shape).total_macs


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_target_macs_lands_within_five_percent(digits, scope, target):
    proto, _ = digits
    model, record = pruned(proto, f"prune{{target-macs={target},scope={scope}}}")
    achieved = mac_reduction(proto, model)
    assert abs(achieved - target) <= 0.05, achieved
    assert abs(record.stats["estimated_mac_reduction"] - achieved) < 0.02  # the estimator is the real cost


def test_global_scope_prunes_layers_unevenly_but_keeps_the_ratio():
    model, removed, records = prune(net_proto(), "prune{ratio=0.5,scope=global}")
    groups = records[0].stats["groups"]
    fractions = {round(1 - g["after"] / g["before"], 2) for g in groups}
    assert len(fractions) > 1  # layers lose different shares
    prunable = 16 + 16 + 8 + 12 + 16 + 32  # every unlocked group of Net
    assert records[0].stats["channels_removed"] == pytest.approx(0.5 * prunable, abs=6)


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn-scale", "random"])
def test_every_criterion_keeps_the_masking_contract(importance):
    original = net_proto()
    model, removed, records = prune(original, f"prune{{ratio=0.4,importance={importance}}}")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(model.to_proto(), x), run(masked(original, removed), x), rtol=1e-4, atol=1e-4)


def test_criteria_rank_differently(digits):
    proto, data = digits
    calib = calibration(data["calib"][0])
    outputs = {k: pruned(proto, f"prune{{ratio=0.5,importance={k}}}", calib)[0].to_proto().SerializeToString()
               for k in ("l2", "fpgm", "activation")}
    assert len(set(outputs.values())) == 3  # three criteria, three different choices of channels


def test_activation_and_recovery_need_calibration_data(digits):
    proto, _ = digits
    for text in ("prune{importance=activation}", "prune{recover=lstsq}", "prune{recover=bias}"):
        with pytest.raises(InputError, match="needs calibration data"):
            pruned(proto, text)


def test_bad_options_are_rejected():
    for text in ("prune{ratio=1.5}", "prune{target-macs=0}", "prune{max-ratio=1}", "prune{round-to=0}"):
        with pytest.raises(Exception) as info:
            parse_pipeline(text)
        assert not isinstance(info.value, PassError)


def test_lstsq_recovery_beats_bias_beats_none_at_30_percent_macs(digits):
    proto, data = digits
    (x_test, y_test), calib = data["test"], calibration(data["calib"][0])
    base = accuracy(proto, x_test, y_test)
    results = {}
    for recover in ("none", "bias", "lstsq"):
        model, record = pruned(proto, f"prune{{target-macs=0.3,recover={recover}}}", calib)
        results[recover] = accuracy(model.to_proto(), x_test, y_test)
    assert base > 0.9
    assert results["lstsq"] >= base - 0.02, (base, results)
    assert results["lstsq"] >= results["none"]
    logits_err = {}
    for recover in ("none", "lstsq"):
        model, _ = pruned(proto, f"prune{{target-macs=0.3,recover={recover}}}", calib)
        logits_err[recover] = float(np.abs(run(model.to_proto(), x_test) - run(proto, x_test)).mean())
    assert logits_err["lstsq"] < logits_err["none"]


def _padded_convs():
    """Conv -> Pad (pads from a Constant node, as torch's legacy exporter writes F.pad) -> Conv -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    pads = helper.make_tensor("p", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Constant", [], ["pads"], name="pads", value=pads),
             helper.make_node("Pad", ["c1", "pads"], ["p1"], name="pad"),
             helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
                               numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_prune_folds_computed_operands_that_would_lock_channels(caplog):
    """The pads come from a Constant node, which the Pad handler cannot read ("non-constant pads"): prune folds
    such constant arithmetic first (torch's legacy exports compute split sizes and reshape targets from Shape),
    without specializing the model to --input-shape."""
    model, record = pruned(_padded_convs(), "prune{ratio=0.5}")
    assert record.stats["channels_removed"] == 4 and record.stats["constants_folded"] == 1
    assert next(n for n in model.graph.nodes if n.name == "conv1").inputs[1].values.shape[0] == 4
    assert [n.op for n in model.graph.nodes] == ["Conv", "Pad", "Conv"]
    model = Model.from_proto(_padded_convs())
    ctx = PassContext(input_shapes={"x": [1, 3, 8, 8]})
    PassManager(parse_pipeline("prune{ratio=0.5}").build(), verify_each=True).run(model, ctx)
    assert model.graph.inputs[0].shape[0] == "N"


def test_prune_that_removes_nothing_says_why(caplog):
    model, record = pruned(_padded_convs(), "prune{ratio=0.5,exclude=['conv1']}")
    assert record.stats["channels_removed"] == 0
    assert ("prune removed no channels: 1 of 2 channel groups are locked ('y' is a graph output); the 1 other "
            "group(s) are excluded or too small for the ratio") in caplog.text
