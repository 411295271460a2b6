"""MatMul + Add -> Gemm, with the checks that make the rewrite legal.

Gemm computes ``alpha·op(A)·op(B) + beta·C`` for 2-D ``A``/``B`` and a ``C`` that is
*unidirectionally* broadcastable to the ``[M, N]`` result. A MatMul + Add pair is only
rewritten when both MatMul operands are rank 2 and the Add's other operand broadcasts to
``[M, N]`` without widening it (``[N]``, ``[1, N]``, ``[M, 1]``, ``[M, N]`` or a scalar);
otherwise the Add would change the output shape and the Gemm would be invalid.
A ``Transpose(perm=[1, 0])`` feeding either operand becomes ``transA``/``transB``.
Both operand orders of the Add are matched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase, RewriteRuleSet


def _dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


class _MatMulAddToGemm(RewriteRuleClassBase):
    trans_a: ClassVar[bool] = False
    trans_b: ClassVar[bool] = False

    def _operand(self, op: Any, value: Any, transposed: bool) -> Any:
        return op.Transpose(value, perm=[1, 0]) if transposed else value

    def pattern(self, op: Any, a: Any, b: Any, c: Any) -> Any:
        product = op.MatMul(self._operand(op, a, self.trans_a), self._operand(op, b, self.trans_b))
        return op.Add(product, c)

    def check(self, context: Any, a: ir.Value, b: ir.Value, c: ir.Value, **_: Any) -> MatchResult:
        result = MatchResult()
        da, db, dc = _dims(a), _dims(b), _dims(c)
        if da is None or db is None or len(da) != 2 or len(db) != 2:
            return result.fail("MatMul operands must both be rank 2 (known shapes)")
        if dc is None:
            return result.fail("the bias's shape is unknown")
        m = da[1] if self.trans_a else da[0]
        n = db[0] if self.trans_b else db[1]
        if len(dc) > 2:
            return result.fail(f"the bias has rank {len(dc)} > 2")
        padded = [1] * (2 - len(dc)) + dc
        for have, want, axis in ((padded[0], m, "M"), (padded[1], n, "N")):
            if have == 1:
                continue
            if have is None or want is None or have != want:
                return result.fail(
                    f"bias dim {have} does not broadcast to the result's {axis}={want} "
                    "without widening it"
                )
        if c.dtype is not None and a.dtype is not None and c.dtype != a.dtype:
            return result.fail("bias dtype differs from the product's")
        return result

    def rewrite(self, op: Any, a: Any, b: Any, c: Any) -> Any:
        attributes: dict[str, int] = {}
        if self.trans_a:
            attributes["transA"] = 1
        if self.trans_b:
            attributes["transB"] = 1
        return op.Gemm(a, b, c, **attributes)


class _TransABGemm(_MatMulAddToGemm):
    trans_a = True
    trans_b = True


class _TransAGemm(_MatMulAddToGemm):
    trans_a = True


class _TransBGemm(_MatMulAddToGemm):
    trans_b = True


class _PlainGemm(_MatMulAddToGemm):
    pass


def matmul_add_to_gemm_rules() -> RewriteRuleSet:
    """The rules, transposed forms first (the plain form would otherwise win and leave the
    Transpose in place), both Add operand orders."""
    return RewriteRuleSet(
        [_TransABGemm.rule(), _TransAGemm.rule(), _TransBGemm.rule(), _PlainGemm.rule()],
        commute=True,
    )
