"""load_feeds: .npz files and folders, never unpickled, validated against the model."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from graphopt.errors import CalibrationError, UsageError
from graphopt.verify.inputs import load_feeds

UNPICKLED: list[str] = []


def _trip() -> str:
    UNPICKLED.append("unpickled")
    return "boom"


class _Canary:
    """Records that it was unpickled, so the test can prove it never is."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_trip, ())


def test_single_npz(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    np.savez(path, x=np.ones((2, 4), np.float64))  # float64 is cast to the model's float32
    feeds = load_feeds(path, model_path)
    assert len(feeds) == 1
    assert feeds[0]["x"].dtype == np.float32 and feeds[0]["x"].shape == (2, 4)


def test_folder_sorted_by_name(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, name in enumerate(["b.npz", "a.npz", "c.npz"]):
        np.savez(folder / name, x=np.full((1, 4), i, np.float32))
    (folder / "notes.txt").write_text("ignored")
    feeds = load_feeds(folder, model_path)
    assert [float(f["x"][0, 0]) for f in feeds] == [1.0, 0.0, 2.0]


def test_pickle_in_npz_is_refused_and_never_unpickled(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([_Canary()], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match=r"evil\.npz.*'x'.*pickle"):
        load_feeds(path, model_path)
    with pytest.raises(CalibrationError, match="pickle"):
        load_feeds(path)  # without a model too
    assert UNPICKLED == []


def test_plain_pickle_named_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(pickle.dumps({"x": _Canary()}))
    with pytest.raises(CalibrationError, match=r"data\.npz: refused: the file is a Python pickle"):
        load_feeds(path)
    assert UNPICKLED == []


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(CalibrationError, match=r"text\.npz: not an \.npz"):
        load_feeds(path)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(CalibrationError, match="single .npy"):
        load_feeds(npy)


def test_wrong_and_missing_names(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.ones((1, 4), np.float32), bogus=np.ones(2))
    with pytest.raises(CalibrationError, match=r"wrong\.npz: array 'bogus' is not a model input"):
        load_feeds(path, model_path)
    path = tmp_path / "missing.npz"
    np.savez(path, other=np.ones(2))
    with pytest.raises(CalibrationError, match="'other'"):
        load_feeds(path, model_path)


def test_nan_and_inf_refused(model_path: Path, tmp_path: Path) -> None:
    x = np.ones((2, 4), np.float32)
    x[1, 2] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x)
    with pytest.raises(CalibrationError, match=r"nan\.npz: input 'x': 1 NaN/Inf.*\(1, 2\)"):
        load_feeds(path, model_path)
    x[1, 2] = np.inf
    np.savez(path, x=x)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        load_feeds(path)


def test_dtype_and_shape_checked(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.array([["a", "b", "c", "d"]]))
    with pytest.raises(CalibrationError, match=r"'x': dtype <U1 cannot be used as FLOAT"):
        load_feeds(path, model_path)
    np.savez(path, x=np.ones((2, 5), np.float32))
    with pytest.raises(CalibrationError, match="axis 1 is 5, model expects 4"):
        load_feeds(path, model_path)
    np.savez(path, x=np.ones(4, np.float32))
    with pytest.raises(CalibrationError, match="rank 1"):
        load_feeds(path, model_path)
    np.savez(path, x=np.full((1, 4), 1e39))
    with pytest.raises(CalibrationError, match="overflow"):
        load_feeds(path, model_path)


def test_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_feeds(tmp_path / "nothing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="zero samples"):
        load_feeds(tmp_path / "empty")
    path = tmp_path / "none.npz"
    np.savez(path)
    with pytest.raises(CalibrationError, match="no arrays"):
        load_feeds(path)
