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
# min-sqnr=20 (output cosine ~0.995) is checked by bias-correct on the corrected INT8 model it measured, over its
# samples, which costs little beyond its pass (the outputs after its last layer); when that falls short
# (transformers with outlier channels), the most sensitive layers stay in float.
# calibrate observes only what its profile quantizes (ViT-sized encoders: 98 tensors for trt, not 268).
# bias-correct{mode=empirical} sets each layer's bias so that its per-channel output mean in the INT8 model (a copy
# insert-qdq makes inside the pass, run piece by piece over the first 64 calibration samples) equals the float
# model's: it cancels the shift of weight rounding and also what the layers before add (quantization noise
# rectified by ReLUs, activation rounding), which the analytic correction (mode=analytic, the pass's default: weight
# rounding against float input means, one float pass) does not see. Trained digits nets (tests/quant/digits_models.py,
# mean of seeds 0-2, logit SQNR): MobileNet-like 28.79 dB plain INT8, 31.46 analytic, 34.91 empirical (gptq: 34.01).
# The bench's random-weight models: ResNet-50 14.50 -> 14.73 dB, ViT 30.21 -> 30.57, EfficientNet-B0 -4.43 -> 3.55,
# MobileNetV3 2.55 -> 6.74, MobileNetV2 10.63 -> 10.53. It costs about one pass of the INT8 model (3.8 s on that
# ResNet-50 at 64 samples with a float pass of its own, analytic 1.8 s; BENCHMARKS.md): its float pass (the layers'
# float means, the outputs its check compares with) is taken by calibrate, which runs just before over the same data
# (Pass.float_request).
# It makes the mixed-precision decision (min-sqnr=20, as insert-qdq): every layer quantized and corrected, if that
# model reaches it; else insert-qdq's sweep on the uncorrected copy picks the layers to keep float and the others are
# measured again. insert-qdq keeps the layers it chose float, so the corrections fit the model written (measured
# with every layer quantized while insert-qdq then kept two float, the test encoder with outlier channels fell from
# 20.3 to 18.6 dB). Checking the corrected model instead of running insert-qdq's check on the uncorrected one took
# bias-correct on bench/highres_bench.py's U-Net at 512x512 from 53.2 to 41.4 s (same bytes written). Both modes
# correct the bias Add of MatMul layers (nn.Linear on tokens); a MatMul without one gets one. Layers that insert-qdq
# leaves float get their original bias back (or lose the Add bias-correct gave them).
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
# latency 122 -> 125 us). quantize_static stores its tables as u8 too (one scale per table). A tied LM's lookup reads
# the head's integers that insert-qdq made (share-head): the table is stored once, on the head's 7-bit grid (the test
# tied LM: 45136 -> 24668 bytes, logits 39.09 -> 36.91 dB). insert-qdq's min-sqnr check runs before it, on the
# static model. Not in quant-trt: no TensorRT ran this here.
# smooth{min-spread=8}: SmoothQuant where a LayerNorm's output has outlier channels (BERT-class transformers);
# it costs one float pass where LayerNorms feed MatMuls, and changes nothing where there are no outliers.
QUANT = ("fp32,cleanup,fold-constants{keep-shared=false},einsum-to-matmul,fold-scale,fold-bn,convtranspose-to-conv,"
         "smooth{min-spread=8},"
         "calibrate{profile=ort-cpu},"
         "bias-correct{mode=empirical,min-sqnr=20},insert-qdq{min-sqnr=20},quant-dynamic{op-types=[Gather]}")
QUANT_TRT = ("fp32,cleanup,fold-constants{keep-shared=false},einsum-to-matmul,fold-scale,fold-bn,smooth{min-spread=8},"
             "calibrate{method=entropy,profile=trt},"
             "bias-correct{reduce-range=false,mode=empirical,min-sqnr=20},"
             "insert-qdq{profile=trt,min-sqnr=20}")

# The same with gptq before calibrate: each layer's weights rounded to minimize its output error on the calibration
# data (passes/quant/gptq.py), then the empirical bias correction on the rounded model. More accurate where weight
# rounding is much of the INT8 error, as with ort-cpu's 7-bit weights (the digits residual nets: 38.20 dB with the
# analytic correction, gptq alone 39.65), and slower: on the bench's ResNet-50 at 64 samples gptq took 29.7 s
# against the analytic bias-correct's 1.7 s, for +1.03 dB (BENCHMARKS.md). On the MobileNet-like digits net `quant`'s
# empirical correction alone does as well (seed 0: 34.96 against 34.83 dB). Not for TensorRT: with its full-range
# weights quant-trt with gptq instead of bias-correct measured 0.04-0.74 dB below quant-trt on the four digits nets
# tried. gptq runs before calibrate, so the ranges are those of the rounded model.
QUANT_GPTQ = QUANT.replace("calibrate{profile=ort-cpu},", "gptq,calibrate{profile=ort-cpu},")
