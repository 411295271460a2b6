"""Operator fusion: the ``fuse`` pass and its rule catalog."""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry
from graphopt.passes.fusion.fuse_pass import FusePass


def register(registry: PassRegistry) -> None:
    """Registers ``fuse``."""
    registry.register_pass(FusePass)
