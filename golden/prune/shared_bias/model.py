"""Two convs reading one zero bias, as dedup-initializers leaves them, in branches added at the end; the bias is
copied for the first conv before it is sliced (prune once sliced the shared tensor and broke the second conv)."""

from tests.prune.test_prune_masking import twin_convs


def build():
    model = twin_convs()
    graph = model.graph
    next(node for node in graph.node if node.name == "conv_b").input[2] = "ba"
    del graph.output[1]  # twin_convs also outputs conv_b's own bias
    kept = [tensor for tensor in graph.initializer if tensor.name != "bb"]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model.ir_version = 8
    return model
