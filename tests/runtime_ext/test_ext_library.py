"""Finding and registering the runtime_ext library; automatic use by make_session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.backends import ext
from graphopt.backends.ext import library as ext_library_module
from graphopt.backends.ext.format import to_ext
from graphopt.errors import UsageError
from graphopt.verify.runner import make_session
from tests.runtime_ext.ext_support import lowbit_model, random_quantized, reference


def _write_model(tmp_path: Path) -> tuple[Path, object]:
    rng = np.random.default_rng(11)
    q = random_quantized(rng, 9, 70, 4, 32, asymmetric=True)
    path = tmp_path / "lowbit.onnx"
    path.write_bytes(lowbit_model(to_ext(q), ["M", 70]))
    return path, q


def test_library_path_is_the_built_library(ext_library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(ext_library).name == "libgraphopt_ext.so"
    monkeypatch.delenv(ext.ENV_LIBRARY, raising=False)
    assert ext.library_path() == ext.default_library_path()


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ext_library: str) -> None:
    monkeypatch.setenv(ext.ENV_LIBRARY, ext_library)
    assert ext.library_path() == Path(ext_library)
    monkeypatch.setenv(ext.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(UsageError, match=r"GRAPHOPT_EXT_LIBRARY=.*missing.so: no such runtime_ext library"):
        ext.library_path()


def test_missing_library_says_how_to_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ext.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(ext_library_module, "default_library_path", lambda: tmp_path / "libgraphopt_ext.so")
    with pytest.raises(UsageError, match=r"runtime_ext library not built: .* run `make setup`"):
        ext.library_path()


def test_session_options_register_the_library(tmp_path: Path, ext_library: str) -> None:
    path, q = _write_model(tmp_path)
    session = ort.InferenceSession(str(path), ext.session_options(), providers=["CPUExecutionProvider"])
    a = np.ones((2, 70), np.float32)
    (y,) = session.run(None, {"A": a})
    expected, _ = reference(a, q, None)  # type: ignore[arg-type]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_make_session_registers_the_library_for_graphopt_ops(tmp_path: Path, ext_library: str) -> None:
    path, _ = _write_model(tmp_path)
    session = make_session(path, threads=2)
    (y,) = session.run(None, {"A": np.ones((1, 70), np.float32)})
    assert y.shape == (1, 9)


def test_make_session_reports_a_missing_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path, _ = _write_model(tmp_path)
    monkeypatch.setenv(ext.ENV_LIBRARY, str(tmp_path / "nowhere.so"))
    with pytest.raises(UsageError, match=r"lowbit.onnx: has graphopt-domain ops, GRAPHOPT_EXT_LIBRARY="):
        make_session(path)


def test_model_uses_ext_looks_into_subgraphs() -> None:
    import onnx
    from onnx import TensorProto, helper

    inner = helper.make_graph(
        [helper.make_node("MatMulLowBit", ["x"], ["y"], domain="graphopt")],
        "inner",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["c"], ["out"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "outer", [], [])
    model = helper.make_model(graph)
    assert ext.model_uses_ext(model)
    assert not ext.model_uses_ext(onnx.ModelProto())
