"""Test plugin registering a name the built-ins already use (the ``default`` pipeline)."""

from __future__ import annotations

from graphopt.infra import PassRegistry

GRAPHOPT_API_VERSION = 1


def register(registry: PassRegistry) -> None:
    """Registers a pipeline named ``default`` (a duplicate)."""
    registry.register_pipeline("default", "noop", "a duplicate of the built-in name")
