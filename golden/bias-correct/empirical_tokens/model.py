"""A transformer MLP on tokens, x + W2·gelu(W1·x + b1): the bias Add after fc1 takes fc1's correction (its input
means over batch and tokens); fc2 has no bias Add of its own (its output goes into the residual Add), so it gets
one, which writes the `fc2` tensor the residual Add reads."""

from golden._quant_blocks import gelu_mlp


def build():
    return gelu_mlp("torch")
