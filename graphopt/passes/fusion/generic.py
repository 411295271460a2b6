"""Generic fusions: standard ONNX in, standard ONNX out (every target).

Built on onnxscript's common rules: BatchNormalization folded into a preceding Conv,
ConvTranspose or Gemm; MatMul + Add -> Gemm (2-D operands only, where Gemm is legal);
Pad folded into Conv; Transpose/Reshape/Unsqueeze chains collapsed; no-op Cast/Expand/
Transpose removed; Relu/Clip chains merged; HardSigmoid·x -> HardSwish; multiplications
and additions of identity constants removed.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules import common as c

from graphopt.passes.fusion.gemm import matmul_add_to_gemm_rules
from graphopt.rewrite import STANDARD_TARGETS, Rule

#: Applied before every other fusion: they expose the patterns the others match.
PRE_RULES: list[Rule] = [
    Rule(
        "no-op-elimination",
        "x*1, x/1, x+0, x-0 (either order), same-type Cast, no-op Expand/Transpose, "
        "inference Dropout",
        lambda: RewriteRuleSet(
            [c.mul_by_1_rule, c.div_by_1_rule, c.add_0_rule, c.sub_0_rule,
             c.no_op_cast_rule, c.no_op_expand_rule, c.no_op_transpose_rule,
             c.dropout_inference_rule, c.dropout_zero_rule],
            commute=True,
        ),
        STANDARD_TARGETS,
    ),
    Rule(
        "shape-chain-collapse",
        "Transpose∘Transpose, Reshape∘Reshape, Unsqueeze∘Unsqueeze, X->float->half Cast "
        "pairs, Slices that keep a whole axis",
        lambda: [c.transpose_transpose_rule, c.reshape_reshape_rule,
                 c.unsqueeze_unsqueeze_rule, c.cast_cast_rule, c.collapse_slice_rule,
                 c.collapse_slice2_rule],
        STANDARD_TARGETS,
    ),
]

RULES: list[Rule] = [
    Rule(
        "batchnorm-folding",
        "Conv/ConvTranspose/Gemm followed by BatchNormalization -> one op with folded weights",
        lambda: [c.fuse_batchnorm_into_conv_rule, c.fuse_batchnorm_into_conv_transpose_rule,
                 c.fuse_batchnorm_into_gemm_rule],
        STANDARD_TARGETS,
    ),
    Rule(
        "pad-into-conv",
        "constant zero Pad followed by Conv -> Conv with pads",
        lambda: [c.normalize_pad_format_conv_rule, c.fuse_pad_into_conv_rule],
        STANDARD_TARGETS,
    ),
    Rule(
        "matmul-add-to-gemm",
        "2-D MatMul (Transpose -> transA/transB) + Add of a bias that broadcasts -> Gemm",
        matmul_add_to_gemm_rules,
        STANDARD_TARGETS,
    ),
    Rule(
        "relu-clip-chains",
        "Relu∘Relu, Clip∘Clip, Relu∘Clip, Clip∘Relu -> one op",
        lambda: [c.successive_relu_rule, c.successive_clip_rule, c.successive_clip_relu_rule,
                 c.successive_relu_clip_rule],
        STANDARD_TARGETS,
    ),
    Rule(
        "hardswish",
        "x * HardSigmoid(x) (and its decomposed forms) -> HardSwish",
        c.fuse_hardswish_rules,
        STANDARD_TARGETS,
        min_opset=14,
    ),
]
