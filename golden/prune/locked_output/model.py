from golden._quant_blocks import Builder


def build():
    """One Conv whose output is the graph output: its channels are locked, nothing can be removed."""
    b = Builder(12)
    b.node("Relu", [b.conv("x", "conv", 3, 8)], "y")
    return b.model({"x": [1, 3, 8, 8]}, "y", [1, 8, 8, 8])
