"""NumPy dtype helpers covering ml_dtypes (bfloat16, float8), which NumPy sees as void."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def is_float_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a real floating type, ml_dtypes' bfloat16/float8 included."""
    if dtype.kind == "f":
        return True
    if dtype.kind != "V" or dtype.names is not None:
        return False
    try:
        ml_dtypes.finfo(dtype)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError):
        return False
    return True


def is_ml_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is an ml_dtypes type (bfloat16, float8, int4 ...), which ONNX
    Runtime's Python binding cannot take or return as a NumPy array."""
    return dtype.kind == "V" and dtype.names is None and dtype.itemsize <= 2
