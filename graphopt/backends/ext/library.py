"""Locating and registering the runtime_ext shared library."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from graphopt.backends.ext.format import DOMAIN
from graphopt.errors import UsageError

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

logger = logging.getLogger(__name__)

#: Environment variable naming the library to use instead of the built one.
ENV_LIBRARY = "GRAPHOPT_EXT_LIBRARY"
#: File name CMake gives the library.
LIBRARY_NAME = "libgraphopt_ext.so"

_REPO_ROOT = Path(__file__).resolve().parents[3]


def default_library_path() -> Path:
    """Where ``make setup`` builds the library: ``build/runtime_ext/libgraphopt_ext.so``."""
    return _REPO_ROOT / "build" / "runtime_ext" / LIBRARY_NAME


def library_path() -> Path:
    """The runtime_ext library to load.

    ``$GRAPHOPT_EXT_LIBRARY`` when set, otherwise the library ``make setup`` built.

    Raises:
        UsageError: The library does not exist (says how to build it).
    """
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override)
        if not path.is_file():
            raise UsageError(f"{ENV_LIBRARY}={override}: no such runtime_ext library file")
        return path
    path = default_library_path()
    if not path.is_file():
        raise UsageError(
            f"runtime_ext library not built: {path} is missing; run `make setup` "
            f"(or `make runtime-ext`) in {_REPO_ROOT}, or set {ENV_LIBRARY}"
        )
    return path


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Session options with the runtime_ext library registered.

    Args:
        options: Options to add the library to (a fresh ``SessionOptions`` when None).

    Raises:
        UsageError: The library is not built.
    """
    import onnxruntime as ort

    options = ort.SessionOptions() if options is None else options
    path = library_path()
    logger.debug("registering runtime_ext library %s", path)
    options.register_custom_ops_library(str(path))
    return options


def model_uses_ext(model: onnx.ModelProto) -> bool:
    """Whether any node of ``model`` (functions and subgraphs included) is in the ext domain."""

    def graph_uses(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if node.domain == DOMAIN:
                return True
            for attr in node.attribute:
                if attr.HasField("g") and graph_uses(attr.g):
                    return True
                if any(graph_uses(g) for g in attr.graphs):
                    return True
        return False

    if graph_uses(model.graph):
        return True
    return any(node.domain == DOMAIN for f in model.functions for node in f.node)
