"""Analyses, their cache, and what a pass says it preserved.

An analysis is a read-only computation over a model (shapes, use-def, calibration
statistics, input Hessians). The :class:`AnalysisManager` caches results; after each pass
it drops every cached result that depends on an aspect the pass did not preserve.
Passes preserve nothing unless they say so.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import onnx_ir as ir

if TYPE_CHECKING:
    from graphopt.infra.context import PassContext

logger = logging.getLogger(__name__)

R = TypeVar("R")


class Aspect(enum.Flag):
    """Aspects of a model that a pass may change and an analysis may depend on."""

    NONE = 0
    STRUCTURE = enum.auto()  #: nodes, edges, graph I/O
    WEIGHTS = enum.auto()  #: initializer / constant values
    SHAPES = enum.auto()  #: value types and shapes
    METADATA = enum.auto()  #: names, doc strings, metadata_props
    ALL = STRUCTURE | WEIGHTS | SHAPES | METADATA


@dataclass(frozen=True)
class PreservedAnalyses:
    """The aspects of the model a pass left unchanged.

    Attributes:
        aspects: The preserved aspects.
    """

    aspects: Aspect = Aspect.NONE

    @classmethod
    def all(cls) -> PreservedAnalyses:
        """Everything preserved (the pass changed nothing)."""
        return cls(Aspect.ALL)

    @classmethod
    def none(cls) -> PreservedAnalyses:
        """Nothing preserved (the default for a pass that modified the model)."""
        return cls(Aspect.NONE)

    @classmethod
    def only(cls, *aspects: Aspect) -> PreservedAnalyses:
        """Exactly the given aspects preserved."""
        flag = Aspect.NONE
        for a in aspects:
            flag |= a
        return cls(flag)

    def preserves(self, aspects: Aspect) -> bool:
        """Whether every aspect in ``aspects`` is preserved."""
        return (self.aspects & aspects) == aspects

    def intersect(self, other: PreservedAnalyses) -> PreservedAnalyses:
        """What both preserved (for a sequence of passes)."""
        return PreservedAnalyses(self.aspects & other.aspects)

    def names(self) -> list[str]:
        """The preserved aspects' names, for reports."""
        return [a.name for a in Aspect if a.name and a in self.aspects and a.name != "ALL"]


class Analysis(Generic[R]):
    """A cached, read-only computation over a model.

    Subclasses set ``name`` and ``depends_on`` and implement :meth:`run`. Instances are
    configured by constructor arguments and must return a stable :meth:`key`.
    """

    name: ClassVar[str] = "analysis"
    depends_on: ClassVar[Aspect] = Aspect.ALL

    def key(self) -> Hashable:
        """Cache key of this configured analysis (class plus its configuration)."""
        return (type(self).__qualname__, tuple(sorted(vars(self).items())))

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> R:
        """Computes the result; may ask ``am`` for other analyses."""
        raise NotImplementedError


@dataclass
class _Entry:
    analysis: Analysis[Any]
    result: Any
    model_id: int


@dataclass
class AnalysisManager:
    """Caches analysis results per model and invalidates them by preserved aspects.

    Attributes:
        hits: Cache hits so far.
        misses: Computations so far.
    """

    ctx: PassContext | None = None
    hits: int = 0
    misses: int = 0
    _cache: dict[Hashable, _Entry] = field(default_factory=dict)

    def get(self, analysis: Analysis[R], model: ir.Model) -> R:
        """Returns the cached result for ``analysis`` on ``model``, computing it if needed."""
        key = analysis.key()
        entry = self._cache.get(key)
        if entry is not None and entry.model_id == id(model):
            self.hits += 1
            return entry.result  # type: ignore[no-any-return]
        from graphopt.infra.context import PassContext

        ctx = self.ctx or PassContext()
        self.misses += 1
        result = analysis.run(model, self, ctx)
        self._cache[key] = _Entry(analysis, result, id(model))
        return result

    def cached(self, analysis: Analysis[R], model: ir.Model) -> R | None:
        """Returns the cached result or None, never computing."""
        entry = self._cache.get(analysis.key())
        if entry is not None and entry.model_id == id(model):
            return entry.result  # type: ignore[no-any-return]
        return None

    def invalidate(self, preserved: PreservedAnalyses) -> list[str]:
        """Drops every result that depends on an aspect not preserved.

        Returns:
            The names of the analyses dropped.
        """
        dropped = []
        for key, entry in list(self._cache.items()):
            if not preserved.preserves(entry.analysis.depends_on):
                dropped.append(entry.analysis.name)
                del self._cache[key]
        if dropped:
            logger.debug("invalidated analyses: %s", ", ".join(dropped))
        return dropped

    def clear(self) -> None:
        """Drops every cached result."""
        self._cache.clear()

    def cached_names(self) -> Iterable[str]:
        """Names of the analyses currently cached."""
        return [e.analysis.name for e in self._cache.values()]
