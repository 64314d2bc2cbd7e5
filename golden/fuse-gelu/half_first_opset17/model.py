from golden._quant_blocks import gelu_mlp


def build():
    return gelu_mlp("half-first", opset=17)
