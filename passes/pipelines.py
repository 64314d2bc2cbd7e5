"""Named pipelines shipped with irtool (entry-point group `irtool.pipelines`)."""

# `cleanup` is exact: every pass in it leaves ONNX Runtime's outputs bit-identical. fold-bn is left
# out on purpose (it re-rounds weights, a bounded change) and is asked for by name: `cleanup,fold-bn`.
# The order makes one run a fixed point (running cleanup twice changes nothing):
#   dce first: a dead reader of a QuantizeLinear output would block its folding;
#   fold-constants next: it turns computed shapes and weights into the constants the others test;
#   dce again: nodes that only fed folded ones (e.g. the input of a folded Shape) are dead now, and a
#     dead reader would keep a Dropout whose mask it reads;
#   eliminate-identity and dedup-initializers leave no dead node behind, so no final dce is needed.
CLEANUP = "dce,fold-constants,dce,eliminate-identity,dedup-initializers"
