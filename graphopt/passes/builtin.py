"""Registers graphopt's built-in passes and pipelines.

This is the target of the ``builtin`` entry point in the ``graphopt.plugins`` group: the
built-ins go through exactly the path third-party plugins use.
"""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry

GRAPHOPT_API_VERSION = 1


def register(registry: PassRegistry) -> None:
    """Registers every built-in pass and named pipeline."""
    from graphopt.passes import cleanup, fusion, pruning, quantize, weight_only

    cleanup.register(registry)
    fusion.register(registry)
    quantize.register(registry)
    pruning.register(registry)
    weight_only.register(registry)
    registry.register_pipeline(
        "default",
        "cleanup,fuse",
        "what `graphopt optimize` runs without --passes: exact cleanup, then the target's "
        "fusions",
    )
