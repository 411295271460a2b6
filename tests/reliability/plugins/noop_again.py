"""Test plugin registering ``noop`` again (a duplicate of plugins/noop.py)."""

from __future__ import annotations

from graphopt.infra import PassRegistry

GRAPHOPT_API_VERSION = 1


def register(registry: PassRegistry) -> None:
    """Registers the ``noop`` pass class under its name a second time."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_noop_copy", Path(__file__).with_name("noop.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry.register_pass(module.NoOpPass)
