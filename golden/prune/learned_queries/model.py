"""Learned queries attend to the positions (DETR's decoder at a static batch, where the queries' side folds to
constants): the score MatMul reads a constant [1, H, 4, D], which prune slices to the kept heads."""

from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(3, ["attention_queries", "conv"])
