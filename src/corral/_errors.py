"""corral's exceptions: one root, programmer misuse kept apart from runtime failures.

Every error carries structured fields and survives pickling (they cross process boundaries).
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """Root of every error corral raises."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for name, value in fields.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CorralError], message: str, fields: dict[str, Any]) -> CorralError:
    err = cls.__new__(cls)
    CorralError.__init__(err, message, **fields)
    return err


class UsageError(CorralError):
    """The program used corral wrongly: fix the code or the command line."""


class InvalidCursor(UsageError):
    """A cursor (or page token) for listing runs that the lister did not give."""


class WorkflowNotFound(UsageError):
    """A workflow reference points at no file, module or function."""


class InvalidInput(UsageError):
    """A run's input does not validate against the workflow's input type."""


class RunNotFound(CorralError):
    """No run has this id."""


class RunConflict(CorralError):
    """A run id was submitted again with another workflow or input."""


class RunFinished(CorralError):
    """The run has already finished: it takes no more signals."""


class StoreError(CorralError):
    """The store cannot be used: corrupted, locked, or written by an unknown version."""


class NonDeterminismError(CorralError):
    """Replay found workflow code that does not match the run's journal."""


class StepFailed(CorralError):
    """A step failed after its retries; ``error_type`` and ``error`` describe the last attempt."""

    step: str
    error_type: str
    error: str
    attempts: int


class RunFailed(CorralError):
    """A run (or a child run) ended with an error."""

    run_id: str
    error_type: str | None
    error: str | None


class RunCancelled(CorralError):
    """A run (or a child run) was cancelled."""


class SignalTimeout(CorralError, TimeoutError):
    """``Context.wait_for`` reached its timeout with no signal and no default."""


class NonRetryable(CorralError):
    """Raise from a step to fail it at once, without further attempts."""


class UsageLimitExceeded(CorralError):
    """An agent crossed a limit on turns, tokens or cost; ``limit``, ``used``, ``allowed``."""


class LoopDetected(CorralError):
    """An agent repeats itself without progress; ``pattern`` says how."""


class OutputInvalid(CorralError):
    """An agent's final output failed validation more times than it may retry."""


class ProviderError(CorralError):
    """A model provider answered with an error; ``status``, ``body`` (an excerpt) and
    ``headers`` say what it said."""
