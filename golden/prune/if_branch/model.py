"""conv0 (8) -> Relu -> conv1 (8) -> Relu -> r1, read by both branches of an If (a 1x1 conv each, named only inside
the branch). conv0's channels feed conv1 alone and half go; r1's stay whole (prune once sliced them)."""

from tests.quant.test_scalar_and_control_flow import branching_convs


def build():
    model = branching_convs()
    model.ir_version = 8
    return model
