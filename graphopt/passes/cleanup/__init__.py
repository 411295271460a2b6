"""Cleanup passes: exact, semantics-preserving simplifications run before anything else.

* ``fold-constants``: constant subexpressions become initializers (exact ops only).
* ``remove-identity``: Identity, inference Dropout, same-type Cast, no-op Reshape and
  Transpose are bypassed.
* ``simplify-shapes``: Shape/Size of static dims become constants; Reshape/Expand targets
  built from shapes become constants.
* ``eliminate-common-subexpressions``: identical nodes and small initializers are merged.
* ``eliminate-dead-code``: unused nodes and initializers are removed.

The ``cleanup`` pipeline runs all five to a fixed point. Every pass is in place,
idempotent, deterministic, keeps graph input/output names, order, dtypes and dim_params,
leaves custom-domain nodes and model-local functions alone, and is bit-exact (tolerance
``exact``) unless ``fold-constants`` is given ``fold_float_math=true``.
"""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry
from graphopt.passes.cleanup.cse import EliminateCommonSubexpressionsPass
from graphopt.passes.cleanup.dead_code import EliminateDeadCodePass
from graphopt.passes.cleanup.fold_constants import FoldConstantsPass
from graphopt.passes.cleanup.identity import RemoveIdentityPass
from graphopt.passes.cleanup.shapes import SimplifyShapesPass

__all__ = [
    "CLEANUP_PIPELINE",
    "EliminateCommonSubexpressionsPass",
    "EliminateDeadCodePass",
    "FoldConstantsPass",
    "RemoveIdentityPass",
    "SimplifyShapesPass",
    "register",
]

#: What the ``cleanup`` pipeline expands to.
CLEANUP_PIPELINE = (
    "fixpoint(fold-constants,remove-identity,simplify-shapes,"
    "eliminate-common-subexpressions,eliminate-dead-code)"
)


def register(registry: PassRegistry) -> None:
    """Registers the cleanup passes and the ``cleanup`` pipeline."""
    for cls in (
        FoldConstantsPass,
        RemoveIdentityPass,
        SimplifyShapesPass,
        EliminateCommonSubexpressionsPass,
        EliminateDeadCodePass,
    ):
        registry.register_pass(cls)
    registry.register_pipeline(
        "cleanup",
        CLEANUP_PIPELINE,
        "exact cleanups (folding, identities, shapes, CSE, DCE) to a fixed point",
    )
