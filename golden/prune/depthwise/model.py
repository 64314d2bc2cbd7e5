from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(11, ["depthwise", "conv"], "flatten")
