"""A thin facade over onnxscript's pattern rewriter.

graphopt's fusions are data: a :class:`Rule` names one or more onnxscript
``RewriteRule`` objects (``pattern`` / ``check`` / ``rewrite``), the backends it is legal
for, and a summary. :func:`apply_rules` applies rules in order, counts how often each
fired, and — with ``explain=True`` — asks onnxscript's matching tracer, in a dry run, why
each rule that never fired did not match, keeping the closest miss and its reason.

Nothing here matches patterns itself: matching and replacement are onnxscript's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from onnxscript.rewriter import MatchingTracer, RewriteRuleSet
from onnxscript.rewriter._basics import MatchStatus
from onnxscript.rewriter._rewrite_rule import RewriteRule

logger = logging.getLogger(__name__)

#: Target names a rule may be legal for.
ALL_TARGETS = frozenset({"ort", "tensorrt", "portable", "ext"})
STANDARD_TARGETS = ALL_TARGETS  # rules that only emit standard ONNX ops
ORT_TARGETS = frozenset({"ort", "ext"})  # rules that emit com.microsoft contrib ops


@dataclass(frozen=True)
class Rule:
    """A named fusion made of onnxscript rewrite rules.

    Attributes:
        name: Kebab-case name used in ``fuse(rules=[...])`` and reports.
        summary: One line: what it matches and what it produces.
        make: Builds the onnxscript rules or rule set (called once per application, so
            rules may hold per-run state; a rule set keeps its own options such as
            ``commute``).
        targets: Backends for which the produced ops are legal and fast.
        group: ``generic``, ``normalization``, ``activation`` or ``attention``.
        min_opset: Lowest default-domain opset the replacement needs (None: any).
        shape_inference: Run shape inference before matching (the rule's checks read
            shapes).
    """

    name: str
    summary: str
    make: Callable[[], Sequence[RewriteRule] | RewriteRuleSet]
    targets: frozenset[str] = STANDARD_TARGETS
    group: str = "generic"
    min_opset: int | None = None
    shape_inference: bool = False


@dataclass
class RuleOutcome:
    """What one rule did in one application.

    Attributes:
        name: The rule's name.
        count: How many times it fired.
        closest_miss: For a rule that never fired, the closest near-match and why it
            failed (``explain`` only); None when nothing came close.
        skipped: Why the rule was not tried at all (opset too low), or None.
    """

    name: str
    count: int = 0
    closest_miss: str | None = None
    skipped: str | None = None


@dataclass
class RewriteReport:
    """Per-rule outcomes, in application order."""

    outcomes: list[RuleOutcome] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Total rewrites."""
        return sum(o.count for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        """Rule name -> times fired (rules applied in several rounds are summed)."""
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.name] = out.get(o.name, 0) + o.count
        return out

    def merge(self, other: RewriteReport) -> None:
        """Adds another application's outcomes (a later round) into this one."""
        by_name = {o.name: o for o in self.outcomes}
        for o in other.outcomes:
            mine = by_name.get(o.name)
            if mine is None:
                self.outcomes.append(o)
                by_name[o.name] = o
                continue
            mine.count += o.count
            if mine.count:
                mine.closest_miss = None
            elif o.closest_miss:
                mine.closest_miss = o.closest_miss


def _rule_set(rule: Rule) -> RewriteRuleSet:
    made = rule.make()
    if isinstance(made, RewriteRuleSet):
        return made
    return RewriteRuleSet(list(made))


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _describe_miss(rule: Rule, tracer: MatchingTracer) -> str | None:
    best = None
    for matches in tracer.best_matches_map.values():
        for info in matches:
            if info.status == MatchStatus.SUCCESS:
                continue
            if best is None or info.score() > best.score():
                best = info
    if best is None:
        return None
    root = best.root_node
    label = root.name or (root.outputs[0].name if root.outputs else None) or "?"
    where = f"node '{label}' ({root.op_type})"
    reason = best.match_result.reason or "pattern did not match"
    matched = len(best.match_result.nodes)
    kind = "check failed" if best.status == MatchStatus.CONDITION_FAILED else "no match"
    if best.status == MatchStatus.REPLACEMENT_FAILED:
        kind = "replacement failed"
    return f"{kind} at {where} after {matched} matched nodes: {' '.join(reason.split())}"


def _shape_inference(model: ir.Model) -> None:
    try:
        ir_common.ShapeInferencePass()(model)
    except Exception as e:  # noqa: BLE001 - shapes only help checks; must not stop fusion
        logger.debug("shape inference failed before fusion: %s", e)


def apply_rules(model: ir.Model, rules: Sequence[Rule], *, explain: bool = False) -> RewriteReport:
    """Applies ``rules`` in order to ``model`` (in place).

    Args:
        model: The model to rewrite.
        rules: Rules, applied one after the other (each to a fixed point of its own
            matches in one sweep, as onnxscript does).
        explain: For rules that never fired, record the closest miss (a dry-run trace).

    Returns:
        The per-rule outcomes.
    """
    report = RewriteReport()
    opset = _opset(model)
    for rule in rules:
        outcome = RuleOutcome(rule.name)
        report.outcomes.append(outcome)
        if rule.min_opset is not None and opset < rule.min_opset:
            outcome.skipped = f"needs opset >= {rule.min_opset}, model has {opset}"
            continue
        if rule.shape_inference:
            _shape_inference(model)
        outcome.count = int(_rule_set(rule).apply_to_model(model))
        if outcome.count:
            logger.info("rule %s fired %d times", rule.name, outcome.count)
        elif explain:
            tracer = MatchingTracer()
            _rule_set(rule).apply_to_model(model, tracer=tracer)
            outcome.closest_miss = _describe_miss(rule, tracer)
    if report.total:
        ir_common.RemoveUnusedNodesPass()(model)
    return report
