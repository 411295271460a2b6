"""Quantizer policy for ONNX Runtime CPU (target ``ort``, also ``ext`` and ``portable``).

Decisions, and the measurements behind them (MiniLM-L6 dynamo export, 296 calibration
sentences, 300 held-apart evaluation sentences, latency at batch 8 x seq 128 with ORT's
optimizations on; docs/bench/ptq.md has the full table):

* Weights of Conv/Gemm/MatMul that are constants (not graph inputs): s8 symmetric
  ``[-127, 127]`` per output channel (Conv axis 0, MatMul axis 1, Gemm axis 0 or 1 by
  ``transB``), stored pre-quantized.
* ``reduce_range`` (7-bit weight codes) is decided by *measuring* this CPU
  (:func:`u8s8_saturates`): MLAS's u8 x s8 kernel on x86 without VNNI adds pairs of
  products in int16 (``vpmaddubsw``) and saturates with full-range s8 weights; with VNNI
  (or AVX512-VNNI, AMX, ARM) it accumulates in int32. Speed is the same either way (MiniLM
  ratio 0.46 vs 0.46-0.50, within noise), accuracy is not (cosine 0.9938 full range vs
  0.9927 reduced), so full range is used where the kernel is exact and 7-bit weights
  where it would saturate. ``ptq(reduce_range=true)`` makes a model for any x86 CPU.
* Activations: u8 asymmetric per tensor on the inputs of Conv/MatMul/Gemm. ONNX Runtime
  fuses ``DQ -> Conv -> Q`` into QLinearConv, ``DQ -> MatMul`` with a float output into
  MatMulIntegerToFloat (MiniLM: all 36 projections), ``DQ -> Gemm`` into QGemm.
* The constant of the Add after a 2-D MatMul is stored as an int32 bias, so ORT folds
  MatMul + Add into QGemm (an MLP's last layer would otherwise stay a float Gemm on
  dequantized operands). Not on 3-D MatMuls, where ORT fuses the float bias into
  SkipLayerNormalization/BiasGelu (an int32 bias there cost 8% on MiniLM).
* Embedding tables (a constant 2-D float ``Gather`` table of >= 16384 elements, e.g.
  MiniLM's 46.9 MB word embeddings, which ORT's dynamic quantizer keeps in fp32): stored
  as s8 with one scale per column (39 dB), gathered as int8 and dequantized after the
  lookup (no full-table dequantization per run). MiniLM: file 0.65 -> 0.26 of fp32,
  cosine unchanged (0.9939).
* Pass-through ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Slice, Split, MaxPool,
  Identity) and Concat share one scale with their input(s) when every consumer is
  quantized: ``DQ -> op -> Q`` with equal parameters runs on integers (ORT drops the pair).
* Softmax, LayerNormalization, Gelu and the attention-score arithmetic stay in float
  (never compute units); activation x activation MatMuls (Q.K^T, P.V) stay float unless
  ``act_matmul=true``.
* Dynamic mode (``ptq(mode=dynamic)``, :mod:`graphopt.passes.quantize.dynamic`): the same
  projections, weights s8 per output column (7-bit where the probe says the kernel
  saturates), activations u8 per tensor per run, written as ``DynamicQuantizeLinear ->
  MatMulInteger -> Cast -> Mul(x_scale * w_scale)``. Measured on this CPU (one
  [8,128,384] x [384,1536] product): that form and the QDQ form (``DynamicQuantizeLinear
  -> DequantizeLinear -> MatMul`` with a DQ weight) both become ONNX Runtime's
  ``DynamicQuantizeMatMul`` (10.5 vs 9.2 ms, fp32 30.9 ms: same kernel, within noise);
  the integer form is kept because it still runs integer kernels with ORT's graph
  optimizations off. An input read by several projections (Q, K, V) gets one
  ``DynamicQuantizeLinear``: one per projection measured the same on MiniLM (ORT merges
  them; both become 18 ``MatMulIntegerToFloat`` + 18 ``DynamicQuantizeMatMul``).
* Values whose calibrated range is degenerate (attention-mask fills of -3.4e38, entries
  ``1e4`` x above the bulk) are never quantized; their units stay float (generic rule,
  :func:`graphopt.passes.quantize.plan.finalize_plan`).
"""

from __future__ import annotations

import functools
import logging
from typing import ClassVar

import numpy as np

from graphopt.passes.quantize.quantizer import Quantizer
from graphopt.quant.spec import ACT_U8_ASYM, QuantSpec

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer GEMM saturates on this CPU.

    Runs one ``MatMulInteger`` of 255 x 127 products (every adjacent pair sums to 64770,
    beyond int16) and compares with the exact result. Cached per process; on any failure
    assumes the worst (True).
    """
    try:
        import onnx
        import onnx.helper as oh
        import onnxruntime as ort

        k, n, m = 64, 16, 4
        a = np.full((m, k), 255, np.uint8)
        b = np.full((k, n), 127, np.int8)
        graph = oh.make_graph(
            [oh.make_node("MatMulInteger", ["A", "B"], ["Y"])],
            "probe",
            [oh.make_tensor_value_info("A", onnx.TensorProto.UINT8, [m, k])],
            [oh.make_tensor_value_info("Y", onnx.TensorProto.INT32, [m, n])],
            [onnx.numpy_helper.from_array(b, "B")],
        )
        proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
        proto.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        (y,) = session.run(None, {"A": a})
        exact = 255 * 127 * k
        saturates = bool(np.any(np.asarray(y) != exact))
    except Exception as e:  # noqa: BLE001 - a probe; the safe answer on failure
        logger.debug("u8 x s8 saturation probe failed: %s", e)
        return True
    logger.info(
        "ONNX Runtime's u8 x s8 kernel %s on this CPU",
        "saturates (int16 pairs): 7-bit weights" if saturates else "is exact: 8-bit weights",
    )
    return saturates


class OrtQuantizer(Quantizer):
    """ONNX Runtime CPU policy: u8 asymmetric activations, s8 symmetric weights."""

    name: ClassVar[str] = "ort"
    activation_spec: ClassVar[QuantSpec] = ACT_U8_ASYM
    reduce_range: ClassVar[bool] = True
    compute_ops: ClassVar[frozenset[str]] = frozenset({"Conv", "MatMul", "Gemm"})
    residual_adds: ClassVar[bool] = False
    matmul_add_bias: ClassVar[bool] = True
    embedding_gathers: ClassVar[bool] = True

    def default_reduce_range(self) -> bool:
        """7-bit weights exactly where this CPU's u8 x s8 kernel would saturate."""
        return u8s8_saturates()


__all__ = ["OrtQuantizer", "u8s8_saturates"]
