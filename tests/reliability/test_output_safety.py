"""RELIABILITY.md, "Nothing lost" and the output rows: conflicts, in-place, stale files,
the single-file size limit, determinism and the memory limit."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from reliability_support import (
    CliResult,
    FileSpy,
    TreeGuard,
    assert_one_line_error,
    ort_run,
    run_script,
    save_model,
    sha256,
    simple_model,
    stage_folders,
)

Cli = Callable[..., CliResult]
FEED = {"x": np.linspace(-3, 3, 4096, dtype=np.float32).reshape(1, 4096)}


def _model_with_dead_code(weight_elems: int = 4096) -> onnx.ModelProto:
    """``simple_model`` plus an Identity chain the cleanup pipeline removes (so that the
    output differs from the input and the run really writes something)."""
    model = simple_model(weight_elems)
    relu = model.graph.node[1]
    relu.output[0] = "r"
    model.graph.node.extend(
        [
            onnx.helper.make_node("Identity", ["r"], ["r1"], name="id1"),
            onnx.helper.make_node("Identity", ["r1"], ["y"], name="id2"),
            onnx.helper.make_node("Neg", ["x"], ["unused"], name="dead"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(folder: Path, *, external: bool) -> tuple[Path, list[Path]]:
    src = save_model(_model_with_dead_code(), folder / "m.onnx", external=external)
    files = [src] + ([folder / "m.onnx.data"] if external else [])
    return src, files


def _expected() -> list[np.ndarray]:
    return ort_run(_model_with_dead_code().SerializeToString(), FEED)


def _assert_good_output(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    for got, want in zip(ort_run(path, FEED), _expected()):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- how files are touched


def test_inputs_are_opened_read_only(cli: Cli, tmp_path: Path, spy: FileSpy) -> None:
    """Every Python-level open of the input model and its data file is read-only, and every
    memory map is a read-only map. (Opens inside ONNX Runtime's C++ are not observed.)"""
    import mmap

    src, files = _inputs(tmp_path / "in", external=True)
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    spy.clear()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency")
    spy.freeze()
    assert result.code == 0, result.err
    opened = spy.opened_resolved()
    assert {p.resolve() for p in files} <= opened
    assert spy.writable_opens(files) == []
    # onnx-ir copies untouched external tensors with copy_file_range (no map at all) and
    # maps them read-only when a value is read.
    assert all(m[2] == mmap.ACCESS_READ for m in spy.mmaps), spy.mmaps
    guard.assert_inputs_intact(files)


def test_published_by_rename_data_first_then_the_model(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = _inputs(tmp_path / "in", external=True)
    out = tmp_path / "out"
    out.mkdir()
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def recording_replace(a: object, b: object, *args: object, **kwargs: object) -> None:
        renames.append((Path(os.fsdecode(a)), Path(os.fsdecode(b))))  # type: ignore[arg-type]
        real_replace(a, b, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", recording_replace)
    result = cli("optimize", src, "-o", out / "o.onnx", "--no-latency")
    assert result.code == 0, result.err
    published = [(a, b) for a, b in renames if b.parent == out]
    assert [b.name for _, b in published] == ["o.onnx.data", "o.onnx"]
    for staged, _ in published:
        # Staged beside the destination (same file system): the rename is atomic.
        assert staged.parent.parent == out and staged.parent.name.startswith(".graphopt-stage-")
    assert sorted(p.name for p in out.iterdir()) == ["o.onnx", "o.onnx.data"]


# -------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_output_equal_to_input_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path, external: bool
) -> None:
    src, _ = _inputs(tmp_path, external=external)
    guard.freeze()
    result = cli("optimize", src, "-o", src, "--no-latency")
    assert_one_line_error(result, 7, "m.onnx", "--in-place")
    guard.assert_unchanged()


def test_output_equal_to_input_through_another_spelling_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    src, _ = _inputs(tmp_path / "in", external=False)
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "in" / ".." / "alias" / "m.onnx", "--no-latency")
    assert_one_line_error(result, 7, "m.onnx")
    guard.assert_unchanged()


def test_output_equal_to_an_input_data_file_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    src, files = _inputs(tmp_path, external=True)
    guard.freeze()
    result = cli("optimize", src, "-o", files[1], "--no-latency")
    assert_one_line_error(result, 7, "m.onnx.data")
    guard.assert_unchanged()


def test_output_data_file_would_replace_the_input_data_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    """The input keeps its weights in ``o.onnx.data``; writing ``o.onnx`` beside it would
    replace them, so this is the same conflict as output == input (even with --overwrite)."""
    src = save_model(_model_with_dead_code(), tmp_path / "m.onnx", external=True,
                     location="o.onnx.data")
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "o.onnx", "--no-latency", "--overwrite")
    assert_one_line_error(result, 7, "o.onnx.data")
    guard.assert_unchanged()


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_in_place_replaces_the_input_atomically(
    cli: Cli, guard: TreeGuard, tmp_path: Path, external: bool
) -> None:
    src, files = _inputs(tmp_path, external=external)
    inodes = {p: p.stat().st_ino for p in files}
    digests = {p: sha256(p) for p in files}
    result = cli("optimize", src, "-o", src, "--in-place", "--no-latency", "--passes", "cleanup")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    for p in files:
        # Renamed into place (a new inode), never rewritten through the old one.
        assert p.stat().st_ino != inodes[p], f"{p.name} was rewritten in place"
        assert sha256(p) != digests[p] or p.suffix == ".data"
    _assert_good_output(src)
    assert onnx.load(str(src), load_external_data=False).metadata_props
    assert not stage_folders(tmp_path)


