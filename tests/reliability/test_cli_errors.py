"""RELIABILITY.md, exit codes: usage errors, pipeline text, plugins, internal errors and
``--json-errors``."""

from __future__ import annotations

import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
from reliability_support import (
    CliResult,
    TreeGuard,
    assert_json_error,
    assert_one_line_error,
    run_script,
    save_model,
    sha256,
    simple_model,
)

Cli = Callable[..., CliResult]
PLUGINS = Path(__file__).with_name("plugins")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A valid model in ``tmp_path/in`` and an empty ``tmp_path/out``."""
    (tmp_path / "out").mkdir()
    return save_model(simple_model(), tmp_path / "in" / "m.onnx")


def _optimize(cli: Cli, src: Path, *extra: str | Path) -> CliResult:
    return cli("optimize", src, "-o", src.parent.parent / "out" / "o.onnx", "--no-latency", *extra)


# ------------------------------------------------------------------- pipeline text


@pytest.mark.parametrize(
    ("text", "column"),
    [("cleanup(", 9), ("cleanup,,cleanup", 9), ("cleanup(max_iter=)", 18), ("clean up", 7)],
)
def test_bad_pipeline_text_exits_2_naming_the_column(
    cli: Cli, guard: TreeGuard, src: Path, text: str, column: int
) -> None:
    guard.freeze()
    line = assert_one_line_error(_optimize(cli, src, "--passes", text), 2, "column")
    assert re.search(r"column (\d+)", line), line
    assert f"column {column}" in line, line
    guard.assert_unchanged()


def test_unknown_pass_exits_2(cli: Cli, guard: TreeGuard, src: Path) -> None:
    guard.freeze()
    result = _optimize(cli, src, "--passes", "cleanup,no-such-pass")
    assert_one_line_error(result, 2, "unknown pass 'no-such-pass'", "column 9")
    guard.assert_unchanged()


def test_unknown_pass_suggests_a_close_name(cli: Cli, guard: TreeGuard, src: Path) -> None:
    guard.freeze()
    assert_one_line_error(_optimize(cli, src, "--passes", "clenaup"), 2, "did you mean 'cleanup'")
    guard.assert_unchanged()


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        (["--dim", "batch"], "--dim 'batch'"),
        (["--dim", "batch=0"], "--dim 'batch=0'"),
        (["--max-memory", "lots"], "--max-memory 'lots'"),
        (["--target", "gpu"], "--target"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--threads", "many"], "--threads"),
    ],
)
def test_bad_flags_exit_2(
    cli: Cli, guard: TreeGuard, src: Path, flag: list[str], needle: str
) -> None:
    guard.freeze()
    assert_one_line_error(_optimize(cli, src, *flag), 2, needle)
    guard.assert_unchanged()


def test_missing_required_output_exits_2(cli: Cli, src: Path) -> None:
    assert_one_line_error(cli("optimize", src), 2, "--output")


def test_unknown_command_exits_2(cli: Cli) -> None:
    assert_one_line_error(cli("optimise"), 2, "optimise")


# ------------------------------------------------------------------- plugins


def test_plugin_with_wrong_api_version_exits_2(cli: Cli, guard: TreeGuard, src: Path) -> None:
    guard.freeze()
    result = _optimize(cli, src, "--plugin", PLUGINS / "bad_api.py")
    assert_one_line_error(result, 2, "bad_api.py", "API version 99")
    guard.assert_unchanged()


@pytest.mark.parametrize(
    ("files", "name"),
    [(["dup_builtin.py"], "'default'"), (["noop.py", "noop_again.py"], "'noop'")],
    ids=["same-as-builtin", "two-plugins"],
)
def test_plugin_with_duplicate_name_exits_2(
    cli: Cli, guard: TreeGuard, src: Path, files: list[str], name: str
) -> None:
    guard.freeze()
    plugin_args = [a for f in files for a in ("--plugin", PLUGINS / f)]
    result = _optimize(cli, src, "--passes", "cleanup", *plugin_args)
    assert_one_line_error(result, 2, name, "already registered")
    guard.assert_unchanged()


def test_missing_plugin_file_exits_2(cli: Cli, src: Path) -> None:
    result = _optimize(cli, src, "--plugin", PLUGINS / "nope.py")
    assert_one_line_error(result, 2, "nope.py")


def test_passes_command_reports_plugin_errors(cli: Cli) -> None:
    assert_one_line_error(cli("passes", "--plugin", PLUGINS / "bad_api.py"), 2, "API version 99")


# ------------------------------------------------------------------- internal errors


@pytest.fixture
def repro_dirs() -> Iterator[list[Path]]:
    """Reproducer folders to delete after the test (they live in the system temp dir)."""
    found: list[Path] = []
    yield found
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)


def _repro_dir(line: str) -> Path:
    match = re.search(r"reproducer written to (\S+)", line)
    assert match, f"no reproducer path in: {line}"
    return Path(match.group(1).rstrip(";,)"))


def test_internal_error_exits_1_with_a_reproducer(
    cli: Cli, guard: TreeGuard, src: Path, repro_dirs: list[Path]
) -> None:
    src_digest = sha256(src)
    guard.freeze()
    result = _optimize(cli, src, "--passes", "boom", "--plugin", PLUGINS / "boom.py")
    line = assert_one_line_error(result, 1, "boom", "RuntimeError", "boom pass exploded")
    repro = _repro_dir(line)
    repro_dirs.append(repro)
    guard.assert_unchanged()
    assert sorted(p.name for p in repro.iterdir()) == ["repro.onnx", "repro.pipeline"]
    assert (repro / "repro.pipeline").read_text().strip() == "boom"
    # The reproducer is the model the pipeline started from (onnx-ir adds value_info for
    # initializers when it serializes; everything else is the same)...
    got, want = onnx.load(str(repro / "repro.onnx")), onnx.load(str(src))
    for field in ("node", "initializer", "input", "output"):
        assert list(getattr(got.graph, field)) == list(getattr(want.graph, field)), field
    assert sha256(src) == src_digest
    # ...and reproduces the crash.
    again = cli(
        "optimize", repro / "repro.onnx", "-o", src.parent.parent / "out" / "o.onnx",
        "--passes", (repro / "repro.pipeline").read_text().strip(),
        "--plugin", PLUGINS / "boom.py",
    )
    repro_dirs.append(_repro_dir(assert_one_line_error(again, 1, "boom pass exploded")))
    guard.assert_unchanged()


def test_internal_error_traceback_only_with_debug(
    cli: Cli, src: Path, repro_dirs: list[Path]
) -> None:
    result = _optimize(cli, src, "--passes", "boom", "--plugin", PLUGINS / "boom.py", "--debug")
    assert result.code == 1
    assert "Traceback" in result.err
    errors = [line for line in result.err_lines if line.startswith("graphopt: error: ")]
    assert len(errors) == 1, result.err
    repro_dirs.append(_repro_dir(errors[0]))


def test_internal_error_real_process(src: Path, repro_dirs: list[Path]) -> None:
    result = run_script(
        ["optimize", src, "-o", src.parent.parent / "out" / "o.onnx", "--no-latency",
         "--passes", "boom", "--plugin", PLUGINS / "boom.py"]
    )
    line = assert_one_line_error(result, 1, "boom pass exploded")
    repro = _repro_dir(line)
    repro_dirs.append(repro)
    assert (repro / "repro.onnx").is_file() and (repro / "repro.pipeline").is_file()
    assert list((src.parent.parent / "out").iterdir()) == []


# ------------------------------------------------------------------- --json-errors


def _json_cases(tmp: Path) -> dict[str, tuple[list[str | Path], int, str]]:
    (tmp / "out").mkdir(exist_ok=True)
    good = save_model(simple_model(), tmp / "good.onnx")
    pickled = tmp / "pickled.onnx"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    conflict = tmp / "out" / "exists.onnx"
    conflict.write_bytes(b"x")
    out = tmp / "out" / "o.onnx"
    return {
        "usage": (["optimize", tmp / "missing.onnx", "-o", out], 2, "missing.onnx"),
        "pipeline": (["optimize", good, "-o", out, "--passes", "cleanup("], 2, "column 9"),
        "invalid": (["optimize", pickled, "-o", out], 3, "pickle"),
        "conflict": (["optimize", good, "-o", conflict], 7, "exists.onnx"),
        "click-usage": (["optimize", good], 2, "--output"),
        "internal": (["optimize", good, "-o", out, "--passes", "boom", "--plugin",
                      PLUGINS / "boom.py"], 1, "boom pass exploded"),
    }


@pytest.mark.parametrize(
    "case", ["usage", "pipeline", "invalid", "conflict", "click-usage", "internal"]
)
def test_json_errors_one_json_line_with_the_exit_code(
    cli: Cli, tmp_path: Path, case: str, repro_dirs: list[Path]
) -> None:
    argv, code, needle = _json_cases(tmp_path)[case]
    guard = TreeGuard(tmp_path).freeze()
    payload = assert_json_error(cli(*argv, "--no-latency", "--json-errors"), code, needle)
    if code == 1:
        assert "reproducer" in payload, payload
        repro_dirs.append(Path(str(payload["reproducer"])))
    guard.assert_unchanged()


def test_json_errors_real_process(tmp_path: Path) -> None:
    argv, code, needle = _json_cases(tmp_path)["invalid"]
    assert_json_error(run_script([*argv, "--json-errors"]), code, needle)
