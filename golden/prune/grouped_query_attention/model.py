"""Llama's grouped-query attention: 2 k/v heads, each repeated for 2 query heads (Unsqueeze, Expand
[2, 2, 2, 16, D], Reshape [2, 4, 16, D]), with rotate-half RoPE on q and k. prune removes a k/v head together with
the query heads it serves: the Expand's k/v entry and the query reshape shrink alike."""

from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(4, ["conv", "attention_gqa"])
