"""Tiny ONNX models for the verification tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from verify_builders import two_head_model


@pytest.fixture
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (
        rng.standard_normal((4, 3)).astype(np.float32),
        rng.standard_normal((4, 3)).astype(np.float32),
    )


@pytest.fixture
def save(tmp_path: Path) -> Callable[..., Path]:
    def _save(model: onnx.ModelProto, name: str, external: bool = False) -> Path:
        path = tmp_path / name
        if external:
            onnx.save(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=name + ".data",
                size_threshold=0,
            )
        else:
            onnx.save(model, str(path))
        return path

    return _save


@pytest.fixture
def model_path(weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path]) -> Path:
    return save(two_head_model(*weights), "model.onnx")
