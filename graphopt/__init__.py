"""graphopt: compiler-style graph transformations over ONNX for model compression.

The small public API::

    import graphopt
    loaded = graphopt.load("model.onnx")              # safe, memory-mapped load
    pm = graphopt.default_registry().build("cleanup")  # pipeline text -> PassManager
    pm.execute(loaded.model, graphopt.PassContext())
    graphopt.save(loaded.model, "out.onnx")            # atomic write
    report = graphopt.optimize("model.onnx", "out.onnx")  # the CLI's whole job
"""

from __future__ import annotations

from typing import Any

from graphopt.infra import (
    Pass,
    PassContext,
    PassInfo,
    PassManager,
    PassRegistry,
    PassResult,
    PreservedAnalyses,
    default_registry,
)
from graphopt.io import load, save

__version__ = "0.1.0"

__all__ = [
    "OptimizeConfig",
    "Pass",
    "PassContext",
    "PassInfo",
    "PassManager",
    "PassRegistry",
    "PassResult",
    "PreservedAnalyses",
    "__version__",
    "default_registry",
    "load",
    "optimize",
    "save",
]


def __getattr__(name: str) -> Any:
    # optimize pulls in ONNX Runtime; import it only when used.
    if name in ("optimize", "OptimizeConfig"):
        from graphopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
