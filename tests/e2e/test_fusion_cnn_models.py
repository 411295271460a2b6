"""``graphopt optimize --passes fuse`` on real CNNs, for ``ort`` and for ``tensorrt``.

Models:

* the onnx package's ``light`` models (ResNet-50, Inception v1/v2, DenseNet-121,
  ShuffleNet, SqueezeNet, VGG-19, ZFNet-512, AlexNet; stub weights made by
  ``ConstantOfShape``), fed ``arange(n)/n`` like the onnx backend runner;
* a sample of the ``pytorch-converted`` models ONNX Runtime can load, with their stored
  inputs;
* the digits CNN (``models.digits_cnn``, real trained weights).

Each goes through :func:`graphopt.api.optimize` (the pass, then verification against the
original on ONNX Runtime under the ``fusion`` tolerance; nothing is published if it
disagrees), and the published model must also match the stored reference outputs.

What must happen:

* ``tensorrt``: never a ``com.microsoft`` op; node counts never grow.
* ``ort``: every Conv (Gemm) whose only consumer is a Relu becomes one ``FusedConv``
  (``FusedGemm``); the count is derived from the original graph.
* The light models are IR version 3, where every initializer is also a graph input (a
  caller may feed another value): their BatchNormalization parameters are therefore not
  constants and must *not* be folded.
* digits CNN: both BatchNormalization nodes fold, for every target; accuracy unchanged.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.api import OptimizeConfig, optimize
from graphopt.testing.backend_models import BackendCase, compare, discover, load_io

pytestmark = pytest.mark.slow

TARGETS = ("ort", "tensorrt")

#: pytorch-converted models ONNX Runtime loads (most others use ops it lacks at opset 6).
PYTORCH_SAMPLE = (
    "test_Conv1d_pad2",
    "test_Conv2d_depthwise_strided",
    "test_Conv2d_groups",
    "test_Conv3d_dilated_strided",
    "test_ConvTranspose2d",
    "test_Linear_no_bias",
    "test_LeakyReLU_with_negval",
    "test_ZeroPad2d",
)

LIGHT = discover(("light",))
PYTORCH = [c for c in discover(("pytorch-converted",)) if c.name in PYTORCH_SAMPLE]
CASES = LIGHT + PYTORCH


def _single_consumer_pairs(model: onnx.ModelProto, producer: str, consumer: str) -> int:
    """How many ``producer`` nodes feed exactly one node, a ``consumer``, and no output."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != producer or node.output[0] in outputs:
            continue
        users = uses.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == consumer:
            count += 1
    return count


def _histogram(model: onnx.ModelProto) -> Counter[str]:
    return Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in model.graph.node
    )


def _run_ort(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feed)]


def test_the_cnn_models_are_present() -> None:
    if not LIGHT:
        pytest.skip("the installed onnx package ships no backend test data")
    names = {c.name for c in LIGHT}
    for expected in (
        "resnet50",
        "densenet121",
        "inception_v1",
        "shufflenet",
        "squeezenet",
        "vgg19",
        "zfnet512",
        "bvlc_alexnet",
    ):
        assert f"light_{expected}" in names
    assert len(PYTORCH) == len(PYTORCH_SAMPLE)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuse_backend_model(case: BackendCase, target: str, tmp_path: Path) -> None:
    original = onnx.load(str(case.model))
    feed, expected = load_io(case, original)
    inputs = tmp_path / "feed.npz"
    np.savez(inputs, **feed)  # type: ignore[arg-type]
    out = tmp_path / "fused.onnx"
    report = optimize(
        case.model,
        out,
        OptimizeConfig(passes="fuse", target=target, latency=False, inputs=inputs, threads=1),
    )
    assert report.agreement is not None and report.agreement.passed, report.agreement
    fused = onnx.load(str(out))
    before, after = _histogram(original), _histogram(fused)
    assert sum(after.values()) <= sum(before.values())
    contrib = sorted(k for k in after if "::" in k)
    if target == "tensorrt":
        assert contrib == []
        assert after == before  # nothing is foldable: every parameter is a graph input
    else:
        conv_relu = _single_consumer_pairs(original, "Conv", "Relu")
        gemm_relu = _single_consumer_pairs(original, "Gemm", "Relu")
        assert after["com.microsoft::FusedConv"] == conv_relu
        assert after["com.microsoft::FusedGemm"] == gemm_relu
        # The tidy-up after fusion also drops inference-mode Dropout.
        dropped = before["Dropout"] - after["Dropout"]
        assert sum(after.values()) == sum(before.values()) - conv_relu - gemm_relu - dropped
    # Parameters that are graph inputs are never folded.
    assert after["BatchNormalization"] == before["BatchNormalization"]
    # The published model still computes what the stored references say.
    reason, _ = compare(_run_ort(out, feed), expected, case.rtol, case.atol)
    assert reason is None, reason


@pytest.fixture(scope="module")
def digits_model() -> Path:
    from models import digits_cnn

    return digits_cnn.build()


@pytest.mark.parametrize("target", TARGETS)
def test_fuse_digits_cnn(digits_model: Path, target: str, tmp_path: Path) -> None:
    from models import digits_cnn

    out = tmp_path / "digits-fused.onnx"
    report = optimize(
        digits_model, out, OptimizeConfig(passes="fuse", target=target, latency=False)
    )
    assert report.agreement is not None and report.agreement.passed
    before = _histogram(onnx.load(str(digits_model)))
    after = _histogram(onnx.load(str(out)))
    assert before["BatchNormalization"] == 2 and after["BatchNormalization"] == 0
    if target == "ort":
        assert after == Counter(
            {
                "com.microsoft::FusedConv": 2,
                "MaxPool": 1,
                "Flatten": 1,
                "com.microsoft::FusedGemm": 1,
                "Gemm": 1,
            }
        )
    else:
        assert after == Counter({"Conv": 2, "Relu": 3, "MaxPool": 1, "Flatten": 1, "Gemm": 2})
    assert digits_cnn.accuracy(out) == digits_cnn.accuracy(digits_model)
