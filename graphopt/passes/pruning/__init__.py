"""Pruning passes.

* :mod:`~graphopt.passes.pruning.prune_pass`: ``prune`` (attention heads, FFN neurons and,
  through :mod:`~graphopt.passes.pruning.channels`, conv channels), with optional
  least-squares reconstruction of the following projection.
* :mod:`~graphopt.passes.pruning.sparsify`: ``sparsify`` (unstructured and 2:4 weight
  sparsity masks).
"""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry


def register(registry: PassRegistry) -> None:
    """Registers the pruning passes."""
    from graphopt.passes.pruning.prune_pass import PrunePass
    from graphopt.passes.pruning.sparsify import SparsifyPass

    registry.register_pass(PrunePass)
    registry.register_pass(SparsifyPass)
