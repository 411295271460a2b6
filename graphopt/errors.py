"""The graphopt error tree.

Every error carries a one-line message that says what went wrong, where (file, tensor,
node, pipeline column) and, where possible, how to fix it. The CLI maps each class to a
documented exit code (see docs/cli.md and :mod:`graphopt.cli.exit_codes`).
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose.

    Attributes:
        exit_code: The CLI exit code this error maps to.
    """

    exit_code: int = 1

    def one_line(self) -> str:
        """Returns the message folded onto a single line."""
        return " ".join(str(self).split())


class UsageError(GraphoptError):
    """A bad flag, a missing path, a bad option value (exit 2)."""

    exit_code = 2


class PipelineSyntaxError(UsageError):
    """Pipeline text that does not parse (exit 2).

    Attributes:
        text: The pipeline text.
        column: The 1-based column where parsing failed.
    """

    def __init__(self, message: str, text: str, column: int) -> None:
        self.text = text
        self.column = column
        super().__init__(f"pipeline syntax error at column {column}: {message} in {text!r}")


class UnknownPassError(UsageError):
    """A pass or pipeline name that is not registered (exit 2)."""


class InvalidModelError(GraphoptError):
    """Invalid or unsupported input model or data (exit 3)."""

    exit_code = 3


class CalibrationError(InvalidModelError):
    """Calibration data that cannot be used: NaN/Inf, wrong dtype/shape, no samples (exit 3)."""


class SecurityError(GraphoptError):
    """A security policy violation: external data outside the model folder, links (exit 4)."""

    exit_code = 4


class VerificationError(GraphoptError):
    """The result is not equivalent to the input within tolerance (exit 5)."""

    exit_code = 5


class ResourceLimitError(GraphoptError):
    """A memory, disk or time limit was hit (exit 6)."""

    exit_code = 6


class OutputConflictError(GraphoptError):
    """The destination exists without --overwrite, or is the input (exit 7)."""

    exit_code = 7


class PassError(GraphoptError):
    """A pass failed; names the pass, its position and the passes that ran before it (exit 1).

    Attributes:
        pass_name: Registry name of the failing pass.
        position: 0-based index of the pass in its pipeline.
        already_run: Names of the passes that completed before it.
    """

    def __init__(
        self, pass_name: str, position: int, already_run: list[str], cause: BaseException
    ) -> None:
        self.pass_name = pass_name
        self.position = position
        self.already_run = list(already_run)
        self.cause = cause
        ran = ",".join(already_run) if already_run else "none"
        super().__init__(
            f"pass '{pass_name}' (position {position}) failed: "
            f"{type(cause).__name__}: {cause} [passes already run: {ran}]"
        )


class PreconditionError(PassError):
    """A pass's ``requires`` check rejected the model."""


class PostconditionError(PassError):
    """A pass's ``ensures`` check (or verify-each) rejected the model it produced."""


class LoweringError(GraphoptError):
    """A backend cannot lower a node (exit 3).

    Attributes:
        backend: The backend's name.
        node: The node's name.
    """

    exit_code = 3

    def __init__(self, backend: str, node: str, reason: str) -> None:
        self.backend = backend
        self.node = node
        super().__init__(f"backend '{backend}' cannot lower node '{node}': {reason}")


class PluginError(UsageError):
    """A plugin that fails to load, declares a wrong API version or a duplicate name (exit 2)."""
