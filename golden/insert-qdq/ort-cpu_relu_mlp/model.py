"""A ReLU MLP on 4 tokens of width 8, x + W2·relu(W1·x + b1) + b2: each nn.Linear is one Gemm between Reshapes
(its bias in the int32 accumulator), and fc1's Relu sits between its Gemm and the Reshape back, so its Q follows
it and ONNX Runtime folds it into the QGemm's output range."""

from golden._quant_blocks import Builder


def build():
    b = Builder(15)
    hidden = b.node("Add", [b.node("MatMul", ["x", b.w("w1", 8, 16)], "fc1"), b.w("b1", 16)], "fc1_bias")
    act = b.node("Relu", [hidden], "relu")
    out = b.node("Add", [b.node("MatMul", [act, b.w("w2", 16, 8)], "fc2"), b.w("b2", 8)], "fc2_bias")
    b.node("Add", ["x", out], "y")
    return b.model({"x": [1, 4, 8]}, "y", [1, 4, 8])
