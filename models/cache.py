"""Where built models go, and how a build is committed.

A recipe builds one artifact (an ``.onnx`` file) under :func:`cache_dir`. A build is
skipped when the artifact exists and its stamp file (``<name>.stamp``, holding the recipe's
version string) matches. Otherwise the recipe writes to a temporary file in the same
folder, which is moved into place with :func:`os.replace` (atomic on one filesystem), and
the stamp is written last. A crash mid-build therefore leaves either the old artifact with
no stamp (rebuilt next time) or nothing; never a half-written model under the final name.

Concurrent builds of the same artifact (e.g. two pytest-xdist workers) are serialised by
an advisory file lock where the platform has :mod:`fcntl`; the second builder finds the
first one's result and returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "GRAPHOPT_CACHE"
"""Environment variable that overrides the cache folder."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the folder that holds ``models/``)."""


def cache_dir() -> Path:
    """Return the model cache folder, creating it if needed.

    Returns:
        ``$GRAPHOPT_CACHE`` when set and non-empty, else ``<repo>/.cache/models``.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    path = Path(env).expanduser() if env else REPO_ROOT / ".cache" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stamp_path(artifact: Path) -> Path:
    """Return the stamp file that records which recipe version built ``artifact``."""
    return artifact.with_name(artifact.name + ".stamp")


def is_current(artifact: Path, version: str) -> bool:
    """Tell whether ``artifact`` exists and was built by recipe ``version``."""
    stamp = stamp_path(artifact)
    if not artifact.is_file() or not stamp.is_file():
        return False
    try:
        return stamp.read_text(encoding="utf-8").strip() == version.strip()
    except OSError:
        return False


def _default_file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give (mkstemp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _build_lock(artifact: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for building ``artifact`` (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_file = artifact.with_name(artifact.name + ".lock")
    with open(lock_file, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_build(
    name: str,
    version: str,
    builder: Callable[[Path], None],
    *,
    force: bool = False,
) -> Path:
    """Build ``cache_dir()/name`` with ``builder`` unless a current build is already there.

    Args:
        name: File name of the artifact inside :func:`cache_dir`, e.g. ``"digits-cnn.onnx"``.
        version: Recipe version string; a different stamp triggers a rebuild. Include
            anything that changes the artifact (recipe revision, exporter, torch version).
        builder: Called with a temporary path in the cache folder (same filesystem); it must
            write the complete artifact there, and may raise to abort (nothing is committed).
            Any scratch files it needs should go in a temporary folder of its own.
        force: Rebuild even when the stamp matches.

    Returns:
        The path of the committed artifact.
    """
    out = cache_dir() / name
    if not force and is_current(out, version):
        logger.debug("cache hit: %s (%s)", out, version)
        return out
    with _build_lock(out):
        # Another process may have finished the build while we waited for the lock.
        if not force and is_current(out, version):
            logger.debug("cache hit after lock: %s", out)
            return out
        with contextlib.suppress(FileNotFoundError):
            stamp_path(out).unlink()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        start = time.perf_counter()
        try:
            logger.info("building %s (%s)", out.name, version)
            builder(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise RuntimeError(f"recipe for {name} wrote nothing to {tmp}")
            os.chmod(tmp, _default_file_mode())
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _write_text_atomic(stamp_path(out), version.strip() + "\n")
        logger.info(
            "built %s in %.1fs (%.1f MB)",
            out,
            time.perf_counter() - start,
            out.stat().st_size / 1e6,
        )
    return out
