"""Cleanup passes (placeholder until the cleanup modules land)."""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry


def register(registry: PassRegistry) -> None:
    """Registers the cleanup passes and the ``cleanup`` pipeline."""
