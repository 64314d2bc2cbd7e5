from golden._quant_blocks import gelu_mlp


def build():
    return gelu_mlp("torch", opset=17)
