"""``sparsify``: unstructured and 2:4 semi-structured weight sparsity (masks, not shapes).

Matches: the constant weights of Conv, Gemm and MatMul nodes and of ONNX Runtime's fused
forms of them (initializers that are not graph inputs), minus ``exclude`` (node names or op types) and, for ``2:4``, weights whose
reduction (K) dimension is not a multiple of 4. K is the input-channel axis of a Conv
weight ``[C_out, C_in/g, kh, kw]`` (groups of 4 consecutive input channels at each
output channel and kernel position), axis 0 of a Gemm ``B`` (axis 1 with ``transB=1``) and
axis -2 of a MatMul's constant right operand.

Changes: weights are set to exactly zero, shapes unchanged:

* ``pattern=unstructured``: the ``ratio`` of entries with the smallest scores in each
  weight (``scope=layer``), or across all matched weights (``scope=global``);
* ``pattern=2:4``: in every group of 4 consecutive entries along K, the 2 with the smallest
  scores (``ratio`` must be 0.5, the only ratio of the pattern).

Scores are ``|W|`` (``importance=magnitude``) or ``|W| * ||X_k||`` (``activation``, needs
``--calib``), ``||X_k||`` the root mean square over the calibration feeds of the
activation multiplied by K index *k*.

Preserves: graph structure, shapes and I/O; numerics are lossy (``quantized`` tolerance
class; verified by a task metric). A tensor shared by several nodes is masked once.
Idempotent: masking a masked tensor again changes nothing.

Example (``--passes sparsify(pattern=2:4)``)::

    before: W[:, 0:4, y, x] = [0.3, -0.1, 0.7, 0.05]
    after:  W[:, 0:4, y, x] = [0.3,  0.0, 0.7, 0.0 ]

Statistics: per layer the sparsity and the multiply-accumulates a sparse kernel could skip
(``MACs * zeros / size``), totals, and the skipped weights with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult

logger = logging.getLogger(__name__)

_OPS = ("Conv", "Gemm", "MatMul")
_FUSED = {"FusedConv": "Conv", "FusedGemm": "Gemm"}


@dataclasses.dataclass(frozen=True)
class SparsifyOptions(Options):
    """Options of ``sparsify``.

    Attributes:
        pattern: ``2:4`` (2 zeros in every 4 consecutive weights along K) or
            ``unstructured``.
        ratio: Fraction of weights set to zero (``unstructured``; 0.5 for ``2:4``).
        scope: ``layer`` (the ratio in every weight) or ``global`` (one threshold over all
            matched weights; ``unstructured`` only).
        importance: ``magnitude`` (``|W|``) or ``activation`` (``|W|·||X||``, needs
            ``--calib``).
        exclude: Node names or op types left dense.
    """

    pattern: Literal["2:4", "unstructured"] = "2:4"
    ratio: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    importance: Literal["magnitude", "activation"] = "magnitude"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1)")
        if self.pattern == "2:4" and self.ratio != 0.5:
            raise ValueError("pattern=2:4 removes exactly half the weights: ratio must be 0.5")
        if self.pattern == "2:4" and self.scope == "global":
            raise ValueError("scope=global applies to pattern=unstructured only")


@dataclass
class _Target:
    """A weight to mask: node, input index, K axis and the activation feeding K."""

    node: ir.Node
    index: int
    k_axis: int
    activation: ir.Value | None
    act_axis: int

    @property
    def value(self) -> ir.Value:
        v = self.node.inputs[self.index]
        assert v is not None
        return v

    @property
    def label(self) -> str:
        return self.node.name or f"{self.node.op_type}:{self.value.name}"


def _is_constant(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.const_value is not None
    )


def _kind(node: ir.Node) -> str | None:
    """``Conv``, ``Gemm`` or ``MatMul`` for those ops and ORT's fused forms of them."""
    if node.domain in ("", "ai.onnx") and node.op_type in _OPS:
        return node.op_type
    if node.domain == "com.microsoft" and node.op_type in _FUSED:
        return _FUSED[node.op_type]
    return None


def find_targets(model: ir.Model, exclude: tuple[str, ...]) -> tuple[list[_Target], dict[str, str]]:
    """The weights ``sparsify`` may mask and, for the others, why not."""
    targets: list[_Target] = []
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for node in model.graph:
        kind = _kind(node)
        if kind is None or len(node.inputs) < 2:
            continue
        label = node.name or node.op_type
        if node.name in exclude or node.op_type in exclude:
            skipped[label] = "excluded"
            continue
        weight = node.inputs[1]
        if not _is_constant(weight):
            skipped[label] = "weight is not a constant initializer"
            continue
        assert weight is not None and weight.const_value is not None
        if weight.dtype is None or not weight.dtype.is_floating_point():
            skipped[label] = f"weight dtype {weight.dtype} is not floating point"
            continue
        if id(weight) in seen:
            skipped[label] = f"weight '{weight.name}' is shared and already masked"
            continue
        rank = len(weight.const_value.shape)
        if kind == "Conv":
            target = _Target(node, 1, 1, node.inputs[0], 1)
        elif kind == "Gemm":
            trans_a = node.attributes.get("transA")
            trans_b = node.attributes.get("transB")
            target = _Target(
                node, 1, 1 if trans_b is not None and trans_b.value else 0,
                node.inputs[0], 0 if trans_a is not None and trans_a.value else -1,
            )  # fmt: skip
        else:
            if rank < 2:
                skipped[label] = "1-D MatMul operand"
                continue
            target = _Target(node, 1, rank - 2, node.inputs[0], -1)
        seen.add(id(weight))
        targets.append(target)
    return targets, skipped


