"""Backends: which ops a target runs well, and which rule sets and policies it uses.

A backend answers, for its target: which fusion rules are legal and profitable
(:meth:`Backend.fusion_rules`) and whether a node is supported (:meth:`Backend.supports`).
Quantizer policies and lowering join it in later issues.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from graphopt.errors import UsageError
from graphopt.rewrite import Rule

#: Domains whose ops each target can execute.
_DOMAINS: dict[str, frozenset[str]] = {
    "ort": frozenset({"", "ai.onnx", "com.microsoft", "ai.onnx.ml"}),
    "ext": frozenset({"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "graphopt"}),
    "tensorrt": frozenset({"", "ai.onnx"}),
    "portable": frozenset({"", "ai.onnx"}),
}


@dataclass(frozen=True)
class Backend:
    """A deployment target.

    Attributes:
        name: ``ort``, ``ext``, ``tensorrt`` or ``portable``.
        summary: One line for reports.
    """

    name: str
    summary: str

    def fusion_rules(self, catalog: Sequence[Rule]) -> list[Rule]:
        """The catalog's rules legal for this target, in catalog order."""
        return [r for r in catalog if self.name in r.targets]

    def supports(self, node: ir.Node) -> bool:
        """Whether this target can execute ``node``'s domain."""
        return node.domain in _DOMAINS[self.name]


BACKENDS: dict[str, Backend] = {
    "ort": Backend("ort", "ONNX Runtime CPU: standard ops plus com.microsoft contrib ops"),
    "ext": Backend("ext", "ONNX Runtime with graphopt's runtime_ext custom-op library"),
    "tensorrt": Backend("tensorrt", "TensorRT: standard ONNX ops, explicit quantization"),
    "portable": Backend("portable", "any ONNX runtime: standard ONNX ops only"),
}


def get_backend(name: str) -> Backend:
    """Looks a backend up by name.

    Raises:
        UsageError: Unknown name.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(
            f"unknown target {name!r}; choose one of {', '.join(sorted(BACKENDS))}"
        ) from None
