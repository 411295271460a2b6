"""The sweep over the onnx package's bundled backend test models.

Every model under ``onnx/backend/test/data/{light,pytorch-converted,pytorch-operator,simple}``
goes through ``graphopt optimize --passes cleanup --no-latency --inputs feed.npz`` (the
library call, in process) and the optimized model's ONNX Runtime outputs are compared with
the reference outputs stored beside it. Shared by ``tests/e2e/test_backend_models.py`` and
``tools/backend_sweep.py`` (which writes ``docs/backend_sweep.md``).

Inputs and references:

* folder cases (``<kind>/<name>/model.onnx``): ``test_data_set_0/input_<i>.pb`` feeds the
  *i*-th graph input that is not an initializer, ``output_<i>.pb`` is the *i*-th output;
* ``light`` cases (``light/light_<name>.onnx``) ship only ``light_<name>_output_0.pb``: the
  onnx backend runner feeds them ``arange(n).reshape(shape) / n`` as float32 with symbolic
  dimensions set to 1, and so does this module.

Tolerance: per case, ``rtol`` as the onnx backend runner uses it (1e-3; 2e-3 for
densenet121; a case's ``data.json`` may override it) and ``atol = max(case atol, 1e-5)``.
The runner's own ``atol`` of 1e-7 is an absolute floor below float32 rounding for outputs
near zero, which ONNX Runtime's kernels (a different summation order from the framework
that wrote the references) do not always meet on the *original* model; 1e-5 keeps the
check about the transformation. The optimized model is in addition compared with the
original on ONNX Runtime, where ``cleanup`` (an exact pipeline) must be bit-identical.

A case is *skipped*, with the reason, when ONNX Runtime cannot load or run the original, when
its output for the original already differs from the reference, or when an input is not a
tensor (``--inputs`` takes ``.npz`` tensors). Everything else must *match*.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: The folders of ``onnx/backend/test/data`` the sweep covers (``node/`` is not swept).
KINDS = ("light", "pytorch-converted", "pytorch-operator", "simple")
#: Default tolerances of the onnx backend runner (``onnx/backend/test/loader``).
BACKEND_RTOL = 1e-3
BACKEND_ATOL = 1e-7
#: The absolute floor this sweep uses (see the module docstring).
SWEEP_ATOL = 1e-5
#: Per-model rtol overrides of the onnx backend runner for the light models.
_LIGHT_RTOL = {"densenet121": 2e-3}

MATCHED = "matched"
SKIPPED = "skipped"
FAILED = "failed"


def data_root() -> Path:
    """``onnx/backend/test/data`` of the installed onnx package."""
    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"


@dataclass(frozen=True)
class BackendCase:
    """One model of the onnx backend test data.

    Attributes:
        kind: Its folder (``light``, ``simple``...).
        name: The test name (``test_Conv2d``, ``light_resnet50``).
        model: The ``.onnx`` file.
        inputs: ``input_<i>.pb`` files in order (empty for light cases: generated).
        outputs: Reference ``output_<i>.pb`` files in order.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
    """

    kind: str
    name: str
    model: Path
    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]
    rtol: float
    atol: float

    @property
    def id(self) -> str:
        """``kind/name``: a stable test id."""
        return f"{self.kind}/{self.name}"


@dataclass
class CaseResult:
    """What happened to one case.

    Attributes:
        case: The case.
        status: ``matched``, ``skipped`` or ``failed``.
        reason: Why it was skipped or failed (one line), or ``""``.
        bit_exact: Whether the optimized outputs equal the original's bit for bit on ONNX
            Runtime (None when not compared).
        max_abs_err: Largest absolute difference from the reference (optimized model).
        nodes_before: Node count of the original (main graph).
        nodes_after: Node count of the optimized model (main graph).
        seconds: Wall time of the case.
    """

    case: BackendCase
    status: str
    reason: str = ""
    bit_exact: bool | None = None
    max_abs_err: float | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (for pytest's report and the docs)."""
        return {
            "id": self.case.id,
            "status": self.status,
            "reason": self.reason,
            "bit_exact": self.bit_exact,
            "max_abs_err": self.max_abs_err,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- discovery


def _folder_tolerance(case_dir: Path) -> tuple[float, float]:
    rtol, atol = BACKEND_RTOL, BACKEND_ATOL
    data_json = case_dir / "data.json"
    if data_json.is_file():
        data = json.loads(data_json.read_text())
        rtol = float(data.get("rtol", rtol))
        atol = float(data.get("atol", atol))
    return rtol, max(atol, SWEEP_ATOL)


def _numbered(folder: Path, prefix: str) -> tuple[Path, ...]:
    files = []
    i = 0
    while (folder / f"{prefix}_{i}.pb").is_file():
        files.append(folder / f"{prefix}_{i}.pb")
        i += 1
    return tuple(files)


def discover(kinds: Sequence[str] = KINDS, root: Path | None = None) -> list[BackendCase]:
    """Lists the cases of the given kinds, sorted by id.

    Args:
        kinds: Folders of the backend test data to include.
        root: The data folder (the installed onnx package's by default).
    """
    base = root or data_root()
    cases: list[BackendCase] = []
    for kind in kinds:
        folder = base / kind
        if not folder.is_dir():
            continue
        if kind == "light":
            for model in sorted(folder.glob("light_*.onnx")):
                short = model.stem[len("light_"):]
                cases.append(
                    BackendCase(
                        kind=kind,
                        name=model.stem,
                        model=model,
                        inputs=(),
                        outputs=_numbered(folder, model.stem + "_output")
                        if (folder / f"{model.stem}_output_0.pb").is_file()
                        else (),
                        rtol=_LIGHT_RTOL.get(short, BACKEND_RTOL),
                        atol=SWEEP_ATOL,
                    )
                )
            continue
        for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            model = case_dir / "model.onnx"
            data = case_dir / "test_data_set_0"
            if not model.is_file() or not data.is_dir():
                continue
            rtol, atol = _folder_tolerance(case_dir)
            cases.append(
                BackendCase(
                    kind=kind,
                    name=case_dir.name,
                    model=model,
                    inputs=_numbered(data, "input"),
                    outputs=_numbered(data, "output"),
                    rtol=rtol,
                    atol=atol,
                )
            )
    return sorted(cases, key=lambda c: c.id)


# --------------------------------------------------------------------------- data


class NotATensor(Exception):
    """An input or output of a case that is not a tensor (sequence, map, optional)."""


def _fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _read_tensor(path: Path, value: onnx.ValueInfoProto, role: str) -> np.ndarray:
    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value") or "unknown"
        raise NotATensor(f"{role} '{value.name}' is a {kind.replace('_type', '')}, not a tensor")
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    array = numpy_helper.to_array(tensor)
    if array.dtype == object:  # strings: as fixed-width unicode, which .npz keeps unpickled
        flat = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.flat]
        array = np.array(flat, dtype=str).reshape(array.shape)
    return array


