"""The ``ext`` target: graphopt's runtime_ext custom-op library for ONNX Runtime.

``runtime_ext/`` (C++17, CMake) builds ``libgraphopt_ext.so`` into ``build/runtime_ext/``;
``make setup`` fetches ONNX Runtime's headers and builds it. This package finds the library
(:func:`library_path`), registers it with a session (:func:`session_options`) and defines
the weight format its ops read (:mod:`graphopt.backends.ext.format`).

Example:
    >>> import onnxruntime as ort
    >>> from graphopt.backends import ext
    >>> session = ort.InferenceSession("model.onnx", ext.session_options())  # doctest: +SKIP
"""

from __future__ import annotations

from graphopt.backends.ext.library import (
    ENV_LIBRARY,
    LIBRARY_NAME,
    default_library_path,
    library_path,
    model_uses_ext,
    session_options,
)

__all__ = [
    "ENV_LIBRARY",
    "LIBRARY_NAME",
    "default_library_path",
    "library_path",
    "model_uses_ext",
    "session_options",
]
