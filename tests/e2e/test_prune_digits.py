"""Channel pruning and sparsity on the digits CNN, through :func:`graphopt.api.optimize`.

``prune(channels=0.3)`` removes 30% of the channels of both conv groups (16 -> 11 and
32 -> 22; the Gemm after the Flatten loses the matching 16-row blocks). Without
reconstruction accuracy drops sharply; with ``reconstruct=true`` (ridge refit of the
second conv and the first Gemm on 256 calibration images from the training split) it
comes back to within 1.5 points of fp32 on the 450 test images, and is clearly better than
without. ``sparsify(pattern=2:4)`` zeroes half the weights of every layer whose K is a
multiple of 4 and loses at most 3 points.

``fuse`` before ``prune`` works (FusedConv/FusedGemm are modelled) and the pruned model
goes through ``fuse,ptq``.

These passes are lossy: the pipeline's verification (SQNR >= 30 dB) is off and the task
metric is the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from graphopt.api import OptimizeConfig, optimize
from models import digits_cnn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x_train, _, _, _ = digits_cnn.dataset()
    folder = tmp_path_factory.mktemp("digits-calib")
    for i in range(8):
        np.savez(folder / f"{i:03d}.npz", image=np.array(x_train[i * 32 : (i + 1) * 32]))
    return folder


def _optimize(passes: str, calib: Path, out: Path):  # type: ignore[no-untyped-def]
    return optimize(
        digits_cnn.build(), out, OptimizeConfig(passes=passes, calib=calib, verify=False, latency=False)
    )


def _shapes(path: Path) -> dict[str, list[int]]:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) >= 2}


def test_channels_30_percent_with_and_without_reconstruction(calib: Path, tmp_path: Path) -> None:
    fp32 = digits_cnn.accuracy(digits_cnn.build())
    plain = _optimize("prune(channels=0.3)", calib, tmp_path / "plain.onnx")
    rebuilt = _optimize(
        "prune(channels=0.3,importance=activation,reconstruct=true)", calib, tmp_path / "rec.onnx"
    )
    for report in (plain, rebuilt):
        assert report.params_after <= 0.7 * report.params_before
    shapes = _shapes(tmp_path / "rec.onnx")
    assert sorted(shapes.values()) == sorted([[11, 1, 3, 3], [22, 11, 3, 3], [64, 352], [10, 64]])
    acc_plain = digits_cnn.accuracy(tmp_path / "plain.onnx")
    acc_rec = digits_cnn.accuracy(tmp_path / "rec.onnx")
    assert acc_rec >= fp32 - 0.015, (fp32, acc_rec)
    assert acc_rec >= acc_plain + 0.05, (acc_plain, acc_rec)


def test_sparsify_2_4_keeps_accuracy(calib: Path, tmp_path: Path) -> None:
    fp32 = digits_cnn.accuracy(digits_cnn.build())
    report = _optimize("sparsify(pattern=2:4)", calib, tmp_path / "sparse.onnx")
    stats = report.passes[-1].stats
    assert stats["sparsity"] == 0.5 and stats["weights_sparsified"] == 3
    assert digits_cnn.accuracy(tmp_path / "sparse.onnx") >= fp32 - 0.03


def test_prune_after_fuse_and_before_ptq(calib: Path, tmp_path: Path) -> None:
    """Channel groups are found through ORT's FusedConv/FusedGemm too, and the pruned model
    quantizes."""
    fp32 = digits_cnn.accuracy(digits_cnn.build())
    fused = _optimize(
        "fuse,prune(channels=0.3,importance=activation,reconstruct=true)", calib, tmp_path / "f.onnx"
    )
    assert fused.params_after <= 0.7 * fused.params_before
    assert digits_cnn.accuracy(tmp_path / "f.onnx") >= fp32 - 0.015
    _optimize("prune(channels=0.3,importance=activation,reconstruct=true),fuse,ptq", calib, tmp_path / "q.onnx")
    assert digits_cnn.accuracy(tmp_path / "q.onnx") >= fp32 - 0.02
