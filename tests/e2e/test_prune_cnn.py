"""30% conv channel pruning on the onnx package's ``light`` CNNs.

The light models ship stub weights (``ConstantOfShape`` from shape initializers that are
also graph inputs, i.e. not constants), which channel pruning rightly refuses to slice.
:func:`materialize` turns them into a modern export: seeded random weights for tensors of
rank >= 2 (scaled by ``1/sqrt(fan_in)``), the stub's fill value for 1-D parameters, true
initializers, no overridable inputs. ``cleanup`` then folds the ``Unsqueeze``-of-constant
scales DenseNet applies after each BatchNormalization.

Each model goes through :func:`graphopt.api.optimize` with ``cleanup,prune(channels=0.3)``
(random weights: no task metric, so verification is off) and must give a graph that
passes the full ONNX checker, runs on ONNX Runtime with the same output shape and finite
values, and has at least 25% fewer parameters: ResNet-50 (residual ``Sum``), SqueezeNet
(fire-module ``Concat``) and DenseNet-121 (dense ``Concat`` chains with BatchNorm on the
concatenation).

Run as a script for the latency figures (ORT, graph optimizations on, interleaved)::

    .venv/bin/python tests/e2e/test_prune_cnn.py resnet50 squeezenet densenet121
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graphopt.api import OptimizeConfig, optimize
from graphopt.testing.backend_models import discover, load_io

pytestmark = pytest.mark.slow

MODELS = ("resnet50", "squeezenet", "densenet121")


def materialize(source: Path, dest: Path, seed: int = 0) -> None:
    """Writes ``source`` with its ConstantOfShape stubs replaced by real initializers."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept, weights = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shapes:
            dims = tuple(int(d) for d in shapes[node.input[0]])
            if len(dims) > 1:
                arr = rng.normal(size=dims) / np.sqrt(np.prod(dims[1:]))
            else:
                fill = numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0]
                arr = np.full(dims, fill)
            weights.append(numpy_helper.from_array(arr.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(weights)
    names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    used = {name for n in model.graph.node for name in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    model.ir_version = max(model.ir_version, 4)
    onnx.save(model, str(dest))


def _case(name: str):  # type: ignore[no-untyped-def]
    cases = [c for c in discover(("light",)) if c.name == f"light_{name}"]
    if not cases:
        pytest.skip("the installed onnx package ships no light models")
    return cases[0]


def prune_light(name: str, work: Path, passes: str = "cleanup,prune(channels=0.3)"):  # type: ignore[no-untyped-def]
    """Materializes and prunes one light model; returns (source, pruned, feed, report)."""
    case = _case(name)
    feed, _ = load_io(case)
    source = work / f"{name}-const.onnx"
    materialize(case.model, source)
    out = work / f"{name}-pruned.onnx"
    report = optimize(source, out, OptimizeConfig(passes=passes, verify=False, latency=False))
    return source, out, feed, report


@pytest.mark.parametrize("name", MODELS)
def test_light_cnn_channels_30_percent(name: str, tmp_path: Path) -> None:
    source, out, feed, report = prune_light(name, tmp_path)
    onnx.checker.check_model(str(out), full_check=True)
    stats = report.passes[-1].stats["channels"]
    assert stats["channel_groups_pruned"] >= 20, stats["channel_groups_skipped"]
    assert report.params_after <= 0.75 * report.params_before
    options = ort.SessionOptions()
    options.log_severity_level = 3
    outputs = []
    for path in (source, out):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feed)[0])
    assert outputs[0].shape == outputs[1].shape
    assert np.isfinite(outputs[1]).all()


def _latency_table(names: list[str]) -> None:  # pragma: no cover - a measurement script
    from graphopt.verify.latency import measure_latency

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            source, out, feed, report = prune_light(name, Path(tmp))
            stats = report.passes[-1].stats["channels"]
            lat = measure_latency({"before": source, "after": out}, feed, repeats=20, threads=2)
            ratio = lat["after"].median_ms / lat["before"].median_ms
            print(
                f"{name}: params {report.params_before} -> {report.params_after} "
                f"({report.params_after / report.params_before:.3f}), MACs ratio "
                f"{stats['channel_macs_ratio']}, groups pruned {stats['channel_groups_pruned']}/"
                f"{stats['channel_groups']}, ORT median {lat['before'].median_ms:.2f} -> "
                f"{lat['after'].median_ms:.2f} ms (ratio {ratio:.3f})"
            )


if __name__ == "__main__":  # pragma: no cover
    _latency_table(sys.argv[1:] or list(MODELS))
