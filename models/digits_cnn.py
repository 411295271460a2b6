"""A small CNN trained on scikit-learn's 8x8 digits, exported to ONNX opset 17.

The network gives fusion and quantization passes real work: two Conv+BatchNorm+ReLU
blocks, a MaxPool, a Flatten and a two-layer Gemm head::

    image float32 [batch, 1, 8, 8]
      -> Conv(16) BN ReLU -> Conv(32) BN ReLU -> MaxPool 2x2
      -> Flatten -> Gemm(64) ReLU -> Gemm(10) -> logits float32 [batch, 10]

BatchNormalization nodes are kept in the graph (the legacy exporter would otherwise fold
them into the convolutions), so a Conv+BN fusion pass has something to fuse.

Training is seeded and deterministic (CPU, a local RNG fork, deterministic algorithms)
and takes a few seconds. Pixels are scaled to [0, 1] (divided by 16); the split is a
fixed stratified 75/25 train/test split.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.cache import cached_build

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

logger = logging.getLogger(__name__)

MODEL_NAME = "digits-cnn"
RECIPE_REVISION = "1"
"""Bump when the recipe changes in a way that changes the artifact."""

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
NUM_CLASSES = 10
SEED = 0
TEST_FRACTION = 0.25
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MIN_ONNX_ACCURACY = 0.95
"""A build whose ONNX test accuracy falls below this is refused."""


def onnx_filename() -> str:
    """Return the cache file name of the exported model."""
    return f"{MODEL_NAME}.onnx"


def recipe_version() -> str:
    """Return the stamp string of a build (recipe revision and tool versions)."""
    parts = [MODEL_NAME, f"opset={OPSET}", f"recipe={RECIPE_REVISION}", f"seed={SEED}"]
    for dist in ("torch", "scikit-learn", "onnx"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return " ".join(parts)


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SEED, stratify=labels
    )
    for array in (x_train, y_train, x_test, y_test):
        array.setflags(write=False)
    return x_train, y_train, x_test, y_test


def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split of scikit-learn's digits.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images float32 ``[n, 1, 8, 8]`` in [0, 1],
        labels int64 ``[n]``; 1347 training and 450 test samples. The arrays are read-only
        and shared between calls; copy before modifying.
    """
    return _dataset()


def _make_network() -> torch.nn.Module:
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


def _train() -> torch.nn.Module:
    """Train the network deterministically without disturbing global torch RNG state."""
    import torch

    x_train, y_train, x_test, y_test = dataset()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        # The tensors are tiny: intra-op threads only add synchronisation (one thread is
        # several times faster than two here) and one thread keeps the run reproducible.
        torch.set_num_threads(1)
        try:
            net = _make_network()
            optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
            steps_per_epoch = -(-len(x_train) // BATCH_SIZE)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch
            )
            loss_fn = torch.nn.CrossEntropyLoss()
            x = torch.from_numpy(np.array(x_train))
            y = torch.from_numpy(np.array(y_train))
            generator = torch.Generator().manual_seed(SEED)
            net.train()
            for epoch in range(EPOCHS):
                order = torch.randperm(len(x), generator=generator)
                total = 0.0
                for start in range(0, len(x), BATCH_SIZE):
                    idx = order[start : start + BATCH_SIZE]
                    optimiser.zero_grad()
                    loss = loss_fn(net(x[idx]), y[idx])
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    total += float(loss.detach()) * len(idx)
                logger.debug("epoch %d: train loss %.4f", epoch + 1, total / len(x))
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)
            torch.set_num_threads(previous_threads)
    net.eval()
    with torch.no_grad():
        predicted = net(torch.from_numpy(np.array(x_test))).argmax(dim=1).numpy()
    logger.info("torch test accuracy %.4f", float(np.mean(predicted == y_test)))
    return net


def _export(net: torch.nn.Module, dest: Path) -> None:
    import torch

    example = torch.zeros(2, 1, 8, 8)
    torch.onnx.export(
        net,
        (example,),
        str(dest),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        # PRESERVE exports the module as it is (eval mode) but skips the eval-mode
        # peephole that folds BatchNorm into Conv: the fusion is left to graphopt.
        training=torch.onnx.TrainingMode.PRESERVE,
        # Constant folding is off as the exporter advises for PRESERVE; this graph has
        # nothing to fold anyway (no shape arithmetic, parameters are initializers).
        do_constant_folding=False,
    )


def _check_graph(path: Path) -> None:
    """Raise unless the export holds the ops this recipe promises (BN unfused)."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    for op in ("Conv", "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm"):
        if op not in ops:
            raise RuntimeError(f"{path.name}: expected a {op} node; graph has {sorted(set(ops))}")
    logger.info("%s: %d nodes: %s", onnx_filename(), len(ops), " ".join(ops))


def _build_into(dest: Path) -> None:
    import warnings

    start = time.perf_counter()
    net = _train()
    logger.info("trained in %.1fs", time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as scratch:
        raw = Path(scratch) / onnx_filename()
        with warnings.catch_warnings():
            # The legacy exporter warns that it is deprecated; we use it for opset 17.
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(net, raw)
        _check_graph(raw)
        score = accuracy(raw)
        logger.info("ONNX test accuracy %.4f", score)
        if score < MIN_ONNX_ACCURACY:
            raise RuntimeError(
                f"{MODEL_NAME}: ONNX test accuracy {score:.4f} < {MIN_ONNX_ACCURACY}; not caching"
            )
        raw.replace(dest)


def build(*, force: bool = False) -> Path:
    """Train and export the digits CNN into the model cache (skipped when current).

    Args:
        force: Rebuild even if a current build is cached.

    Returns:
        Path of the ``.onnx`` file in :func:`models.cache.cache_dir`.
    """
    return cached_build(onnx_filename(), recipe_version(), _build_into, force=force)


def accuracy(
    onnx_path: str | Path,
    session_options: ort.SessionOptions | None = None,
    *,
    batch: int = 128,
) -> float:
    """Top-1 accuracy of an ONNX digits classifier on the held-out test split.

    Args:
        onnx_path: A model with input ``image`` [batch, 1, 8, 8] and class scores as its
            first output.
        session_options: Passed to ONNX Runtime (e.g. to turn graph optimisations off).
        batch: Images per run.

    Returns:
        Fraction of the 450 test images classified correctly.
    """
    import onnxruntime as ort

    _, _, x_test, y_test = dataset()
    session = ort.InferenceSession(
        str(onnx_path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x_test), batch):
        (scores,) = session.run(None, {input_name: x_test[start : start + batch]})[:1]
        correct += int(np.sum(np.argmax(scores, axis=1) == y_test[start : start + batch]))
    return correct / len(x_test)


__all__ = ["accuracy", "build", "dataset", "onnx_filename", "recipe_version"]
