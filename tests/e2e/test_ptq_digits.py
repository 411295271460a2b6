"""Static int8 on CNNs: the digits CNN (accuracy) and the onnx ``light`` models (run).

* digits CNN (``models.digits_cnn``, opset 17, BatchNorm unfolded): ``fuse`` folds the
  BatchNorms (``batchnorm-folding`` only, so no FusedConv hides the convolutions), then
  ``ptq`` calibrated on 256 training images; verified against fp32 under the
  ``quantized`` tolerance (SQNR >= 30 dB) and the top-1 accuracy on the 450 test images
  may drop by at most 0.5 points. ORT runs the convolutions as QLinearConv.
* the onnx package's ``light`` models (opset 9, IR 3, stub weights computed by
  ``ConstantOfShape`` from initializers that are also graph inputs): ``ptq`` refuses the
  opset without ``upgrade_opset``; with it they are converted to opset 13, quantized
  (their computed weights calibrated per tensor like activations, never folded) and run
  on ONNX Runtime with finite outputs.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from graphopt.api import OptimizeConfig, optimize
from graphopt.errors import InvalidModelError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.quantize.ptq import PtqOptions, PtqPass
from graphopt.testing.backend_models import discover, load_io
from models import digits_cnn

pytestmark = pytest.mark.slow

MAX_DROP = 0.005


def test_digits_cnn_accuracy(tmp_path: Path) -> None:
    src = digits_cnn.build()
    x_train, _, x_test, _ = digits_cnn.dataset()
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i:03d}.npz", image=np.array(x_train[i * 32 : (i + 1) * 32]))
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, image=np.array(x_test[:64]))  # one feed of 64 held-out images
    out = tmp_path / "digits-int8.onnx"
    report = optimize(
        src,
        out,
        OptimizeConfig(
            passes="fuse(rules=[batchnorm-folding]),ptq",
            calib=calib,
            inputs=inputs,
            latency=False,
        ),
    )
    assert report.agreement is not None and report.agreement.passed
    stats = report.passes[-1].stats
    assert stats["nodes_by_op"] == {"Conv": 2, "Gemm": 2}
    before, after = digits_cnn.accuracy(src), digits_cnn.accuracy(out)
    assert before - after <= MAX_DROP, (before, after)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0, ops


LIGHT = discover(("light",))


@pytest.mark.parametrize("case", LIGHT, ids=[c.name for c in LIGHT])
def test_light_models_quantize_and_run(case) -> None:  # type: ignore[no-untyped-def]
    feed, _ = load_io(case)
    (name, example), = feed.items()
    rng = np.random.default_rng(0)
    calibration = [{name: rng.random(example.shape, dtype=np.float32)}]
    ctx = PassContext(calibration=lambda: iter(calibration))
    model = ir.load(case.model)
    with pytest.raises(InvalidModelError, match="upgrade-opset"):
        PtqPass().run_with(model, ctx, AnalysisManager(ctx))
    result = PtqPass(PtqOptions(upgrade_opset=True, layer_sqnr=False)).run_with(
        model, ctx, AnalysisManager(ctx)
    )
    assert result.modified and result.stats["nodes_quantized"] >= 8
    assert model.opset_imports[""] == 13
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    # Initializers that are graph inputs stay graph inputs (callers may still feed them).
    assert [v.name for v in model.graph.inputs] == [
        i.name for i in onnx.load(str(case.model), load_external_data=False).graph.input
    ]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out, *_) = session.run(None, feed)
    assert np.isfinite(out).all()
