"""RELIABILITY.md, "Bad input": files that are missing, not ONNX, invalid or unsupported.

Every case runs ``graphopt optimize IN -o OUT`` and asserts the exit code, exactly one
stderr line naming the file (and tensor or value where there is one), and a byte-identical
folder tree afterwards: nothing at the destination, no staging folder, inputs unchanged.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reliability_support import (
    CliResult,
    FileSpy,
    TreeGuard,
    assert_one_line_error,
    finish_model,
    run_script,
    save_model,
    simple_model,
)

Cli = Callable[..., CliResult]


def _fails(
    cli: Cli, guard: TreeGuard, src: Path, code: int, *needles: str, spy: FileSpy | None = None
) -> str:
    """Runs optimize on ``src`` into ``out/o.onnx`` and checks a clean failure.

    With ``spy``, only what the run itself opened is recorded (not the test's set-up).
    """
    out = guard.root / "out"
    out.mkdir(exist_ok=True)
    guard.freeze()
    if spy is not None:
        spy.clear()
    result = cli("optimize", src, "-o", out / "o.onnx", "--no-latency")
    if spy is not None:
        spy.freeze()
    line = assert_one_line_error(result, code, *needles)
    guard.assert_unchanged()
    return line


# ------------------------------------------------------------------------------ paths


def test_missing_path_exits_2(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    _fails(cli, guard, tmp_path / "nope.onnx", 2, "nope.onnx", "no such file")


def test_directory_exits_2(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    _fails(cli, guard, folder, 2, "model.onnx", "directory")


def test_unreadable_file_exits_2(
    cli: Cli, guard: TreeGuard, tmp_path: Path, running_as_root: bool
) -> None:
    if running_as_root:
        pytest.skip(
            "running as root: chmod 000 does not stop root from reading the file, so the "
            "unreadable case cannot happen here (see test_unreadable_file_simulated)"
        )
    src = save_model(simple_model(), tmp_path / "m.onnx")
    src.chmod(0)
    try:
        _fails(cli, guard, src, 2, "m.onnx", "not readable")
    finally:
        src.chmod(0o644)


def test_unreadable_file_simulated(
    cli: Cli, guard: TreeGuard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check where permissions cannot be taken away (root): ``os.access`` says no."""
    src = save_model(simple_model(), tmp_path / "m.onnx")
    real_access = os.access

    def no_read(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if mode & os.R_OK and Path(os.fsdecode(path)).name == "m.onnx":  # type: ignore[arg-type]
            return False
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", no_read)
    _fails(cli, guard, src, 2, "m.onnx", "not readable")


def test_missing_path_real_process(tmp_path: Path) -> None:
    """The installed script returns the code as the process exit status."""
    (tmp_path / "out").mkdir()
    result = run_script(["optimize", tmp_path / "nope.onnx", "-o", tmp_path / "out" / "o.onnx"])
    assert_one_line_error(result, 2, "nope.onnx", "no such file")
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------ not ONNX at all


def _valid_bytes() -> bytes:
    return simple_model().SerializeToString()


@pytest.mark.parametrize(
    ("name", "payload", "found"),
    [
        ("empty", b"", "empty (0-byte)"),
        ("truncated", _valid_bytes()[: len(_valid_bytes()) // 2], "protobuf parse failed"),
        ("random", np.random.default_rng(7).bytes(4096), "not an ONNX model"),
    ],
)
def test_not_a_model_exits_3(
    cli: Cli, guard: TreeGuard, tmp_path: Path, name: str, payload: bytes, found: str
) -> None:
    src = tmp_path / f"{name}.onnx"
    src.write_bytes(payload)
    _fails(cli, guard, src, 3, f"{name}.onnx", "not an ONNX model", found)


class _Trap:
    """Unpickling this object creates ``marker`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_named_and_never_unpickled(
    cli: Cli, guard: TreeGuard, tmp_path: Path, spy: FileSpy, protocol: int
) -> None:
    marker = tmp_path / "UNPICKLED"
    src = tmp_path / "model.onnx"
    src.write_bytes(pickle.dumps({"weights": _Trap(marker)}, protocol=protocol))
    _fails(cli, guard, src, 3, "model.onnx", "not an ONNX model", "pickle", spy=spy)
    assert not marker.exists(), "the pickle was unpickled"
    assert spy.unpickled == []


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x05N.")
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2), dtype=np.float32))
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"w": np.ones((4, 4), dtype=np.float32)})


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        (_zip_bytes(), "zip archive"),
        (_safetensors_bytes(), "safetensors"),
        (b"graph main (float[1] x) => (float[1] y) { y = Relu(x) }\n", "text file"),
        (b'{"format": "not onnx"}\n', "JSON/XML text"),
        (_npy_bytes(), "NumPy .npy"),
    ],
    ids=["zip", "safetensors", "text", "json", "npy"],
)
def test_other_formats_are_named(
    cli: Cli, guard: TreeGuard, tmp_path: Path, payload: bytes, found: str
) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(payload)
    _fails(cli, guard, src, 3, "model.onnx", "not an ONNX model", found)


def test_pickle_real_process(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    src = tmp_path / "model.onnx"
    src.write_bytes(pickle.dumps(_Trap(marker)))
    (tmp_path / "out").mkdir()
    result = run_script(["optimize", src, "-o", tmp_path / "out" / "o.onnx"])
    assert_one_line_error(result, 3, "model.onnx", "pickle")
    assert not marker.exists()
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------- invalid or unsupported


def test_no_ir_version_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    model = simple_model()
    model.ClearField("ir_version")
    src = save_model(model, tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "ir_version")


def test_no_opset_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    model = simple_model()
    del model.opset_import[:]
    src = save_model(model, tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "opset")


def test_edges_out_of_order_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    model = simple_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    src = save_model(model, tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "ONNX checker", "topologically sorted")


def test_newer_opset_exits_3_naming_the_limit(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    model = simple_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    src = save_model(model, tmp_path / "m.onnx")
    limit = f"({onnx.defs.onnx_opset_version()})"
    _fails(cli, guard, src, 3, "m.onnx", f"opset {onnx.defs.onnx_opset_version() + 5}", limit)


def test_newer_ir_version_exits_3_naming_the_limit(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    model = simple_model()
    model.ir_version = onnx.IR_VERSION + 1
    src = save_model(model, tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", f"ir_version {onnx.IR_VERSION + 1}",
           f"({onnx.IR_VERSION})")


def _with_initializer(tensor: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", tensor.name], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[tensor],
    )
    return finish_model(graph, check=False)


def test_raw_data_length_wrong_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "w")
    tensor.raw_data = tensor.raw_data[:-1]
    src = save_model(_with_initializer(tensor), tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "initializer 'w'", "raw_data has 15 bytes", "16")


def test_typed_data_length_wrong_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    del tensor.float_data[-1]
    src = save_model(_with_initializer(tensor), tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "w", "float_data")


@pytest.mark.parametrize(
    ("dims", "needle"),
    [
        ([2**40, 2**40], "element count overflows"),
        ([2**20, 2**20], "needs 4398046511104"),  # 4 TiB declared, 16 bytes present
    ],
    ids=["overflow", "huge"],
)
def test_element_count_checked_before_allocation(
    cli: Cli, guard: TreeGuard, tmp_path: Path, dims: list[int], needle: str
) -> None:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "w")
    del tensor.dims[:]
    tensor.dims.extend(dims)
    src = save_model(_with_initializer(tensor), tmp_path / "m.onnx")
    _fails(cli, guard, src, 3, "m.onnx", "initializer 'w'", needle)


def test_over_single_file_limit_exits_3_with_the_fix(
    cli: Cli, guard: TreeGuard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single-file model over protobuf's 2 GiB (limit lowered): 3, saying what to do."""
    import graphopt.io

    src = save_model(simple_model(4096), tmp_path / "m.onnx")
    monkeypatch.setattr(graphopt.io, "PROTOBUF_LIMIT", 1024)
    _fails(cli, guard, src, 3, "m.onnx", "2 GiB", "external data")


# ---------------------------------------------------------------------- external data


def _external_model(folder: Path) -> tuple[Path, Path]:
    src = save_model(simple_model(4096), folder / "m.onnx", external=True)
    return src, folder / "m.onnx.data"


def test_external_data_missing_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    src, data = _external_model(tmp_path / "in")
    data.unlink()
    _fails(cli, guard, src, 3, "m.onnx", "initializer 'w'", "m.onnx.data", "missing")


def test_external_data_truncated_exits_3(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    src, data = _external_model(tmp_path / "in")
    data.write_bytes(data.read_bytes()[:1000])
    _fails(cli, guard, src, 3, "m.onnx", "initializer 'w'", "m.onnx.data", "truncated")


def _secret(folder: Path, like: Path) -> Path:
    """A file outside the model folder with exactly the bytes the tensor needs."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "secret.bin"
    secret.write_bytes(like.read_bytes())
    return secret


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink-file", "symlink-folder"])
def test_external_data_outside_the_folder_exits_4_unread(
    cli: Cli, guard: TreeGuard, tmp_path: Path, spy: FileSpy, kind: str
) -> None:
    from reliability_support import set_external_location

    src, data = _external_model(tmp_path / "in")
    secret = _secret(tmp_path / "elsewhere", data)
    if kind == "absolute":
        location = str(secret)
    elif kind == "dotdot":
        location = "../elsewhere/secret.bin"
    elif kind == "symlink-file":
        (tmp_path / "in" / "link.bin").symlink_to(secret)
        location = "link.bin"
    else:
        (tmp_path / "in" / "sub").symlink_to(secret.parent, target_is_directory=True)
        location = "sub/secret.bin"
    set_external_location(src, "w", location)
    data.unlink()
    line = _fails(cli, guard, src, 4, "m.onnx", "initializer 'w'", location, spy=spy)
    assert "link" in line if kind.startswith("symlink") else "outside" in line
    assert secret.resolve() not in spy.opened_resolved(), "the file outside was opened"


def test_external_data_security_real_process(tmp_path: Path) -> None:
    from reliability_support import set_external_location

    src, data = _external_model(tmp_path / "in")
    secret = _secret(tmp_path / "elsewhere", data)
    set_external_location(src, "w", str(secret))
    data.unlink()
    (tmp_path / "out").mkdir()
    result = run_script(["optimize", src, "-o", tmp_path / "out" / "o.onnx"])
    assert_one_line_error(result, 4, "m.onnx", "initializer 'w'")
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------- the other commands


@pytest.mark.parametrize("command", ["inspect", "compare-a", "compare-b"])
@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [("missing", 2, "no such file"), ("pickle", 3, "pickle"), ("outside", 4, "outside")],
)
def test_inspect_and_compare_use_the_same_safe_load(
    cli: Cli, guard: TreeGuard, tmp_path: Path, command: str, case: str, code: int, needle: str
) -> None:
    from reliability_support import set_external_location

    good = save_model(simple_model(), tmp_path / "good" / "g.onnx")
    if case == "missing":
        bad = tmp_path / "bad.onnx"
    elif case == "pickle":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    else:
        bad, data = _external_model(tmp_path / "in")
        set_external_location(bad, "w", "../" + data.name)
    guard.freeze()
    if command == "inspect":
        result = cli("inspect", bad)
    elif command == "compare-a":
        result = cli("compare", bad, good, "--no-latency")
    else:
        result = cli("compare", good, bad, "--no-latency")
    assert_one_line_error(result, code, bad.name, needle)
    guard.assert_unchanged()
