"""The pass manager: runs passes in sequence or to a fixed point.

A :class:`PassManager` is itself a pass, so pipelines nest. It threads the
:class:`~graphopt.infra.context.PassContext` and one
:class:`~graphopt.infra.analysis.AnalysisManager` through its passes, invalidates analyses
by what each pass preserved, calls instruments, optionally runs the ONNX checker after
every pass (verify-each), and re-raises failures with the pass name, its position and the
passes already run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import onnx
import onnx_ir as ir

from graphopt.errors import GraphoptError, PassError, PostconditionError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult

logger = logging.getLogger(__name__)


def check_model(model: ir.Model) -> None:
    """Runs the ONNX checker on the model's serialized graph (external data not loaded)."""
    proto = ir.serde.serialize_model(model)
    # Large tensors are serialized in place; the checker does not need their bytes.
    onnx.checker.check_model(proto) if proto.ByteSize() < 2**31 - 1 else None


class PassManager(Pass[Options]):
    """Runs a sequence of passes once.

    Args:
        passes: The passes, in order.
        ctx: Context for runs through onnx-ir's interface.
    """

    info = PassInfo(name="pipeline", summary="a sequence of passes")

    def __init__(self, passes: Sequence[Pass[Any]], ctx: PassContext | None = None) -> None:
        super().__init__(None, ctx)
        self.passes: list[Pass[Any]] = list(passes)

    def to_text(self) -> str:
        """The pipeline as text that :meth:`PassRegistry.build` parses back."""
        return ",".join(p.to_text() for p in self.passes)

    def _run_once(
        self, model: ir.Model, ctx: PassContext, am: AnalysisManager, prefix: str = ""
    ) -> PassResult:
        modified = False
        preserved = PreservedAnalyses.all()
        stats: dict[str, Any] = {}
        already_run: list[str] = []
        for position, pass_ in enumerate(self.passes):
            name = pass_.info.name
            if name in ctx.disabled_passes:
                logger.info("skipping disabled pass %s", name)
                continue
            for inst in ctx.instruments:
                inst.before_pass(pass_, model, position)
            try:
                result = pass_.run_with(model, ctx, am)
                if ctx.verify_each and result.modified:
                    try:
                        check_model(model)
                    except onnx.checker.ValidationError as e:
                        first = str(e).strip().splitlines()[0]
                        raise PostconditionError(
                            name, position, already_run, RuntimeError(f"ONNX checker: {first}")
                        ) from None
            except BaseException as e:
                for inst in ctx.instruments:
                    inst.on_failure(pass_, model, e, position)
                if isinstance(e, GraphoptError) or not isinstance(e, Exception):
                    raise
                raise PassError(prefix + name, position, already_run, e) from e
            am.invalidate(result.preserved)
            for inst in ctx.instruments:
                inst.after_pass(pass_, model, result, position)
            modified |= result.modified
            preserved = preserved.intersect(result.preserved)
            for key, value in result.stats.items():
                stats[f"{name}.{key}"] = value
            already_run.append(name)
        return PassResult(model, modified, preserved=preserved, stats=stats)

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Runs every pass once, in order."""
        return self._run_once(model, ctx, am)

    def __call__(self, model_or_result: Any, /) -> PassResult:  # type: ignore[override]
        """Runs the pipeline with its own context (onnx-ir calling convention)."""
        result = super().__call__(model_or_result)
        assert isinstance(result, PassResult)
        return result

    def execute(self, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
        """Runs the pipeline on ``model`` with ``ctx``, calling the instruments' pipeline
        hooks. The usual entry point of the library."""
        ctx = ctx or self.ctx or PassContext()
        am = AnalysisManager(ctx)
        for inst in ctx.instruments:
            inst.before_pipeline(model, self.to_text())
        return self.run_with(model, ctx, am)


@dataclasses.dataclass(frozen=True)
class FixpointOptions(Options):
    """Options of ``fixpoint``.

    Attributes:
        max_iter: Upper bound on rounds; reaching it is logged, not an error.
    """

    max_iter: int = 8

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ValueError("max_iter must be at least 1")


class FixpointPassManager(PassManager):
    """Repeats a sequence of passes until a round changes nothing (or ``max_iter``).

    Pipeline text: ``fixpoint(cleanup,fuse,max_iter=4)``.
    """

    info = PassInfo(name="fixpoint", summary="repeat the nested passes until nothing changes")
    Options = FixpointOptions

    def __init__(
        self,
        passes: Sequence[Pass[Any]],
        options: FixpointOptions | None = None,
        ctx: PassContext | None = None,
    ) -> None:
        super().__init__(passes, ctx)
        self.fixpoint_options = options or FixpointOptions()
        self.options = self.fixpoint_options

    def to_text(self) -> str:
        inner = [p.to_text() for p in self.passes]
        opts = self.fixpoint_options.to_text()
        if opts:
            inner.append(opts)
        return f"fixpoint({','.join(inner)})"

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Runs rounds until one reports no modification."""
        modified = False
        preserved = PreservedAnalyses.all()
        stats: dict[str, Any] = {}
        rounds = 0
        for rounds in range(1, self.fixpoint_options.max_iter + 1):
            result = self._run_once(model, ctx, am, prefix="fixpoint/")
            preserved = preserved.intersect(result.preserved)
            for key, value in result.stats.items():
                if isinstance(value, (int, float)) and isinstance(stats.get(key, 0), (int, float)):
                    stats[key] = stats.get(key, 0) + value
                else:
                    stats[key] = value
            if not result.modified:
                break
            modified = True
        else:
            logger.warning("fixpoint: still changing after max_iter=%d rounds", rounds)
        stats["rounds"] = rounds
        return PassResult(model, modified, preserved=preserved, stats=stats)