def test_existing_destination_without_overwrite_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    src, _ = _inputs(tmp_path / "in", external=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "o.onnx").write_bytes(b"an older output")
    guard.freeze()
    result = cli("optimize", src, "-o", out / "o.onnx", "--no-latency")
    assert_one_line_error(result, 7, "o.onnx", "--overwrite")
    guard.assert_unchanged()


def test_leftover_data_file_without_overwrite_exits_7(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    """``o.onnx.data`` is a destination too: a leftover one is not replaced silently."""
    src, _ = _inputs(tmp_path / "in", external=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "o.onnx.data").write_bytes(b"\xee" * 100)
    guard.freeze()
    result = cli("optimize", src, "-o", out / "o.onnx", "--no-latency")
    assert_one_line_error(result, 7, "o.onnx.data", "--overwrite")
    guard.assert_unchanged()


def test_existing_destination_real_process(tmp_path: Path) -> None:
    src, _ = _inputs(tmp_path / "in", external=False)
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "o.onnx"
    dest.write_bytes(b"keep me")
    guard = TreeGuard(tmp_path).freeze()
    result = run_script(["optimize", src, "-o", dest, "--no-latency"])
    assert_one_line_error(result, 7, "o.onnx")
    guard.assert_unchanged()


def test_missing_output_folder_exits_2(cli: Cli, guard: TreeGuard, tmp_path: Path) -> None:
    src, _ = _inputs(tmp_path, external=False)
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "no" / "such" / "o.onnx", "--no-latency")
    assert_one_line_error(result, 2, "o.onnx", "does not exist")
    guard.assert_unchanged()


# ------------------------------------------------------------------------ stale outputs


def test_overwrite_never_appends_to_an_old_data_file(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    src, files = _inputs(tmp_path / "in", external=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert cli("optimize", src, "-o", fresh / "o.onnx", "--no-latency").code == 0
    fresh_size = (fresh / "o.onnx.data").stat().st_size

    out = tmp_path / "out"
    out.mkdir()
    (out / "o.onnx").write_bytes(b"stale model")
    (out / "o.onnx.data").write_bytes(b"\xee" * (fresh_size * 3 + 17))  # larger, stale
    guard.freeze()
    result = cli("optimize", src, "-o", out / "o.onnx", "--no-latency", "--overwrite")
    assert result.code == 0, result.err
    guard.assert_inputs_intact(files)
    assert (out / "o.onnx.data").stat().st_size == fresh_size
    assert sha256(out / "o.onnx.data") == sha256(fresh / "o.onnx.data")
    assert sha256(out / "o.onnx") == sha256(fresh / "o.onnx")
    _assert_good_output(out / "o.onnx")


# ------------------------------------------------------------------------ size limit


def test_lowered_size_limit_writes_external_data_transparently(tmp_path: Path) -> None:
    from graphopt.api import OptimizeConfig, optimize

    src, files = _inputs(tmp_path / "in", external=False)
    guard = TreeGuard(tmp_path).freeze()
    out = tmp_path / "out"
    out.mkdir()
    optimize(src, out / "o.onnx", OptimizeConfig(latency=False, size_limit=4096))
    guard.assert_inputs_intact(files)
    assert (out / "o.onnx.data").is_file(), sorted(os.listdir(out))
    header = onnx.load(str(out / "o.onnx"), load_external_data=False)
    locations = {
        e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"o.onnx.data"}
    _assert_good_output(out / "o.onnx")


# ------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_same_run_twice_is_byte_identical(
    cli: Cli, tmp_path: Path, external: bool
) -> None:
    src, files = _inputs(tmp_path / "in", external=external)
    guard = TreeGuard(tmp_path).freeze()
    outputs = []
    for run, threads in (("a", "1"), ("b", "2")):
        folder = tmp_path / run
        folder.mkdir()
        result = cli("optimize", src, "-o", folder / "o.onnx", "--no-latency", "--seed", "3",
                     "--threads", threads)
        assert result.code == 0, result.err
        outputs.append({p.name: sha256(p) for p in sorted(folder.iterdir())})
    guard.assert_inputs_intact(files)
    assert outputs[0] == outputs[1]
    assert ("o.onnx.data" in outputs[0]) == external


# ------------------------------------------------------------------------ memory limit


def test_max_memory_too_small_exits_6_nothing_written(tmp_path: Path) -> None:
    """Runs in a child process: the limit is an rlimit on the whole process."""
    src, _ = _inputs(tmp_path / "in", external=True)
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    result = run_script(
        ["optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency", "--max-memory", "1M"]
    )
    assert_one_line_error(result, 6)
    guard.assert_unchanged()
