"""RELIABILITY.md, "calibration data with NaN/Inf, wrong dtype/shape, zero samples": exit 3
naming the input and the sample.

Calibration data is only read by passes that need it, so most cases drive
:class:`graphopt.calibration_data.CalibrationDataset` directly; the CLI cases check the
path and emptiness checks that ``graphopt optimize --calib`` performs up front.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from reliability_support import (
    CliResult,
    FileSpy,
    TreeGuard,
    assert_one_line_error,
    finish_model,
    save_model,
)

from graphopt.calibration_data import CalibrationDataset
from graphopt.errors import CalibrationError, GraphoptError, UsageError

Cli = Callable[..., CliResult]


def _model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("ReduceSum", ["idsf"], ["total"], keepdims=1, name="sum"),
            helper.make_node("Add", ["x", "total"], ["y"], name="add"),
        ],
        "calib",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return finish_model(graph)


def _good(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "ids": rng.integers(0, 10, (n, 3)).astype(np.int64),
    }


def _consume(path: Path) -> list[dict[str, np.ndarray]]:
    return list(CalibrationDataset(path, _model()))


def _fails(path: Path, error: type[GraphoptError], *needles: str) -> str:
    with pytest.raises(error) as info:
        _consume(path)
    assert info.value.exit_code == (2 if error is UsageError else 3)
    line = info.value.one_line()
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in line, line
    return line


def test_good_data_streams_every_sample(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", **_good(5))
    samples = _consume(tmp_path / "c.npz")
    assert len(samples) == 5
    assert samples[0]["x"].shape == (1, 4) and samples[0]["ids"].dtype == np.int64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_name_input_and_sample(tmp_path: Path, bad: float) -> None:
    data = _good(5)
    data["x"][3, 2] = bad
    np.savez(tmp_path / "c.npz", **data)
    _fails(tmp_path / "c.npz", CalibrationError, "c.npz", "sample 3", "'x'", "NaN/Inf")


def test_non_finite_values_in_a_folder_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        feed = {k: v[i : i + 1] for k, v in _good(3).items()}
        if i == 2:
            feed["x"][0, 0] = np.nan
        np.savez(folder / f"{i:03d}.npz", **feed)
    _fails(folder, CalibrationError, "002.npz", "'x'")


@pytest.mark.parametrize(
    ("name", "array", "needles"),
    [
        ("ids", np.full((4, 3), 1.5, np.float32), ("'ids'", "float32", "int64")),
        ("x", np.array([["a"] * 4] * 4), ("'x'", "<U1", "float32")),
        ("x", np.ones((4, 4), np.complex64), ("'x'", "complex64")),
    ],
    ids=["float-for-int", "text-for-float", "complex-for-float"],
)
def test_wrong_dtype_names_input_and_sample(
    tmp_path: Path, name: str, array: np.ndarray, needles: tuple[str, ...]
) -> None:
    data = _good(4)
    data[name] = array
    np.savez(tmp_path / "c.npz", **data)
    _fails(tmp_path / "c.npz", CalibrationError, "sample 0", *needles)


@pytest.mark.parametrize(
    ("name", "shape", "needle"),
    [("x", (4, 5), "(1, 5)"), ("ids", (4, 3, 1), "(1, 3, 1)")],
    ids=["wrong-size", "wrong-rank"],
)
def test_wrong_shape_names_input_and_sample(
    tmp_path: Path, name: str, shape: tuple[int, ...], needle: str
) -> None:
    data = _good(4)
    data[name] = np.zeros(shape, data[name].dtype)
    np.savez(tmp_path / "c.npz", **data)
    _fails(tmp_path / "c.npz", CalibrationError, "sample 0", f"'{name}'", needle)


def test_varying_symbolic_dims_are_accepted_in_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, batch in enumerate((1, 3, 2)):
        np.savez(folder / f"{i}.npz", **{k: v[:batch] for k, v in _good(3).items()})
    assert [s["x"].shape[0] for s in _consume(folder)] == [1, 3, 2]


@pytest.mark.parametrize("layout", ["zero-rows", "no-arrays", "empty-folder"])
def test_zero_samples(tmp_path: Path, layout: str) -> None:
    if layout == "zero-rows":
        path = tmp_path / "c.npz"
        np.savez(path, **{k: v[:0] for k, v in _good().items()})
    elif layout == "no-arrays":
        path = tmp_path / "c.npz"
        np.savez(path)
    else:
        path = tmp_path / "calib"
        path.mkdir()
        (path / "README.txt").write_text("no samples here")
    _fails(path, CalibrationError, path.name, "zero samples")


def test_missing_and_unknown_inputs(tmp_path: Path) -> None:
    data = _good()
    del data["ids"]
    np.savez(tmp_path / "missing.npz", **data)
    _fails(tmp_path / "missing.npz", CalibrationError, "sample 0", "'ids'")
    data = {**_good(), "extra": np.zeros((4, 1), np.float32)}
    np.savez(tmp_path / "extra.npz", **data)
    _fails(tmp_path / "extra.npz", CalibrationError, "'extra'", "not a graph input")


def test_object_arrays_are_refused_never_unpickled(tmp_path: Path, spy: FileSpy) -> None:
    marker = tmp_path / "UNPICKLED"

    class Trap:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    data: dict[str, np.ndarray] = dict(_good())
    data["x"] = np.array([Trap()] * 4, dtype=object)
    with open(tmp_path / "c.npz", "wb") as f:
        np.savez(f, **data)  # pickles the object array
    spy.clear()
    _fails(tmp_path / "c.npz", CalibrationError, "c.npz", "'x'")
    assert not marker.exists()
    assert spy.unpickled == []


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "c.npz").write_bytes(b"not a zip archive at all")
    _fails(tmp_path / "c.npz", CalibrationError, "c.npz", "not a readable .npz")


def test_missing_path(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.npz", UsageError, "nope.npz", "not found")


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return save_model(_model(), tmp_path / "in" / "m.onnx")


def test_cli_missing_calibration_path_exits_2(
    cli: Cli, guard: TreeGuard, src: Path, tmp_path: Path
) -> None:
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency",
                 "--calib", tmp_path / "nope.npz")
    assert_one_line_error(result, 2, "nope.npz")
    guard.assert_unchanged()


def test_cli_zero_calibration_samples_exits_3(
    cli: Cli, guard: TreeGuard, src: Path, tmp_path: Path
) -> None:
    np.savez(tmp_path / "in" / "c.npz", **{k: v[:0] for k, v in _good().items()})
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency",
                 "--calib", tmp_path / "in" / "c.npz")
    assert_one_line_error(result, 3, "c.npz", "zero samples")
    guard.assert_unchanged()
