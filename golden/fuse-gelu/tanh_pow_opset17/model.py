from golden._quant_blocks import gelu_mlp


def build():
    return gelu_mlp("tanh-pow", opset=17)
