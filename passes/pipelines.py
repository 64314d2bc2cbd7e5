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

# INT8 for ONNX Runtime CPU (u8 activations x s8 per-channel weights) and for TensorRT (s8 symmetric,
# entropy calibration as TensorRT's own calibrator does). Both need calibration data.
# min-sqnr=20 (output cosine ~0.995) costs one extra evaluation when plain INT8 is good enough (CNNs);
# when it is not (transformers with outlier channels), the most sensitive layers stay in float.
# calibrate observes only what its profile quantizes (ViT-sized encoders: 98 tensors for trt, not 268).
# bias-correct (one more float pass over the data, with each profile's weight format) cancels the mean output
# shift of weight rounding; measured on the test suite's trained digits nets: +1.2 dB (plain CNN), +2.3
# (residual), +4.0 and +4.6 dB (MobileNet-like, depthwise), on the bench's random-weight ResNet-50 and
# MobileNetV2 +0.16 dB; it also corrects the bias Add of MatMul layers (nn.Linear on tokens): `quant` on the
# bench's ViT 29.44 dB without bias-correct, 29.53 with its patch conv and head corrected, 29.75 with its 72
# linear layers too (the test suite's encoder 33.81 -> 34.02), for no more time (their means are summed over
# the tokens in the graph); a MatMul without a bias Add gets one. Layers that insert-qdq leaves float get their
# original bias back (or lose the Add bias-correct gave them).
# einsum-to-matmul first: ONNX Runtime and TensorRT run Einsum in float only (an einsum attention stayed float).
# fold-scale: attention's 1/sqrt(d) goes into the q projection, one op less on the scores (and nothing to observe).
# fp32 first: INT8 placement takes float32 only (a float16 model came out unquantized); exact, and a no-op on
# float32 models; the Casts to float16 it turns into no-ops are removed by cleanup.
# convtranspose-to-conv (ort-cpu only): ONNX Runtime has no integer ConvTranspose; as Conv + DepthToSpace a
# decoder's up-convolution runs as a QLinearConv (0.56-0.85x the INT8 latency on the test decoders). TensorRT
# has INT8 deconvolutions, so quant-trt keeps them. insert-qdq turns those it leaves float back into ConvTransposes.
# fold-constants{keep-shared=false} after cleanup: a tied LM head's Transpose of the embedding table, which cleanup
# keeps to store the table once, is folded, so the head is a layer with a constant weight that the passes below
# quantize (its copy of the table is then stored as int8).
# quant-dynamic{op-types=[Gather]} last (ort-cpu only): embedding tables become int8 with one scale per row, the
# rows dequantized after the lookup; static Q/DQ leaves a table float, and it is the largest part of a small language
# model (the test suite's MiniLM-shaped encoder: 453 -> 261 KB, mean embedding cosine 0.99995 either way, batch-1
# latency 122 -> 125 us). quantize_static stores its tables as u8 too (one scale per table). insert-qdq's min-sqnr
# check runs before it, on the static model. Not in quant-trt: no TensorRT ran this here.
# smooth{min-spread=8}: SmoothQuant where a LayerNorm's output has outlier channels (BERT-class transformers);
# it costs one float pass where LayerNorms feed MatMuls, and changes nothing where there are no outliers.
QUANT = ("fp32,cleanup,fold-constants{keep-shared=false},einsum-to-matmul,fold-scale,fold-bn,convtranspose-to-conv,"
         "smooth{min-spread=8},"
         "calibrate{profile=ort-cpu},"
         "bias-correct,insert-qdq{min-sqnr=20},quant-dynamic{op-types=[Gather]}")
QUANT_TRT = ("fp32,cleanup,fold-constants{keep-shared=false},einsum-to-matmul,fold-scale,fold-bn,smooth{min-spread=8},"
             "calibrate{method=entropy,profile=trt},"
             "bias-correct{reduce-range=false},"
             "insert-qdq{profile=trt,min-sqnr=20}")

# The same with gptq instead of bias-correct: each layer's weights rounded to minimize its output error on the
# calibration data (passes/quant/gptq.py). More accurate where weight rounding is much of the INT8 error, as with
# ort-cpu's 7-bit weights (the digits MobileNet-like nets: 31.46 -> 34.01 dB, residual 38.20 -> 39.65), and
# slower: on the bench's ResNet-50 at 64 samples the pass took 29.7 s against bias-correct's 1.7 s, for +1.03 dB
# (BENCHMARKS.md). Not for TensorRT: with its full-range weights quant-trt with gptq instead of bias-correct measured
# 0.04-0.74 dB below quant-trt on the four digits nets tried. gptq runs before calibrate, so the ranges are those of
# the rounded model.
QUANT_GPTQ = QUANT.replace("calibrate{profile=ort-cpu},bias-correct,", "gptq,calibrate{profile=ort-cpu},")
