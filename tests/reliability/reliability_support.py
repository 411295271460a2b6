"""Shared helpers of the reliability suite: tiny models, CLI drivers, file-tree guards.

The suite checks the promises of ``RELIABILITY.md`` that concern loading, saving and the
command line. Every failing run is checked the same way (see :func:`assert_failed`): the
exit code, exactly one line on stderr naming the file/tensor/value (no traceback, no
protobuf dump), and a byte-identical folder tree afterwards — which covers "nothing written
at the destination", "no ``.graphopt-stage-*`` folder left" and "the input files keep their
bytes" at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

#: The installed console script (same virtual environment as the running interpreter).
GRAPHOPT_SCRIPT = Path(sys.executable).with_name("graphopt")
STAGE_PREFIX = ".graphopt-stage-"
OPSET = 18
IR_VERSION = 9

# Substrings that betray a traceback or a protobuf text dump in an error message.
_DUMP_MARKERS = ("Traceback", 'File "', "ir_version:", "graph {", "node {", "dims:", "raw_data:")


# --------------------------------------------------------------------------- CLI drivers


@dataclass(frozen=True)
class CliResult:
    """What one ``graphopt`` invocation produced.

    Attributes:
        code: The exit code.
        out: Everything written to stdout.
        err: Everything written to stderr.
    """

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.err.splitlines() if line.strip()]


def run_in_process(argv: Sequence[str | os.PathLike[str]], capsys: object) -> CliResult:
    """Runs ``graphopt.cli.main.main(argv)`` in this process and captures its output.

    Args:
        argv: Arguments after ``graphopt``.
        capsys: pytest's ``capsys`` fixture.

    Returns:
        The exit code and the captured streams.
    """
    from graphopt.cli.main import main

    capsys.readouterr()  # type: ignore[attr-defined]  # drop anything captured before
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()  # type: ignore[attr-defined]
    return CliResult(code, captured.out, captured.err)


def run_script(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> CliResult:
    """Runs the installed ``graphopt`` console script in a child process.

    Args:
        argv: Arguments after ``graphopt``.
        env: Extra environment variables.
        timeout: Seconds before the child is killed.

    Returns:
        The real process exit code and its output.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("COLUMNS", "200")
    proc = subprocess.run(
        [str(GRAPHOPT_SCRIPT), *map(str, argv)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(
    result: CliResult, code: int, *needles: str, warnings_ok: bool = False
) -> str:
    """Asserts the exit code and that stderr is one clean line containing every needle.

    Args:
        result: The run.
        code: The expected exit code.
        needles: Substrings the error line must contain (file, tensor, value...).
        warnings_ok: Allow one-line ``graphopt: WARNING:`` log records before the error
            (for runs where a pass legitimately warned before the failure).

    Returns:
        The error line.
    """
    assert result.code == code, (
        f"exit code {result.code}, expected {code}\nstdout:\n{result.out}\nstderr:\n{result.err}"
    )
    lines = result.err_lines
    if warnings_ok:
        lines = [line for line in lines if not line.startswith("graphopt: WARNING: ")]
    assert len(lines) == 1, f"stderr must be exactly one line, got {len(lines)}:\n{result.err}"
    line = lines[0]
    for marker in _DUMP_MARKERS:
        assert marker not in line, f"stderr looks like a traceback or protobuf dump: {line}"
    assert len(line) < 2000, f"error line is {len(line)} characters long"
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line: {line}"
    return line


def assert_json_error(result: CliResult, code: int, *needles: str) -> dict[str, object]:
    """Asserts ``--json-errors`` output: one JSON line carrying the exit code."""
    assert result.code == code, result.err
    lines = result.err_lines
    assert len(lines) == 1, result.err
    payload = json.loads(lines[0])
    assert payload["exit_code"] == code
    assert isinstance(payload["error"], str) and payload["error"]
    for needle in needles:
        assert needle in payload["message"], payload
    return payload


# ----------------------------------------------------------------------- audit-hook spy
# Audit hooks cannot be removed once added, so one hook is installed for the session and
# records events only while a test has switched it on.
_SPY: dict[str, Any] = {
    "active": False, "installed": False, "opened": [], "modes": [], "mmaps": [], "unpickled": []
}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _SPY["active"]:
        return
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _SPY["opened"].append(os.fsdecode(args[0]))
        _SPY["modes"].append((os.fsdecode(args[0]), args[1], args[2]))
    elif event == "mmap.__new__":
        _SPY["mmaps"].append(args)
    elif event == "pickle.find_class":
        _SPY["unpickled"].append(f"{args[0]}.{args[1]}")


def _install_audit_hook() -> None:
    if not _SPY["installed"]:
        sys.addaudithook(_audit)
        _SPY["installed"] = True


class FileSpy:
    """What this process opened and unpickled while the spy was on."""

    @property
    def opened(self) -> list[str]:
        """Paths passed to ``open`` (Python-level opens: builtins, io, os)."""
        return list(_SPY["opened"])

    @property
    def unpickled(self) -> list[str]:
        """Globals the pickle machinery looked up (any unpickling shows here)."""
        return list(_SPY["unpickled"])

    def start(self) -> None:
        """Clears the records and starts recording."""
        _install_audit_hook()
        self.clear()
        _SPY["active"] = True

    def freeze(self) -> None:
        """Stops recording (what was recorded stays readable)."""
        _SPY["active"] = False

    def clear(self) -> None:
        """Forgets what was recorded so far (call after the test's own set-up)."""
        for key in ("opened", "modes", "mmaps", "unpickled"):
            _SPY[key].clear()

    def writable_opens(self, paths: Iterable[Path]) -> list[tuple[str, object, int]]:
        """Opens of any of ``paths`` (resolved) that could write: a mode with w/a/x/+ or
        flags with O_WRONLY/O_RDWR/O_APPEND/O_CREAT/O_TRUNC."""
        targets = {p.resolve() for p in paths}
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        bad = []
        for path, mode, flags in _SPY["modes"]:
            if Path(path).resolve() not in targets:
                continue
            if (isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & write_flags:
                bad.append((path, mode, flags))
        return bad

    @property
    def mmaps(self) -> list[tuple[Any, ...]]:
        """``mmap.mmap`` calls: (fileno, length, access, offset)."""
        return list(_SPY["mmaps"])

    def opened_resolved(self) -> set[Path]:
        """Resolved paths of everything opened."""
        return {Path(p).resolve() for p in self.opened}


# --------------------------------------------------------------------------- file trees


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(root: Path) -> dict[str, str]:
    """Maps every entry under ``root`` (relative path) to its kind and content hash.

    Links are recorded by target (never followed), folders by their presence, files by
    their SHA-256 and permission bits.
    """
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:
            p = base / name
            rel = str(p.relative_to(root))
            state[rel] = f"link->{os.readlink(p)}" if p.is_symlink() else "dir"
        for name in filenames:
            p = base / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = f"link->{os.readlink(p)}"
            else:
                mode = oct(p.stat().st_mode & 0o777)
                try:
                    state[rel] = f"file {mode} {sha256(p)}"
                except PermissionError:
                    state[rel] = f"file {mode} unreadable"
    return state


def stage_folders(root: Path) -> list[Path]:
    """Every ``.graphopt-stage-*`` folder under ``root``."""
    return sorted(p for p in root.rglob(f"{STAGE_PREFIX}*"))


class TreeGuard:
    """Freezes a folder tree and checks afterwards what changed.

    Args:
        root: The folder holding the inputs and the destination.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.before: dict[str, str] = {}

    def freeze(self) -> TreeGuard:
        """Records the current state (call after writing the inputs)."""
        self.before = tree_state(self.root)
        return self

    def assert_unchanged(self) -> None:
        """Nothing added, removed or modified: the state of a failed run."""
        after = tree_state(self.root)
        added = sorted(set(after) - set(self.before))
        removed = sorted(set(self.before) - set(after))
        changed = sorted(k for k in self.before if k in after and after[k] != self.before[k])
        assert not (added or removed or changed), (
            f"folder tree changed: added={added} removed={removed} changed={changed}"
        )

    def assert_inputs_intact(self, inputs: Iterable[Path]) -> None:
        """The given files keep their bytes, and no stage folder is left anywhere."""
        after = tree_state(self.root)
        for p in inputs:
            rel = str(p.relative_to(self.root))
            assert rel in after, f"input {rel} disappeared"
            assert after[rel] == self.before[rel], f"input {rel} changed"
        assert not stage_folders(self.root), stage_folders(self.root)


# --------------------------------------------------------------------------- models


def finish_model(
    graph: onnx.GraphProto,
    *,
    opsets: Mapping[str, int] | None = None,
    ir_version: int = IR_VERSION,
    functions: Sequence[onnx.FunctionProto] = (),
    check: bool = True,
) -> onnx.ModelProto:
    """Wraps a graph into a model with fixed versions (optionally checked).

    Args:
        graph: The main graph.
        opsets: Domain -> version; ``{"": 18}`` when omitted.
        ir_version: The model's IR version.
        functions: Model-local functions.
        check: Run the full ONNX checker on the result.
    """
    ops = dict(opsets or {"": OPSET})
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in ops.items()],
        functions=list(functions),
        producer_name="graphopt-tests",
    )
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def simple_model(weight_elems: int = 4) -> onnx.ModelProto:
    """``y = Relu(x + w)`` with ``x: float[1, N]`` and an initializer ``w`` of N floats.

    Args:
        weight_elems: N; 1024 or more gives a tensor that goes to external data.
    """
    w = (np.arange(weight_elems, dtype=np.float32) - weight_elems / 2) / 7
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "w"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        "simple",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_elems])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight_elems])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return finish_model(graph)


def save_model(
    model: onnx.ModelProto,
    path: Path,
    *,
    external: bool = False,
    location: str | None = None,
) -> Path:
    """Writes a model, optionally with its large tensors in ``<name>.data``.

    External data is written here rather than by ``onnx.save``, which checks for an
    existing data file relative to the current directory instead of the model's folder.

    Args:
        model: The model (copied; the argument is not changed).
        path: Destination ``.onnx``.
        external: Store initializers of 1 KiB or more in an external data file.
        location: External data file name (relative); ``<name>.data`` by default.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if external:
        location = location or path.name + ".data"
        blob = bytearray()
        for tensor in copy.graph.initializer:
            raw = numpy_helper.to_array(tensor).tobytes()
            if len(raw) < 1024:
                continue
            offset = len(blob)
            blob += raw
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)),
                               ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        (path.parent / location).write_bytes(bytes(blob))
    path.write_bytes(copy.SerializeToString())
    return path


def set_external_location(model_path: Path, tensor: str, location: str) -> None:
    """Rewrites the ``location`` of one external tensor in a saved model (in place)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.name == tensor:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location
            break
    else:
        raise KeyError(tensor)
    model_path.write_bytes(proto.SerializeToString())


def ort_run(
    model: Path | bytes, feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """Runs a model on ONNX Runtime CPU with graph optimizations off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, dict(feeds))]


def load_full(path: Path) -> onnx.ModelProto:
    """Loads a model with its external data inlined (for field-by-field comparisons)."""
    return onnx.load(str(path), load_external_data=True)
