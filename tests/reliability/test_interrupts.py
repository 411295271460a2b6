"""RELIABILITY.md, "Nothing lost": the input keeps its bytes and nothing is published on
Ctrl-C and kill, and a Ctrl-C while the result is staged leaves no staging folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_support import (
    GRAPHOPT_SCRIPT,
    CliResult,
    TreeGuard,
    assert_one_line_error,
    save_model,
    simple_model,
)

Cli = Callable[..., CliResult]
PLUGINS = Path(__file__).with_name("plugins")


def _inputs(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return save_model(simple_model(4096), tmp_path / "in" / "m.onnx", external=True)


def test_ctrl_c_in_a_pass_exits_130_nothing_written(
    cli: Cli, guard: TreeGuard, tmp_path: Path
) -> None:
    src = _inputs(tmp_path)
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency",
                 "--passes", "interrupt", "--plugin", PLUGINS / "interrupt.py")
    assert_one_line_error(result, 130, "interrupted", "nothing published")
    guard.assert_unchanged()


def test_ctrl_c_while_staged_removes_the_stage(
    cli: Cli, guard: TreeGuard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during verification, when the result already sits in its staging folder."""
    import graphopt.api

    seen: list[Path] = []

    def interrupted(original: Path, candidate: Path, *args: object, **kwargs: object) -> None:
        seen.append(Path(candidate))
        assert Path(candidate).is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(graphopt.api, "verify_model", interrupted)
    src = _inputs(tmp_path)
    guard.freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency")
    assert_one_line_error(result, 130, "interrupted")
    assert seen and seen[0].parent.name.startswith(".graphopt-stage-")
    assert seen[0].parent.parent == tmp_path / "out"
    guard.assert_unchanged()


def _start_sleepy(
    tmp_path: Path, src: Path, scratch: Path
) -> tuple[subprocess.Popen[str], Path]:
    """Starts ``graphopt optimize --passes sleepy`` and waits until the pass runs.

    ``scratch`` becomes the child's TMPDIR (its reproducer folder goes there, outside the
    guarded tree, and is removed with it; a killed process cannot clean up).
    """
    marker = scratch / "pass-started"
    env = dict(os.environ, GRAPHOPT_TEST_MARKER=str(marker), TMPDIR=str(scratch))
    proc = subprocess.Popen(
        [str(GRAPHOPT_SCRIPT), "optimize", str(src), "-o", str(tmp_path / "out" / "o.onnx"),
         "--no-latency", "--passes", "sleepy", "--plugin", str(PLUGINS / "sleepy.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the sleepy pass never started:\n{out}\n{err}")
        time.sleep(0.05)
    marker.unlink()
    return proc, marker


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside ``tmp_path`` (so outside the guarded tree)."""
    return tmp_path_factory.mktemp("scratch")


def test_sigint_real_process_exits_130(tmp_path: Path, scratch: Path) -> None:
    src = _inputs(tmp_path)
    guard = TreeGuard(tmp_path).freeze()
    proc, _ = _start_sleepy(tmp_path, src, scratch)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert_one_line_error(CliResult(proc.returncode, out, err), 130, "interrupted")
    guard.assert_unchanged()


def test_kill_real_process_leaves_inputs_and_destination(tmp_path: Path, scratch: Path) -> None:
    """SIGKILL cannot be handled: nothing may have been written to the destination yet, and
    the input keeps its bytes."""
    src = _inputs(tmp_path)
    guard = TreeGuard(tmp_path).freeze()
    proc, _ = _start_sleepy(tmp_path, src, scratch)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    guard.assert_unchanged()
