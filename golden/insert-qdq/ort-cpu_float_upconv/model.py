"""A decoder whose up-convolution (kernel 4, stride 2, pads 1, a Relu after it) is excluded: convtranspose-to-conv
rewrote it as a 3x3 Conv over the phases + DepthToSpace, and insert-qdq leaves it float, so it turns it back into
the ConvTranspose (the phase Conv has 2.25x its MACs) with the Relu after it; the convs around it are quantized."""

from golden._quant_blocks import Builder


def build():
    b = Builder(seed=5)
    x = b.node("Relu", [b.conv("x", "stem", 4, 8)], "stem_act")
    up = b.node("ConvTranspose", [x, b.w("up.w", 8, 8, 4, 4), b.w("up.b", 8)], "up", kernel_shape=[4, 4],
                strides=[2, 2], pads=[1, 1, 1, 1])
    b.conv(b.node("Relu", [up], "up_act"), "head", 8, 2)
    return b.model({"x": ["n", 4, 6, 6]}, "head", ["n", 2, 12, 12])
