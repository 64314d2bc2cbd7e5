"""Auto rounding: at ratio 0.3 the 64-channel inputs of the plain, depthwise and pointwise convs keep 48, not 45
(ONNX Runtime runs a Conv blocked only when its input count is a multiple of 4); pw's outputs, which only a Gemm
reads, keep 34."""

from tests.prune.test_prune_rounding import wide


def build():
    return wide()
