"""The ``graphopt`` command line: thin click commands over the library.

Every failure ends in one line on stderr and a documented exit code (see
:mod:`graphopt.cli.exit_codes`); ``--json-errors`` prints the same as JSON and ``--debug``
adds the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from graphopt.cli.exit_codes import ExitCode
from graphopt.errors import GraphoptError, UsageError

logger = logging.getLogger("graphopt.cli")
F = TypeVar("F", bound=Callable[..., Any])

_state: dict[str, Any] = {"debug": False, "json_errors": False, "reproducer": None}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record as one line to the *current* ``sys.stderr`` (never wrapped)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # Warnings and errors are one line each; -v/-vv progress and dumps may span lines.
        return " ".join(text.split()) if record.levelno >= logging.WARNING else text


def _not_reported_twice(record: logging.LogRecord) -> bool:
    # A pass crash and its reproducer folder are reported in the CLI's own error line;
    # the crash-reproducer instrument's log record would say the same again.
    return not (record.name == "graphopt.infra.instruments" and record.levelno >= logging.ERROR)


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True), show_time=False, show_path=verbose > 1, markup=False
        )
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        # Not a terminal (a log file, CI, another program): one plain line per record, so
        # that warnings are never wrapped over several lines.
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("graphopt: %(levelname)s: %(name)s: %(message)s"))
    handler.addFilter(_not_reported_twice)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party libraries stay quiet unless -vv.
    for name in ("onnxscript", "onnx_ir", "onnxruntime"):
        logging.getLogger(name).setLevel(level if verbose > 1 else logging.WARNING)


def _console() -> Console:
    """Stdout console; 120 columns when stdout is not a terminal (pipes, CI logs)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def common_options(func: F) -> F:
    """-v/--verbose, --debug and --json-errors on every command."""

    @click.option("-v", "--verbose", count=True, help="-v for progress, -vv for debug logs.")
    @click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
    @click.option("--json-errors", is_flag=True, help="Print errors as one JSON line.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int, debug: bool, json_errors: bool, **kwargs: Any) -> Any:
        _state["debug"] = debug
        _state["json_errors"] = json_errors
        _setup_logging(verbose)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def plugin_options(func: F) -> F:
    """--no-plugins and --plugin FILE."""

    @click.option("--no-plugins", is_flag=True, help="Do not load third-party plugins.")
    @click.option(
        "--plugin",
        "plugin_files",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Load a plugin from a .py file (repeatable).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.isdigit() or int(size) < 1:
            raise UsageError(f"--dim {item!r}: expected NAME=SIZE with SIZE a positive integer")
        dims[name] = int(size)
    return dims


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise UsageError(f"--max-memory {text!r}: expected a size such as 4G or 512M") from None
    if value <= 0:
        raise UsageError(f"--max-memory {text!r}: must be positive")
    return int(value * mult)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
def cli() -> None:
    """graphopt: compress and speed up ONNX models with verified graph transformations."""


TOLERANCE_CHOICES = ["exact", "fusion", "fp16", "quantized", "weight-only", "pruned"]


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .onnx.")
@click.option("--passes", default="default", show_default=True, help="Pipeline text.")
@click.option("--target", type=click.Choice(["ort", "tensorrt", "ext", "portable"]), default="ort",
              show_default=True, help="Backend whose policies and ops are used.")
@click.option("--calib", type=click.Path(path_type=Path), help=".npz or folder of .npz feeds.")
@click.option("--inputs", type=click.Path(path_type=Path),
              help="Verification inputs: .npz (one feed) or folder of .npz.")
@click.option("--dim", "dims", multiple=True, help="Symbolic dimension size, NAME=SIZE.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--in-place", is_flag=True, help="Allow the output to be the input.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime comparison (unsafe).")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--tolerance", type=click.Choice(TOLERANCE_CHOICES),
              help="Override the pipeline's verification tolerance.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--verify-each", is_flag=True, help="Run the ONNX checker after every pass.")
@click.option("--print-after-change", is_flag=True, help="Log the graph after changing passes.")
@click.option("--explain", is_flag=True,
              help="Per fusion rule: times fired, and the closest miss of rules that never fired.")
@click.option("--max-memory", help="Memory limit such as 8G; exceeding it exits with 6.")
@click.option("--threads", type=int, default=2, show_default=True,
              help="ONNX Runtime threads for verification and latency.")
@plugin_options
@common_options
def optimize(
    input_path: Path,
    output: Path,
    passes: str,
    target: str,
    calib: Path | None,
    inputs: Path | None,
    dims: tuple[str, ...],
    report: Path | None,
    overwrite: bool,
    in_place: bool,
    no_verify: bool,
    no_latency: bool,
    tolerance: str | None,
    seed: int,
    verify_each: bool,
    print_after_change: bool,
    explain: bool,
    max_memory: str | None,
    threads: int,
    no_plugins: bool,
    plugin_files: tuple[Path, ...],
) -> None:
    """Run a pipeline of passes on IN, verify the result, write it to OUTPUT."""
    from graphopt.api import OptimizeConfig
    from graphopt.api import optimize as run_optimize

    repro = Path(tempfile.mkdtemp(prefix="graphopt-repro-"))
    _state["reproducer"] = repro
    cfg = OptimizeConfig(
        passes=passes,
        target=target,
        calib=calib,
        inputs=inputs,
        dims=_parse_dims(dims),
        report=report,
        overwrite=overwrite,
        in_place=in_place,
        verify=not no_verify,
        latency=not no_latency,
        tolerance=tolerance,
        plugins=not no_plugins,
        plugin_files=plugin_files,
        seed=seed,
        verify_each=verify_each,
        print_after_change=print_after_change,
        explain=explain,
        reproducer_dir=repro,
        max_memory=_parse_size(max_memory),
        threads=threads,
    )
    result = run_optimize(input_path, output, cfg)
    _cleanup_reproducer()
    console = _console()
    result.render(console)
    if explain:
        from graphopt.cli.explain import render_explain

        render_explain(result.passes, console)


@cli.command()
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@common_options
def inspect(input_path: Path, as_json: bool) -> None:
    """Summarise a model: versions, I/O, op histogram, parameters, external data."""
    from graphopt.cli.inspect_cmd import describe, render_description

    info = describe(input_path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        render_description(info, _console())


@cli.command(name="passes")
@plugin_options
@common_options
def list_passes(no_plugins: bool, plugin_files: tuple[Path, ...]) -> None:
    """List every registered pass with its options, and the named pipelines."""
    from graphopt.cli.inspect_cmd import render_registry
    from graphopt.infra.registry import default_registry

    registry = default_registry(plugins=not no_plugins, plugin_files=plugin_files)
    render_registry(registry, _console())


@cli.command()
@click.argument("model_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("model_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz or folder of .npz.")
@click.option("--dim", "dims", multiple=True, help="Symbolic dimension size, NAME=SIZE.")
@click.option("--tolerance", type=click.Choice(TOLERANCE_CHOICES),
              default="fusion", show_default=True)
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--per-layer", is_flag=True,
              help="SQNR of every intermediate value both models compute, worst first.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="With --per-layer: .npz or folder of .npz feeds to run.")
@click.option("--samples", type=int, default=16, show_default=True,
              help="With --per-layer: feeds used.")
@click.option("--top", type=int, default=20, show_default=True,
              help="With --per-layer: table rows shown.")
@click.option("--json", "as_json", is_flag=True, help="With --per-layer: print JSON.")
@common_options
def compare(
    model_a: Path,
    model_b: Path,
    inputs: Path | None,
    dims: tuple[str, ...],
    tolerance: str,
    no_latency: bool,
    threads: int,
    seed: int,
    per_layer: bool,
    calib: Path | None,
    samples: int,
    top: int,
    as_json: bool,
) -> None:
    """Compare two models: output agreement, size and latency side by side.

    With --per-layer --calib DATA: the SQNR of every intermediate value computed under
    the same name in both models (which layer broke it?). Exits with 5 when the outputs
    disagree beyond the tolerance.
    """
    from graphopt.cli.compare_cmd import run_compare, run_per_layer_compare

    if per_layer:
        run_per_layer_compare(model_a, model_b, calib=calib, samples=samples, top=top,
                              as_json=as_json, threads=threads, console=_console())
        return

    passed = run_compare(
        model_a,
        model_b,
        inputs=inputs,
        dims=_parse_dims(dims),
        tolerance=tolerance,
        latency=not no_latency,
        threads=threads,
        seed=seed,
        console=_console(),
    )
    if not passed:
        raise SystemExit(int(ExitCode.VERIFICATION))


def _cleanup_reproducer() -> None:
    import shutil

    repro = _state.get("reproducer")
    if repro is not None:
        shutil.rmtree(repro, ignore_errors=True)
        _state["reproducer"] = None


def _emit_error(code: int, kind: str, message: str, reproducer: Path | None = None) -> None:
    line = " ".join(message.split())
    if reproducer is not None:
        line += f"; reproducer written to {reproducer}"
    if _state["json_errors"]:
        payload: dict[str, Any] = {"error": kind, "exit_code": code, "message": line}
        if reproducer is not None:
            payload["reproducer"] = str(reproducer)
        sys.stderr.write(json.dumps(payload) + "\n")
    else:
        sys.stderr.write(f"graphopt: error: {line}\n")


def _take_reproducer() -> Path | None:
    """The reproducer folder if a crash filled it; it is then kept (not cleaned up)."""
    repro = _state.get("reproducer")
    if repro is not None and Path(repro).is_dir() and any(Path(repro).iterdir()):
        _state["reproducer"] = None
        return Path(repro)
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI and returns the exit code (also the console-script entry point)."""
    _state.update(debug=False, json_errors=False, reproducer=None)
    args = list(sys.argv[1:] if argv is None else argv)
    # Read the error flags early so that usage errors honour them too.
    _state["json_errors"] = "--json-errors" in args
    _state["debug"] = "--debug" in args
    code: int
    try:
        cli.main(args=args, prog_name="graphopt", standalone_mode=False)
        code = ExitCode.OK
    except click.exceptions.Exit as e:
        code = int(e.exit_code)
    except click.exceptions.Abort:
        _emit_error(ExitCode.INTERRUPTED, "Interrupted", "interrupted; nothing published")
        code = ExitCode.INTERRUPTED
    except click.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        _emit_error(ExitCode.USAGE, "UsageError", where + e.format_message())
        code = ExitCode.USAGE
    except click.ClickException as e:
        _emit_error(ExitCode.USAGE, "UsageError", e.format_message())
        code = ExitCode.USAGE
    except GraphoptError as e:
        if _state["debug"]:
            traceback.print_exc()
        repro = _take_reproducer() if e.exit_code == ExitCode.INTERNAL else None
        _emit_error(e.exit_code, type(e).__name__, str(e), repro)
        code = e.exit_code
    except KeyboardInterrupt:
        _emit_error(ExitCode.INTERRUPTED, "Interrupted", "interrupted; nothing published")
        code = ExitCode.INTERRUPTED
    except MemoryError:
        _emit_error(ExitCode.RESOURCE, "ResourceLimitError", "out of memory; nothing published")
        code = ExitCode.RESOURCE
    except SystemExit as e:
        code = int(e.code) if isinstance(e.code, int) else ExitCode.INTERNAL
    except Exception as e:  # noqa: BLE001 - a bug: reported as an internal error, exit code set
        if _state["debug"]:
            traceback.print_exc()
        _emit_error(
            ExitCode.INTERNAL,
            "InternalError",
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            _take_reproducer(),
        )
        code = ExitCode.INTERNAL
    finally:
        if _state.get("reproducer") is not None:
            _cleanup_reproducer()
    return int(code)


def entry() -> None:
    """Console-script wrapper that exits with :func:`main`'s code."""
    raise SystemExit(main())
