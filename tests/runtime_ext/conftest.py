"""runtime_ext tests need the built library: `make setup` builds it (CI included)."""

from __future__ import annotations

import pytest

from graphopt.backends.ext import library_path
from graphopt.errors import UsageError


@pytest.fixture(scope="session")
def ext_library() -> str:
    """The built library; fails (never skips) when it is missing."""
    try:
        return str(library_path())
    except UsageError as e:
        pytest.fail(str(e))
