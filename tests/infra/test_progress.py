"""LazyProgress: silent for short loops, a bar with the current item for long ones."""

from __future__ import annotations

import pytest

from graphopt.infra.progress import LazyProgress


def test_short_loop_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with LazyProgress("gptq", 3, "layers", after_s=60.0) as progress:
        for name in ("a", "b", "c"):
            progress.advance(name)
    assert progress.count == 3
    assert capsys.readouterr().err == ""


def test_long_loop_shows_count_unit_and_item(capsys: pytest.CaptureFixture[str]) -> None:
    with LazyProgress("calibrating", 2, "samples", after_s=0.0) as progress:
        progress.advance("first")
        progress.advance("model/layers.3/mlp/down_proj")
    err = capsys.readouterr().err
    assert "calibrating" in err and "2/2" in err and "samples" in err
    assert "down_proj" in err
