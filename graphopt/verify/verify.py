"""Verification of a transformed model against its original on ONNX Runtime.

Both models run on CPU with graph optimizations off, with the same feeds, one model at a
time (so only one set of weights is resident); the outputs are then compared under a
tolerance class (:mod:`graphopt.verify.compare`).

A problem with the original (it does not load or run) is an input error and raises. A
problem with the candidate (it does not load or run, or its input signature changed) is a
verification failure and is returned as a failed :class:`Agreement` with ``error`` set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.errors import CalibrationError, InvalidModelError
from graphopt.verify.compare import Agreement, Tolerance, compare_outputs, merge_agreements
from graphopt.verify.inputs import make_feeds
from graphopt.verify.runner import make_session, run

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


def _signature(session: ort.InferenceSession) -> list[tuple[str, str]]:
    return [(i.name, i.type) for i in session.get_inputs()]


def _signature_change(
    original: list[tuple[str, str]], candidate: list[tuple[str, str]]
) -> str | None:
    if original == candidate:
        return None
    ref = dict(original)
    new = dict(candidate)
    missing = [n for n in ref if n not in new]
    added = [n for n in new if n not in ref]
    if missing:
        return f"graph input '{missing[0]}' was removed or renamed"
    if added:
        return f"graph input '{added[0]}' was added"
    for name, kind in ref.items():
        if new[name] != kind:
            return f"graph input '{name}' changed type: {kind} -> {new[name]}"
    return "graph inputs were reordered"


def _run_all(
    session: ort.InferenceSession, feeds: Sequence[Feed], label: str
) -> list[dict[str, np.ndarray]]:
    return [run(session, feed, label=label) for feed in feeds]


def verify_model(
    original: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    tolerance: Tolerance,
    feeds: Sequence[Feed] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    threads: int = 2,
    custom_op_libraries: Sequence[str] = (),
) -> Agreement:
    """Runs both models on the same feeds and compares their outputs.

    Args:
        original: The reference ``.onnx`` file.
        candidate: The transformed ``.onnx`` file.
        tolerance: The tolerance class.
        feeds: Feeds to use; when None one is generated from the original's inputs
            (:func:`~graphopt.verify.inputs.make_feeds` with ``dims`` and ``seed``).
        dims: ``dim_param`` values for generated feeds.
        seed: Seed for generated feeds.
        threads: ORT intra-op threads.
        custom_op_libraries: Custom-op libraries to register in both sessions.

    Returns:
        The agreement over all feeds (worst case per output).

    Raises:
        UsageError: A path is missing.
        CalibrationError: ``feeds`` is empty.
        InvalidModelError: The original cannot be loaded or run with the feeds.
    """
    original_path = Path(original)
    candidate_path = Path(candidate)
    if feeds is None:
        feeds = [make_feeds(original_path, dims=dims, seed=seed)]
    if not feeds:
        raise CalibrationError("verification needs at least one feed (zero samples given)")
    libraries = tuple(custom_op_libraries)

    session = make_session(
        original_path, threads=threads, optimize=False, custom_op_libraries=libraries
    )
    signature = _signature(session)
    output_names = [o.name for o in session.get_outputs()]
    reference = _run_all(session, feeds, str(original_path))
    del session

    def failed(error: str) -> Agreement:
        agreement = Agreement(tolerance=tolerance, samples=len(feeds), error=error)
        logger.info("verify %s: %s", candidate_path, agreement.summary())
        return agreement

    try:
        session = make_session(
            candidate_path, threads=threads, optimize=False, custom_op_libraries=libraries
        )
    except InvalidModelError as e:
        return failed(f"candidate does not load: {e.one_line()}")
    change = _signature_change(signature, _signature(session))
    candidate_outputs = [o.name for o in session.get_outputs()]
    if (
        change is None
        and candidate_outputs != output_names
        and sorted(candidate_outputs) == sorted(output_names)
    ):
        change = "graph outputs were reordered"
    if change is not None:
        return failed(f"candidate {change}")
    try:
        outputs = _run_all(session, feeds, str(candidate_path))
    except InvalidModelError as e:
        return failed(f"candidate does not run: {e.one_line()}")
    del session

    per_feed = [
        compare_outputs(ref, got, tolerance) for ref, got in zip(reference, outputs, strict=True)
    ]
    agreement = merge_agreements(per_feed)
    logger.info("verify %s: %s", candidate_path, agreement.summary())
    return agreement
