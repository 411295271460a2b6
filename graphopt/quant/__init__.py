"""Quantization numerics: numpy in, numpy out; no ONNX graphs here.

* :mod:`~graphopt.quant.dtypes`: integer storage types and code ranges.
* :mod:`~graphopt.quant.spec`: :class:`QuantSpec` and the common specs.
* :mod:`~graphopt.quant.qparams`: scales/zero points, ``quantize``/``dequantize``.
* :mod:`~graphopt.quant.histogram`: the streaming histogram the observers share.
* :mod:`~graphopt.quant.kl`, :mod:`~graphopt.quant.mse`: clip-range searches.
* :mod:`~graphopt.quant.observers`: calibration observers and their registry.
* :mod:`~graphopt.quant.groupwise`: per-group low-bit weight codes (:class:`GroupQuantized`),
  round-to-nearest with MSE clipping, dense packing.
"""

from __future__ import annotations

from graphopt.quant.dtypes import QuantDType, quant_range
from graphopt.quant.groupwise import (
    GroupQuantized,
    group_params,
    pack_codes,
    quantize_rtn,
    quantize_with_params,
    unpack_codes,
)
from graphopt.quant.histogram import Histogram, TailSummary
from graphopt.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from graphopt.quant.qparams import (
    MIN_SCALE,
    ZERO_RANGE_SCALE,
    QParams,
    bias_qparams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    sqnr_db,
)
from graphopt.quant.spec import (
    ACT_S8_ASYM,
    ACT_S8_SYM,
    ACT_S16_SYM,
    ACT_U8_ASYM,
    ACT_U16_ASYM,
    BIAS_S32,
    BIAS_S32_PER_CHANNEL,
    WEIGHT_S8_SYM,
    WEIGHT_S8_SYM_PER_CHANNEL,
    WEIGHT_S8_SYM_PER_CHANNEL_REDUCED,
    WEIGHT_U8_ASYM_PER_CHANNEL,
    QuantSpec,
)

__all__ = [
    "ACT_S8_ASYM",
    "ACT_S8_SYM",
    "ACT_S16_SYM",
    "ACT_U8_ASYM",
    "ACT_U16_ASYM",
    "BIAS_S32",
    "BIAS_S32_PER_CHANNEL",
    "MIN_SCALE",
    "OBSERVERS",
    "WEIGHT_S8_SYM",
    "WEIGHT_S8_SYM_PER_CHANNEL",
    "WEIGHT_S8_SYM_PER_CHANNEL_REDUCED",
    "WEIGHT_U8_ASYM_PER_CHANNEL",
    "ZERO_RANGE_SCALE",
    "EntropyObserver",
    "GroupQuantized",
    "Histogram",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "QuantDType",
    "QuantSpec",
    "TailSummary",
    "bias_qparams",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "group_params",
    "make_observer",
    "pack_codes",
    "quant_range",
    "quantize",
    "quantize_rtn",
    "quantize_with_params",
    "sqnr_db",
    "unpack_codes",
]