def _scores(target: _Target, energy: dict[str, np.ndarray] | None) -> np.ndarray:
    w = np.abs(target.value.const_value.numpy().astype(np.float32))  # type: ignore[union-attr]
    if energy is None or target.activation is None:
        return w
    e = energy.get(target.activation.name or "")
    if e is None or len(e) != w.shape[target.k_axis]:
        return w
    shape = [1] * w.ndim
    shape[target.k_axis] = len(e)
    return w * np.sqrt(e).astype(np.float32).reshape(shape)


def mask_2_4(scores: np.ndarray, axis: int) -> np.ndarray:
    """Keep-mask with exactly 2 of every 4 consecutive entries along ``axis`` kept (the
    2 largest scores; ties broken toward the lower index).

    Raises:
        ValueError: ``axis`` is not a multiple of 4 long.
    """
    if scores.shape[axis] % 4:
        raise ValueError(f"axis of length {scores.shape[axis]} is not a multiple of 4")
    moved = np.moveaxis(scores, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], -1, 4)
    order = np.argsort(-blocks, axis=-1, kind="stable")
    keep = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def mask_smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask removing the ``count`` smallest scores (ties toward the lower index)."""
    flat = scores.reshape(-1)
    keep = np.ones(flat.shape, dtype=bool)
    if count > 0:
        keep[np.argsort(flat, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


class SparsifyPass(Pass[SparsifyOptions]):
    """Unstructured or 2:4 weight sparsity (see the module docstring)."""

    info = PassInfo(
        name="sparsify",
        summary="unstructured or 2:4 semi-structured weight sparsity (magnitude or |W|·||X||)",
        tolerance="pruned",
    )
    Options = SparsifyOptions

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if self.options.importance == "activation" and ctx.calibration is None:
            raise UsageError("sparsify(importance=activation) needs calibration data: pass --calib PATH")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        from graphopt.passes.pruning.channels import layer_macs

        o = self.options
        targets, skipped = find_targets(model, o.exclude)
        if o.pattern == "2:4":
            kept = []
            for t in targets:
                length = t.value.const_value.shape.numpy()[t.k_axis]  # type: ignore[union-attr]
                if length % 4:
                    skipped[t.label] = f"K={length} is not a multiple of 4"
                else:
                    kept.append(t)
            targets = kept
        energy = None
        if o.importance == "activation" and targets:
            from graphopt.passes.pruning.channel_calib import channel_energy

            acts = {id(t.activation): t.activation for t in targets if t.activation is not None}
            axes = {t.activation.name: t.act_axis for t in targets if t.activation is not None and t.activation.name}
            energy = channel_energy(model, list(acts.values()), ctx, axes)  # type: ignore[arg-type]
        scores = [_scores(t, energy) for t in targets]
        masks = self._masks(targets, scores)
        macs = layer_macs(model)
        macs_key = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(model.graph)}
        per_layer: dict[str, dict[str, Any]] = {}
        zeros_total = size_total = 0
        skippable = macs_total = 0
        changed = False
        for t, keep in zip(targets, masks, strict=True):
            arr = t.value.const_value.numpy()  # type: ignore[union-attr]
            new = np.where(keep, arr, np.zeros((), dtype=arr.dtype))
            if not np.array_equal(new, arr):
                t.value.const_value = ir.tensor(np.ascontiguousarray(new), name=t.value.name)
                changed = True
            zeros = int(np.count_nonzero(new == 0))
            node_macs = macs.get(macs_key[id(t.node)], 0)
            skip = round(node_macs * zeros / new.size) if new.size else 0
            per_layer[t.label] = {
                "sparsity": round(zeros / new.size, 4),
                "macs": node_macs,
                "macs_skippable": skip,
            }
            zeros_total += zeros
            size_total += int(new.size)
            skippable += skip
            macs_total += node_macs
        stats: dict[str, Any] = {
            "pattern": o.pattern,
            "weights_sparsified": len(targets),
            "sparsity": round(zeros_total / size_total, 4) if size_total else 0.0,
            "macs_total": sum(macs.values()),
            "macs_skippable": skippable,
            "per_layer": per_layer,
            "skipped": skipped,
        }
        logger.info(
            "sparsify(%s): %d weights, sparsity %.3f, %d of %d MACs skippable",
            o.pattern, len(targets), stats["sparsity"], skippable, stats["macs_total"],
        )  # fmt: skip
        preserved = PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.SHAPES, Aspect.METADATA)
        return PassResult(model, changed, preserved=preserved, stats=stats)

    def _masks(self, targets: list[_Target], scores: list[np.ndarray]) -> list[np.ndarray]:
        o = self.options
        if o.pattern == "2:4":
            return [mask_2_4(s, t.k_axis) for t, s in zip(targets, scores, strict=True)]
        if o.scope == "layer":
            return [mask_smallest(s, round(o.ratio * s.size)) for s in scores]
        if not scores:
            return []
        flat = np.concatenate([s.reshape(-1) for s in scores])
        keep = mask_smallest(flat, round(o.ratio * flat.size))
        out, start = [], 0
        for s in scores:
            out.append(keep[start : start + s.size].reshape(s.shape))
            start += s.size
        return out
