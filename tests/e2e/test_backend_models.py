"""The onnx package's backend test models through ``graphopt optimize --passes cleanup``.

Every model under ``onnx/backend/test/data/{light,pytorch-converted,pytorch-operator,simple}``
that ONNX Runtime can run is optimized in process (``graphopt.api.optimize``, with its
``test_data_set_0`` inputs as ``--inputs``) and the optimized model's ONNX Runtime outputs
must match the stored references and be bit-identical to the original's. Models ONNX Runtime
cannot load or run are skipped with the reason; the counts are printed at the end of the
run (see ``conftest.py``) and written to ``docs/backend_sweep.md`` by
``tools/backend_sweep.py``. Logic and tolerances: :mod:`graphopt.testing.backend_models`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from graphopt.testing.backend_models import (
    KINDS,
    MATCHED,
    SKIPPED,
    BackendCase,
    discover,
    run_case,
)

pytestmark = pytest.mark.slow

CASES = discover()


def test_backend_test_data_is_present() -> None:
    found = {case.kind for case in CASES}
    if not CASES:
        pytest.skip("the installed onnx package ships no backend test data")
    assert found == set(KINDS), f"missing folders: {set(KINDS) - found}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_backend_model(
    case: BackendCase, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    result = run_case(case, tmp_path)
    record_property("backend_sweep", result.to_json())
    if result.status == SKIPPED:
        pytest.skip(result.reason)
    assert result.status == MATCHED, result.reason
