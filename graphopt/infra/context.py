"""The context a pipeline runs in: options, instruments, calibration data, seed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from graphopt.infra.instruments import Instrument

#: A calibration source yields feeds: graph-input name -> array for one sample (or batch).
CalibrationSource = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclass
class PassContext:
    """Everything a pass may read besides the model itself.

    Attributes:
        target: Backend name (``ort``, ``tensorrt``, ``ext``) that chooses policies.
        seed: Seed for every random choice a pass makes.
        calibration: A callable returning a fresh iterator over calibration feeds, or None.
        instruments: Observers of pass execution (timing, statistics, printing, crash
            reproducers).
        disabled_passes: Registry names of passes to skip.
        options: Free-form global options (``k=v`` from the CLI's ``--set``).
        verify_each: Run the ONNX checker after every pass.
        work_dir: Where instruments may write files (reproducers, dumps).
    """

    target: str = "ort"
    seed: int = 0
    calibration: CalibrationSource | None = None
    instruments: list[Instrument] = field(default_factory=list)
    disabled_passes: frozenset[str] = frozenset()
    options: dict[str, Any] = field(default_factory=dict)
    verify_each: bool = False
    work_dir: Path | None = None

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from the context seed and a per-use salt (deterministic)."""
        import zlib

        return np.random.default_rng([self.seed, zlib.crc32(salt.encode())])

    def calibration_feeds(self) -> Iterator[Mapping[str, np.ndarray]]:
        """A fresh iterator over calibration feeds.

        Raises:
            CalibrationError: No calibration source was given.
        """
        from graphopt.errors import CalibrationError

        if self.calibration is None:
            raise CalibrationError("this pass needs calibration data: pass --calib PATH")
        return iter(self.calibration())
