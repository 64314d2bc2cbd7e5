"""nn.MultiheadAttention's exported layout: heads folded into the batch ([16, 2·H, D]) and unfolded again
([2, H, 16, D]) before the scores; prune removes whole heads through both reshapes. Here B == H == 2: unfolding
on the batch digit would merge the heads."""

from tests.prune.graphgen import random_cnn


def build():
    return random_cnn(2, ["attention_seq_first", "conv"])
