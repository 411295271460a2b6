"""Test plugin declaring an API version graphopt does not support."""

from __future__ import annotations

from graphopt.infra import PassRegistry

GRAPHOPT_API_VERSION = 99


def register(registry: PassRegistry) -> None:
    """Never called: the version check comes first."""
    raise AssertionError("register() of a plugin with an unsupported API version was called")