def _light_input(value: onnx.ValueInfoProto) -> np.ndarray:
    """What the onnx backend runner feeds a light model: ``arange(n) / n`` as float32."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise NotATensor(f"input '{value.name}' is not float32; light models take float32")
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim)
    n = int(np.prod(shape, dtype=np.int64))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def load_io(
    case: BackendCase, model: onnx.ModelProto | None = None
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The case's input feed and reference outputs.

    Raises:
        NotATensor: An input or output is not a tensor.
    """
    proto = model if model is not None else onnx.load(str(case.model), load_external_data=False)
    fed = _fed_inputs(proto)
    if case.kind == "light":
        feed = {v.name: _light_input(v) for v in fed}
    else:
        if len(case.inputs) > len(fed):
            raise NotATensor(f"{len(case.inputs)} input files for {len(fed)} graph inputs")
        feed = {v.name: _read_tensor(p, v, "input") for p, v in zip(case.inputs, fed)}
    outputs = list(proto.graph.output)
    expected = [_read_tensor(p, v, "output") for p, v in zip(case.outputs, outputs)]
    return feed, expected


# --------------------------------------------------------------------------- running


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+ \S+::\S+\([^)]*\)(::<lambda[^>]*>)?\S* ")


def _first_line(error: BaseException) -> str:
    """The error on one line, without ONNX Runtime's source locations, at most 240 chars."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = _ORT_PREFIX.sub(r"\1: ", text)
    text = _SOURCE_LOCATION.sub("", text)
    text = re.sub(r"Load model from \S+ failed:", "", text).strip()
    return text if len(text) <= 240 else text[:237] + "..."


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in _session(path).run(None, feed)]


def compare(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], rtol: float, atol: float
) -> tuple[str | None, float]:
    """Compares outputs with references.

    Returns:
        (None if they agree else a one-line reason, the largest absolute difference).
    """
    worst = 0.0
    if len(got) < len(want):
        return f"{len(got)} outputs, {len(want)} references", float("inf")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i}: shape {g.shape}, reference {w.shape}", float("inf")
        if w.dtype.kind in "OUS":
            if not np.array_equal(g.astype(str), w.astype(str)):
                return f"output {i}: strings differ", float("inf")
            continue
        gf, wf = g.astype(np.float64), w.astype(np.float64)
        if gf.size:
            diff = np.abs(gf - wf)
            finite = np.isfinite(diff)
            worst = max(worst, float(diff[finite].max()) if finite.any() else 0.0)
        if not np.allclose(gf, wf, rtol=rtol, atol=atol, equal_nan=True):
            return f"output {i}: max abs error {worst:.3g} (rtol {rtol:g}, atol {atol:g})", worst
    return None, worst


def _bit_equal(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and
        (x.tobytes() == y.tobytes() if x.dtype.kind not in "OUS" else np.array_equal(x, y))
        for x, y in zip(a, b)
    )


def run_case(case: BackendCase, workdir: Path, *, threads: int = 1) -> CaseResult:
    """Optimizes one model with ``cleanup`` and checks it against the references.

    Args:
        case: The case.
        workdir: An empty folder for the feed and the optimized model.
        threads: ONNX Runtime threads for graphopt's verification.

    Returns:
        The result: matched, skipped (with the reason) or failed (with the reason).
    """
    from graphopt.api import OptimizeConfig, optimize
    from graphopt.errors import GraphoptError

    started = time.perf_counter()

    def done(status: str, reason: str = "", **kw: Any) -> CaseResult:
        return CaseResult(case, status, reason, seconds=time.perf_counter() - started, **kw)

    proto = onnx.load(str(case.model), load_external_data=False)
    nodes_before = len(proto.graph.node)
    if not case.outputs:
        return done(SKIPPED, "no reference outputs")
    try:
        feed, expected = load_io(case, proto)
    except NotATensor as e:
        return done(SKIPPED, f"{e}; --inputs takes .npz tensors")
    # ONNX Runtime raises its own exception types (pybind11), with no common base to name.
    try:
        session = _session(case.model)
    except Exception as e:  # noqa: BLE001
        return done(SKIPPED, f"ONNX Runtime cannot load the original: {_first_line(e)}")
    try:
        original = [np.asarray(o) for o in session.run(None, feed)]
    except Exception as e:  # noqa: BLE001
        return done(SKIPPED, f"ONNX Runtime cannot run the original: {_first_line(e)}")
    problem, _ = compare(original, expected, case.rtol, case.atol)
    if problem is not None:
        return done(SKIPPED, f"ONNX Runtime's output for the original differs from the "
                             f"reference: {problem}")

    npz = workdir / "feed.npz"
    np.savez(npz, **feed)  # type: ignore[arg-type]
    out = workdir / "out.onnx"
    try:
        optimize(
            case.model,
            out,
            OptimizeConfig(passes="cleanup", latency=False, inputs=npz, threads=threads),
        )
    except GraphoptError as e:
        return done(FAILED, f"graphopt optimize: {type(e).__name__}: {_first_line(e)}",
                    nodes_before=nodes_before)
    nodes_after = len(onnx.load(str(out), load_external_data=False).graph.node)
    try:
        optimized = _run(out, feed)
    except Exception as e:  # noqa: BLE001
        return done(FAILED, f"ONNX Runtime cannot run the optimized model: {_first_line(e)}",
                    nodes_before=nodes_before, nodes_after=nodes_after)
    problem, worst = compare(optimized, expected, case.rtol, case.atol)
    exact = _bit_equal(optimized, original)
    if problem is not None:
        return done(FAILED, f"optimized model differs from the reference: {problem}",
                    bit_exact=exact, max_abs_err=worst, nodes_before=nodes_before,
                    nodes_after=nodes_after)
    if not exact:
        return done(FAILED, "optimized outputs are not bit-identical to the original's "
                            "(cleanup is an exact pipeline)", bit_exact=False, max_abs_err=worst,
                    nodes_before=nodes_before, nodes_after=nodes_after)
    return done(MATCHED, bit_exact=True, max_abs_err=worst, nodes_before=nodes_before,
                nodes_after=nodes_after)


# --------------------------------------------------------------------------- summary


class Summary:
    """Counts over a sweep, built from :meth:`CaseResult.to_json` records (so that results
    gathered from several pytest-xdist workers can be summarised too).

    Args:
        records: One :meth:`CaseResult.to_json` dict per case.
        seconds: Wall time of the sweep (0 when unknown).
    """

    def __init__(self, records: Iterable[dict[str, Any]], seconds: float = 0.0) -> None:
        self.records = sorted(records, key=lambda r: str(r["id"]))
        self.seconds = seconds
        self.counts: Counter[str] = Counter(str(r["status"]) for r in self.records)

    @property
    def ran(self) -> int:
        """Cases optimized and compared (matched + failed)."""
        return self.counts[MATCHED] + self.counts[FAILED]

    def skip_reasons(self) -> Counter[str]:
        """Skip reasons, grouped."""
        return Counter(
            _reason_group(str(r["reason"])) for r in self.records if r["status"] == SKIPPED
        )

    def line(self) -> str:
        """One line: ``backend sweep: N cases, ran R, matched M, failed F, skipped S``."""
        return (
            f"backend sweep: {len(self.records)} cases, ran {self.ran}, matched "
            f"{self.counts[MATCHED]}, failed {self.counts[FAILED]}, skipped "
            f"{self.counts[SKIPPED]}"
        )

    def text(self) -> str:
        """A few lines for a terminal."""
        lines = [self.line()]
        for reason, n in sorted(self.skip_reasons().items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {n:3d}: {reason}")
        for r in self.records:
            if r["status"] == FAILED:
                lines.append(f"  FAILED {r['id']}: {r['reason']}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report written to ``docs/backend_sweep.md``."""
        import onnxruntime

        by_kind: dict[str, Counter[str]] = {}
        for r in self.records:
            by_kind.setdefault(str(r["id"]).split("/")[0], Counter())[str(r["status"])] += 1
        out = [
            "# Backend-model sweep",
            "",
            (
                "Generated by `tools/backend_sweep.py` (the same logic as "
                "`tests/e2e/test_backend_models.py`, in `graphopt/testing/backend_models.py`); "
                "do not edit by hand."
            ),
            "",
            (
                "Every model of the onnx package's backend test data "
                f"(`onnx/backend/test/data/{{{','.join(KINDS)}}}`) is optimized with "
                "`graphopt optimize model.onnx -o out.onnx --passes cleanup --no-latency "
                "--inputs <its test_data_set_0 inputs>` and the optimized model's ONNX Runtime "
                "outputs are compared with the stored reference outputs (rtol as the onnx "
                f"backend runner uses it, atol {SWEEP_ATOL:g}) and with the original's ONNX "
                "Runtime outputs (bit for bit: `cleanup` is exact). Models ONNX Runtime cannot "
                "load or run, or whose original output already differs from the reference, "
                "are skipped with the reason."
            ),
            "",
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"
            + (f"; sweep time {self.seconds:.1f} s (one process)" if self.seconds else ""),
            "",
            "| folder | cases | ran | matched | failed | skipped |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kind in sorted(by_kind):
            c = by_kind[kind]
            out.append(f"| {kind} | {sum(c.values())} | {c[MATCHED] + c[FAILED]} | "
                       f"{c[MATCHED]} | {c[FAILED]} | {c[SKIPPED]} |")
        out.append(f"| **all** | {len(self.records)} | {self.ran} | {self.counts[MATCHED]} | "
                   f"{self.counts[FAILED]} | {self.counts[SKIPPED]} |")
        out += ["", "## Skipped, by reason", "", "| cases | reason |", "| ---: | --- |"]
        for reason, n in sorted(self.skip_reasons().items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"| {n} | {_md(reason)} |")
        out += ["", "| case | reason |", "| --- | --- |"]
        for r in self.records:
            if r["status"] == SKIPPED:
                out.append(f"| {r['id']} | {_md(str(r['reason']))} |")
        failed = [r for r in self.records if r["status"] == FAILED]
        out += ["", "## Failed", ""]
        if failed:
            out += ["| case | reason |", "| --- | --- |"]
            out += [f"| {r['id']} | {_md(str(r['reason']))} |" for r in failed]
        else:
            out.append("None.")
        header = (
            "| case | nodes before → after | max abs error vs reference | bit-exact vs original |"
        )
        out += ["", "## Ran", "", header, "| --- | ---: | ---: | :---: |"]
        for r in self.records:
            if r["status"] != SKIPPED:
                err = "" if r["max_abs_err"] is None else f"{float(r['max_abs_err']):.3g}"
                exact = {True: "yes", False: "no", None: ""}[r["bit_exact"]]
                out.append(f"| {r['id']} | {r['nodes_before']} → {r['nodes_after']} | {err} | "
                           f"{exact} |")
        return "\n".join(out) + "\n"


def _reason_group(reason: str) -> str:
    """Skip reasons grouped for the summary: by missing kernel, else by the reason's start."""
    kernel = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", reason)
    if kernel:
        return f"ONNX Runtime has no kernel for {kernel.group(1)}-{kernel.group(2)}"
    if "not a tensor" in reason:
        return "an input or output is not a tensor (sequence/map/optional)"
    if "Locale" in reason or "locale" in reason:
        return "ONNX Runtime cannot create the locale StringNormalizer needs"
    if "is not a registered function/op" in reason:
        domain = re.search(r"(\S+):\w+\(-?\d+\) is not a registered", reason)
        return "ONNX Runtime does not implement " + (domain.group(1) if domain else "an op")
    return reason.split(":", 1)[0]


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sweep(
    cases: Iterable[BackendCase], workdir: Path, *, threads: int = 1
) -> Summary:
    """Runs every case sequentially, each in its own sub-folder of ``workdir``."""
    started = time.perf_counter()
    records = []
    for i, case in enumerate(cases):
        folder = workdir / f"{i:04d}"
        os.makedirs(folder, exist_ok=True)
        records.append(run_case(case, folder, threads=threads).to_json())
    return Summary(records, time.perf_counter() - started)
