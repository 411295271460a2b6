"""The graphopt pass contract, built on onnx-ir's pass base.

A graphopt :class:`Pass` is an ``onnx_ir.passes.InPlacePass``: it drops into onnx-ir's own
``Sequential``/``PassManager`` unchanged (it then runs with a default
:class:`~graphopt.infra.context.PassContext`). Inside a graphopt
:class:`~graphopt.infra.manager.PassManager` it also receives the context and the analysis
manager, and reports what it preserved and its statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import NoOptions, Options

O = TypeVar("O", bound=Options)


@dataclass(frozen=True)
class PassInfo:
    """Static description of a pass.

    Attributes:
        name: Kebab-case registry and pipeline name (``insert-qdq``).
        summary: One line for ``graphopt passes``.
        tolerance: The verification tolerance class this pass needs: ``exact``,
            ``fusion``, ``fp16`` or ``quantized`` (see :mod:`graphopt.verify`).
    """

    name: str
    summary: str
    tolerance: str = "exact"


@dataclass
class PassResult(ir.passes.PassResult):
    """What a pass returns.

    Attributes:
        model: The transformed model (the same object: graphopt passes are in place).
        modified: Whether anything changed.
        preserved: The aspects left unchanged; ``all`` when ``modified`` is False.
        stats: Counters for reports (``{"nodes_removed": 12}``).
    """

    preserved: PreservedAnalyses = field(default_factory=PreservedAnalyses.none)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modified:
            self.preserved = PreservedAnalyses.all()


class Pass(ir.passes.InPlacePass, Generic[O]):
    """Base class of graphopt passes.

    Subclasses set ``info`` and ``Options`` and implement :meth:`run`. Optionally they
    override :meth:`check_requires` / :meth:`check_ensures`, which raise to reject a model.

    Args:
        options: Parsed options; defaults when omitted.
        ctx: The context for runs outside a graphopt pass manager.
    """

    info: ClassVar[PassInfo] = PassInfo(name="pass", summary="")
    Options: ClassVar[type[Options]] = NoOptions

    def __init__(self, options: O | None = None, ctx: PassContext | None = None) -> None:
        super().__init__()
        self.options: O = options if options is not None else self.Options()  # type: ignore[assignment]
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.info.name}: options must be {self.Options.__name__}")
        self.ctx = ctx
        self._am: AnalysisManager | None = None

    # -- graphopt API ------------------------------------------------------------------
    @classmethod
    def from_options(cls, values: dict[str, Any]) -> Pass[Any]:
        """Builds the pass from raw ``k=v`` values."""
        return cls(cls.Options.parse(values, owner=cls.info.name))  # type: ignore[arg-type]

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Transforms ``model`` in place and says what changed."""
        raise NotImplementedError

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        """Raises when the pass cannot run on ``model``."""

    def check_ensures(self, model: ir.Model, ctx: PassContext) -> None:
        """Raises when the produced model breaks the pass's guarantees."""

    def to_text(self) -> str:
        """This pass as pipeline text: ``name`` or ``name(k=v,...)``."""
        inner = self.options.to_text()
        return f"{self.info.name}({inner})" if inner else self.info.name

    def run_with(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Runs requires -> run -> ensures with an explicit context (used by PassManager)."""
        self.check_requires(model, ctx)
        result = self.run(model, ctx, am)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{self.info.name}' returned {type(result).__name__}")
        if result.model is not model:
            raise TypeError(f"pass '{self.info.name}' is in place but returned another model")
        self.check_ensures(model, ctx)
        return result

    # -- onnx-ir API -------------------------------------------------------------------
    def requires(self, model: ir.Model) -> None:
        self.check_requires(model, self.ctx or PassContext())

    def ensures(self, model: ir.Model) -> None:
        self.check_ensures(model, self.ctx or PassContext())

    def call(self, model: ir.Model) -> PassResult:
        ctx = self.ctx or PassContext()
        if self._am is None:
            self._am = AnalysisManager(ctx)
        return self.run(model, ctx, self._am)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_text()!r})"


def options_of(pass_: Pass[Any]) -> dict[str, Any]:
    """All option values of a pass, for reports."""
    return dataclasses.asdict(pass_.options)
