"""timm's ViT and Swin attention: one packed qkv projection split by a Reshape [2, 16, 3, H, D], a Transpose to
[3, 2, H, 16, D] and a pick of q, k, v on the leading axis; prune removes whole heads from all three at once."""

from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(2, ["attention_fused", "conv"])
