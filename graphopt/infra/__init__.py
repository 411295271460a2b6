"""Pass infrastructure: passes, analyses, context, pass manager, instruments, registry."""

from graphopt.infra.analysis import Analysis, AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.instruments import (
    CrashReproducerInstrument,
    Instrument,
    PrintAfterChangeInstrument,
    TimingInstrument,
)
from graphopt.infra.manager import FixpointPassManager, PassManager
from graphopt.infra.options import NoOptions, Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.infra.pipeline_text import format_pipeline, parse_pipeline
from graphopt.infra.registry import PassRegistry, default_registry

__all__ = [
    "Analysis",
    "AnalysisManager",
    "Aspect",
    "CrashReproducerInstrument",
    "FixpointPassManager",
    "Instrument",
    "NoOptions",
    "Options",
    "Pass",
    "PassContext",
    "PassInfo",
    "PassManager",
    "PassRegistry",
    "PassResult",
    "PreservedAnalyses",
    "PrintAfterChangeInstrument",
    "TimingInstrument",
    "default_registry",
    "format_pipeline",
    "parse_pipeline",
]
