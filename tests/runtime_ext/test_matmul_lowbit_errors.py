"""Bad attributes and shapes fail at session creation or run with a message naming them."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.backends.ext.format import to_ext
from tests.runtime_ext.ext_support import ext_session, lowbit_model, random_quantized

pytestmark = pytest.mark.usefixtures("ext_library")

K, N, GROUP = 40, 6, 16


@pytest.fixture()
def ext() -> object:
    return to_ext(random_quantized(np.random.default_rng(0), N, K, 4, GROUP, asymmetric=True))


def _attrs(ext: object, **changes: int) -> dict[str, int]:
    attrs = dict(ext.attributes)  # type: ignore[attr-defined]
    attrs.update(changes)
    return attrs


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"bits": 5}, "bits=5 must be 2, 3, 4 or 8"),
        ({"group_size": 0}, "group_size=0 must be positive"),
        ({"K": 0}, "K=0 must be"),
        ({"N": -3}, "N=-3 must be"),
        ({"accuracy_level": 2}, "accuracy_level=2 must be 0 .fp32. or 4"),
    ],
)
def test_bad_attribute_fails_at_load(ext: object, changes: dict[str, int], message: str) -> None:
    with pytest.raises(Exception, match=message):
        ext_session(lowbit_model(ext, ["M", K], attributes=_attrs(ext, **changes)))  # type: ignore[arg-type]


def test_missing_attribute_fails_at_load(ext: object) -> None:
    attrs = _attrs(ext)
    del attrs["group_size"]
    with pytest.raises(Exception, match="group_size"):
        ext_session(lowbit_model(ext, ["M", K], attributes=attrs))  # type: ignore[arg-type]


def test_static_k_mismatch_fails_at_load(ext: object) -> None:
    with pytest.raises(Exception, match=r"last dimension must equal attribute K=40"):
        ext_session(lowbit_model(ext, [1, K + 1]))  # type: ignore[arg-type]


def test_dynamic_k_mismatch_fails_at_run(ext: object) -> None:
    session = ext_session(lowbit_model(ext, ["M", "K"]))  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"MatMulLowBit node 'lowbit': input A has shape \[2, 41\]"):
        session.run(None, {"A": np.zeros((2, K + 1), np.float32)})


def test_scalar_a_fails(ext: object) -> None:
    session = ext_session(lowbit_model(ext, []))  # type: ignore[arg-type]
    with pytest.raises(Exception, match="input A has shape"):
        session.run(None, {"A": np.zeros((), np.float32)})


@pytest.mark.parametrize(
    "override,message",
    [
        ("packed", r"input B_packed must be uint8\[1, 320\], got shape \[6, 64\]"),
        ("scales", r"input scales must be float32\[1, 3, 16\], got shape \[6, 2\]"),
        ("zero_points", r"input zero_points must be uint8\[1, 3, 16\], got shape \[3, 6\]"),
        ("bias", r"input bias must be float32\[6\], got shape \[7\]"),
    ],
)
def test_bad_weight_shapes_fail_at_load(ext: object, override: str, message: str) -> None:
    e = ext  # ExtWeights
    bad = {
        "packed": {"packed": np.zeros((N, 64), np.uint8)},
        "scales": {"scales": np.ones((N, 2), np.float32)},
        "zero_points": {"zero_points": np.zeros((3, N), np.uint8)},
        "bias": {"bias": np.zeros(N + 1, np.float32)},
    }[override]
    with pytest.raises(Exception, match=message):
        ext_session(lowbit_model(e, ["M", K], **bad))  # type: ignore[arg-type]


def test_bad_weight_shape_from_a_graph_input_fails_at_run(ext: object) -> None:
    """Weights that are not initializers are checked when the node runs."""
    import onnx

    model = onnx.load_from_string(lowbit_model(ext, ["M", K]))  # type: ignore[arg-type]
    scales = next(t for t in model.graph.initializer if t.name == "S")
    model.graph.initializer.remove(scales)
    model.graph.input.append(onnx.helper.make_tensor_value_info("S", onnx.TensorProto.FLOAT, None))
    session = ext_session(model.SerializeToString())
    with pytest.raises(
        Exception, match=r"input scales must be float32\[1, 3, 16\], got shape \[6, 2\]"
    ):
        session.run(None, {"A": np.zeros((1, K), np.float32), "S": np.ones((N, 2), np.float32)})


def test_wrong_weight_dtype_fails(ext: object) -> None:
    scales = np.ones((1, 3, 16), np.float32)
    with pytest.raises(Exception):  # noqa: B017 - ORT's own type check, message varies
        ext_session(lowbit_model(ext, ["M", K], scales=scales.astype(np.float64)))  # type: ignore[arg-type]
