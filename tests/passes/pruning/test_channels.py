"""Conv channel pruning on synthetic models (``graphopt.passes.pruning.channels``).

Exactness: each model's channels chosen for removal are exactly zero (weights, bias,
BatchNormalization gamma/beta), so the pruned model must give bit-identical outputs on ONNX
Runtime (graph optimizations off), with smaller tensors, the same graph I/O, and a graph
that passes the full ONNX checker. Reconstruction: pruning non-zero channels of a model
whose removed channels are linear combinations of kept ones is recovered by the
least-squares refit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.pruning.channels import prune_channels


class Net:
    """A tiny NCHW conv-net builder; ``zero`` marks output channels made exactly zero."""

    def __init__(self, seed: int = 0, cin: int = 4, hw: int = 6) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels = {"x": cin}
        self.hw = hw
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _init(self, prefix: str, arr: np.ndarray) -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: Sequence[str], channels: int | None = None, **attrs: object) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        self.channels[out] = channels if channels is not None else self.channels[inputs[0]]
        return out

    def conv(self, x: str, cout: int, *, group: int = 1, zero: Sequence[int] = (), bias: bool = True) -> str:
        cin = self.channels[x] // group
        w = self.rng.normal(size=(cout, cin, 3, 3)) / np.sqrt(cin * 9)
        b = self.rng.normal(size=cout) * 0.1
        w[list(zero)] = 0.0
        b[list(zero)] = 0.0
        inputs = [x, self._init("w", w)] + ([self._init("b", b)] if bias else [])
        return self.node("Conv", inputs, cout, pads=[1, 1, 1, 1], group=group)

    def bn(self, x: str, zero: Sequence[int] = ()) -> str:
        c = self.channels[x]
        gamma, beta = self.rng.uniform(0.5, 1.5, c), self.rng.normal(size=c) * 0.1
        gamma[list(zero)] = 0.0
        beta[list(zero)] = 0.0
        mean, var = self.rng.normal(size=c) * 0.1, self.rng.uniform(0.5, 1.5, c)
        params = [self._init(p, a) for p, a in (("g", gamma), ("be", beta), ("m", mean), ("v", var))]
        return self.node("BatchNormalization", [x, *params])

    def gemm(self, x: str, features: int, width: int) -> str:
        w = self.rng.normal(size=(features, width)) / np.sqrt(width)
        return self.node("Gemm", [x, self._init("fc", w), self._init("fcb", self.rng.normal(size=features))], features, transB=1)

    def build(self, outputs: Sequence[str], opset: int = 17) -> ir.Model:
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", self.channels["x"], self.hw, self.hw])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto = onnx.shape_inference.infer_shapes(proto)
        onnx.checker.check_model(proto, full_check=True)
        return ir.serde.deserialize_model(proto)


def run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def prune(model: ir.Model, ratio: float, **kw: object):  # type: ignore[no-untyped-def]
    ctx = kw.pop("ctx", PassContext())
    kw.setdefault("importance", "magnitude")
    kw.setdefault("reconstruct", False)
    return prune_channels(model, ratio, ctx=ctx, am=AnalysisManager(ctx), **kw)  # type: ignore[arg-type]


def check_exact(model: ir.Model, ratio: float, expected: dict[str, list[int]]) -> ir.Model:
    """Prunes a copy; asserts bit-identical outputs, the removed channels, valid graph."""
    x = np.random.default_rng(1).normal(size=(2, *[int(d) for d in list(model.graph.inputs[0].shape)[1:]])).astype(np.float32)
    before = run(model, x)
    io_before = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    report = prune(pruned, ratio)
    removed = {src: ch for g in report.groups for src, ch in g.removed_channels.items()}
    assert removed == expected
    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    after = run(pruned, x)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert ([v.name for v in pruned.graph.inputs], [v.name for v in pruned.graph.outputs]) == io_before
    assert report.params_after < report.params_before
    assert sum(report.macs_after.values()) < sum(report.macs_before.values())
    return pruned


def weight_shape(model: ir.Model, node_name: str, index: int = 1) -> tuple[int, ...]:
    node = next(n for n in model.graph if n.name == node_name)
    return tuple(node.inputs[index].const_value.shape)  # type: ignore[union-attr]


def test_conv_bn_relu_conv_exact() -> None:
    net = Net()
    a = net.conv("x", 8, zero=[1, 4, 6])
    y = net.conv(net.node("Relu", [net.bn(a, zero=[1, 4, 6])]), 5)
    pruned = check_exact(net.build([y]), 0.375, {a: [1, 4, 6]})
    assert weight_shape(pruned, a) == (5, 4, 3, 3)
    assert weight_shape(pruned, y) == (5, 5, 3, 3)
    bn = next(n for n in pruned.graph if n.op_type == "BatchNormalization")
    assert all(tuple(v.const_value.shape) == (5,) for v in bn.inputs[1:])  # type: ignore[union-attr]


def test_residual_add_prunes_producers_together() -> None:
    net = Net()
    a = net.conv("x", 8, zero=[2, 5])
    b = net.conv(net.node("Relu", [a]), 8, zero=[2, 5])
    s = net.node("Relu", [net.node("Add", [a, b])])
    y = net.conv(s, 3)
    pruned = check_exact(net.build([y]), 0.25, {a: [2, 5], b: [2, 5]})
    assert weight_shape(pruned, b) == (6, 6, 3, 3)  # b's inputs and outputs both shrink
    assert weight_shape(pruned, y) == (3, 6, 3, 3)


def test_concat_maps_offsets() -> None:
    net = Net()
    a = net.conv("x", 4, zero=[0])
    b = net.conv("x", 8, zero=[2, 6])
    c = net.node("Concat", [a, b], 12, axis=1)
    y = net.conv(net.node("Relu", [c]), 3)
    pruned = check_exact(net.build([y]), 0.25, {a: [0], b: [2, 6]})
    assert weight_shape(pruned, y) == (3, 9, 3, 3)


def test_depthwise_follows_its_input() -> None:
    net = Net()
    a = net.conv("x", 8, zero=[3])
    d = net.conv(net.node("Relu", [a]), 8, group=8, zero=[3])
    y = net.conv(d, 4)
    pruned = check_exact(net.build([y]), 0.125, {a: [3]})
    dw = next(n for n in pruned.graph if n.name == d)
    assert dw.attributes["group"].value == 7
    assert weight_shape(pruned, d) == (7, 1, 3, 3)


def test_grouped_conv_prunes_whole_groups() -> None:
    net = Net()
    a = net.conv("x", 8, zero=[2, 3])
    g = net.conv(net.node("Relu", [a]), 8, group=4, zero=[2, 3])
    y = net.conv(g, 4)
    pruned = check_exact(net.build([y]), 0.25, {a: [2, 3]})
    grouped = next(n for n in pruned.graph if n.name == g)
    assert grouped.attributes["group"].value == 3
    assert weight_shape(pruned, g) == (6, 2, 3, 3)
    assert weight_shape(pruned, y) == (4, 6, 3, 3)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape-1", "Reshape-explicit"])
def test_flatten_gemm_blocks(flatten: str) -> None:
    net = Net()
    a = net.conv("x", 6, zero=[1, 4])
    p = net.node("MaxPool", [net.node("Relu", [a])], kernel_shape=[2, 2], strides=[2, 2])
    if flatten == "Flatten":
        f = net.node("Flatten", [p], 54, axis=1)
    else:
        width = -1 if flatten == "Reshape-1" else 54
        shape = net._init("shape", np.zeros(0))
        net.inits[-1] = numpy_helper.from_array(np.array([0, width], dtype=np.int64), shape)
        f = net.node("Reshape", [p, shape], 54)
    y = net.gemm(f, 5, 54)
    pruned = check_exact(net.build([y]), 0.33, {a: [1, 4]})
    assert weight_shape(pruned, y) == (5, 36)
    if flatten == "Reshape-explicit":
        reshape = next(n for n in pruned.graph if n.op_type == "Reshape")
        assert reshape.inputs[1].const_value.numpy().tolist() == [0, 36]  # type: ignore[union-attr]


def test_never_prunes_a_group_to_zero() -> None:
    net = Net()
    a = net.conv("x", 2)
    y = net.conv(net.node("Relu", [a]), 3)
    model = net.build([y])
    report = prune(model, 0.99)
    assert weight_shape(model, a)[0] == 1
    assert report.groups[0].removed == 1


def test_skip_reasons_and_graph_outputs() -> None:
    net = Net()
    a = net.conv("x", 4)  # reaches a graph output
    b = net.conv("x", 4)
    t = net.node("Transpose", [b], perm=[0, 2, 3, 1])
    model = net.build([a, t])
    report = prune(model, 0.5)
    reasons = {tuple(g.sources): g.skip_reason for g in report.groups}
    assert "reaches graph output" in (reasons[(a,)] or "")
    assert "Transpose" in (reasons[(b,)] or "")
    assert not report.modified


def test_concat_with_graph_input_keeps_its_channels() -> None:
    net = Net()
    a = net.conv("x", 4, zero=[1, 3])
    c = net.node("Concat", ["x", a], 8, axis=1)
    y = net.conv(c, 2)
    pruned = check_exact(net.build([y]), 0.5, {a: [1, 3]})
    assert weight_shape(pruned, y) == (2, 6, 3, 3)


def test_options_are_checked() -> None:
    net = Net()
    model = net.build([net.conv(net.conv("x", 4), 2)])
    with pytest.raises(UsageError, match="calib"):
        prune(model, 0.3, reconstruct=True)
    with pytest.raises(UsageError, match="importance"):
        prune(model, 0.3, importance="random")
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        prune(model, 1.0)


def test_exclude_leaves_group() -> None:
    net = Net()
    a = net.conv("x", 4)
    y = net.conv(net.node("Relu", [a]), 2)
    model = net.build([y])
    report = prune(model, 0.5, exclude=[a])
    assert not report.modified and "excluded" in (report.groups[0].skip_reason or "")


def _redundant_model() -> tuple[ir.Model, str, str]:
    """Conv a's channels 4..7 are exact linear combinations of 0..3 (no Relu between a and
    the consumer), so a refit consumer can recover the unpruned output exactly."""
    net = Net(seed=3)
    a = net.conv("x", 8)
    w = numpy_helper.to_array(net.inits[0]).copy()
    b = numpy_helper.to_array(net.inits[1]).copy()
    mix = net.rng.normal(size=(4, 4))
    w[4:] = np.einsum("ij,jckl->ickl", mix, w[:4]) * 0.05
    b[4:] = mix @ b[:4] * 0.05
    net.inits[0] = numpy_helper.from_array(w.astype(np.float32), net.inits[0].name)
    net.inits[1] = numpy_helper.from_array(b.astype(np.float32), net.inits[1].name)
    y = net.conv(a, 3)
    return net.build([y]), a, y


@pytest.mark.parametrize("importance", ["magnitude", "activation", "hessian"])
def test_reconstruction_recovers_redundant_channels(importance: str) -> None:
    model, a, _ = _redundant_model()
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(size=(4, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(calibration=lambda: iter(feeds))
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    (ref,) = run(model, x)
    errors = {}
    for reconstruct in (False, True):
        pruned = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        report = prune(pruned, 0.5, importance=importance, ctx=ctx, reconstruct=reconstruct, ridge=1e-9)
        assert sorted(report.groups[0].removed_channels[a]) == [4, 5, 6, 7]
        (got,) = run(pruned, x)
        errors[reconstruct] = float(np.abs(got - ref).max())
    assert errors[True] < 1e-4 * np.abs(ref).max() < errors[False]


def test_global_scope_takes_more_from_the_weaker_group() -> None:
    net = Net()
    a = net.conv("x", 8, zero=[0, 1, 2, 3, 4])  # five dead channels
    b = net.conv(net.node("Relu", [a]), 8, zero=[])
    y = net.conv(net.node("Relu", [b]), 2)
    model = net.build([y])
    report = prune(model, 5 / 16, scope="global")
    removed = {g.sources[0]: g.removed for g in report.groups}
    assert removed[a] == 5 and removed[b] == 0
    layer = prune(net.build([y]), 5 / 16)
    assert {g.sources[0]: g.removed for g in layer.groups}[b] == 3  # round(2.5) up


#: Concat outputs of random graphs stay at most this wide (small, fast models).
MAX_RANDOM_CHANNELS = 48


def _random_net(seed: int) -> ir.Model:
    """A random DAG of convs (plain, depthwise, grouped), BN+Relu, MaxPool, residual Add and
    Concat, with a conv head and a GlobalAveragePool->Flatten->Gemm head as outputs."""
    net = Net(seed=seed, cin=4, hw=5)
    rng = np.random.default_rng(seed)
    pool = ["x"]
    for _ in range(10):
        v = pool[int(rng.integers(len(pool)))]
        c = net.channels[v]
        op = rng.choice(["conv", "conv", "bnrelu", "add", "concat", "dw", "grouped", "pool"])
        if op == "conv" or (op == "grouped" and c % 2):
            out = net.conv(v, int(rng.choice([4, 6, 8])))
        elif op == "bnrelu":
            out = net.node("Relu", [net.bn(v)])
        elif op == "add":
            same = [w for w in pool if w != v and net.channels[w] == c]
            other = same[int(rng.integers(len(same)))] if same else net.conv(v, c)
            out = net.node("Add", [v, other])
        elif op == "concat" and c + max(net.channels[w] for w in pool) <= MAX_RANDOM_CHANNELS:
            w = pool[int(rng.integers(len(pool)))]
            out = net.node("Concat", [v, w], c + net.channels[w], axis=1)
        elif op == "dw":
            out = net.conv(v, c, group=c)
        elif op == "grouped":
            out = net.conv(v, c, group=2)
        elif op == "pool":
            out = net.node("MaxPool", [v], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        else:
            out = net.node("Relu", [v])
        pool.append(out)
    head = net.conv(pool[-1], 3)
    gap = net.node("GlobalAveragePool", [pool[-2]])
    flat = net.node("Flatten", [gap], axis=1)
    fc = net.gemm(flat, 4, net.channels[pool[-2]])
    return net.build([head, fc])


@pytest.mark.parametrize("seed", [s for s in range(13) if s != 7])  # 7: nothing removable
def test_random_graphs_removal_is_exact(seed: int) -> None:
    """Zero random removable components (producer rows, biases, BN gamma/beta), remove
    exactly those units: outputs must not change beyond float32 summation order.

    Not bit-exact on purpose: ONNX Runtime picks its CPU conv kernel by shape (a GEMV for
    one output channel, K blocks of 512), and some of them sum the same non-zero terms in
    another order once zero terms are gone (a few ulp). The hand-built models above stay
    on shapes where the order is kept and are compared bit for bit."""
    from graphopt.analysis.structure.conv_groups import conv_channel_groups
    from graphopt.passes.pruning.channel_remove import remove_units

    model = _random_net(seed)
    groups = conv_channel_groups(model)
    rng = np.random.default_rng(seed + 100)
    removed: list[int] = []
    for g in groups.groups:
        free = g.free
        if not free:
            continue
        count = int(rng.integers(0, len(g.components)))  # never all of them
        for ci in rng.permutation(free)[: min(count, len(free))]:
            removed.extend(g.components[int(ci)])
    assert removed, "this seed draws a graph with nothing removable: pick another"
    dead = np.array(sorted(removed))
    for sl in groups.slices:
        if sl.role == "producer" or (sl.role == "norm" and sl.input_index in (1, 2)):
            value = sl.value
            arr = value.const_value.numpy().copy()  # type: ignore[union-attr]
            index = [slice(None)] * arr.ndim
            index[sl.axis] = np.isin(sl.owners, dead)  # type: ignore[call-overload]
            arr[tuple(index)] = 0.0
            value.const_value = ir.tensor(arr, name=value.name)
    x = np.random.default_rng(seed).normal(size=(2, 4, 5, 5)).astype(np.float32)
    before = run(model, x)
    remove_units(model, groups, dead)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    after = run(model, x)
    for a, b in zip(before, after, strict=True):
        scale = float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_align_keeps_a_multiple_of_the_block() -> None:
    net = Net()
    a = net.conv("x", 32)
    y = net.conv(net.node("Relu", [a]), 2)
    model = net.build([y])
    prune(model, 0.3, align=8)  # 32 - round(9.6) = 22 kept -> rounded up to 24
    assert weight_shape(model, a)[0] == 24
