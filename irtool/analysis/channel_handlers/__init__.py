"""Per-op channel handlers (one per op type, Torch-Pruning's per-layer pruners as a registry).

A handler answers two questions for its op:
  propagate(node, b): which axis of each output carries channels, and how they tie to the inputs'
                      (see irtool.analysis.channels);
  apply(node, view):  after pruning, slice the node's weights/attributes; view.keep(tensor) gives
                      the surviving channel indices of a tensor, or None when it lost none.
Adding an op is adding a handler in one of this package's modules, not editing an if-chain.

Couplings beyond "channel i is channel i" (each stated in its handler's docstring):
  * depthwise Conv ties input g to outputs g·m .. g·m+m-1 (whole groups go, `group` shrinks); grouped
    Conv ties position p of every group together on its input and output (`group` stays);
  * GroupNormalization makes each group of C/G channels one atom (its statistics stay intact);
  * Reshape ties channel digits to one output axis (flatten, channel shuffle, attention heads);
  * MatMul of two activations keeps channels only on a shared batch axis (attention heads).
Every propagate is wrapped so that a node which reads channels but leaves an output without a channel
space locks its inputs: the analysis never loses track of channels that would then change shape silently.
"""

from irtool.analysis.channel_handlers import layout, pointwise, weighted  # noqa: F401  (they register)
from irtool.analysis.channel_handlers.base import HANDLERS, Handler, handles

__all__ = ["HANDLERS", "Handler", "handles"]
