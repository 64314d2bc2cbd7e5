"""Multi-query attention: one k/v head repeated for 2 query heads (Expand [2, 1, 2, 16, D]). The copies are
channels of their own: prune removes a query head alone, shrinks the Expand's repeat entry, and keeps k and v."""

from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(0, ["conv", "attention_gqa"])
