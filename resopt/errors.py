"""The exceptions a caller may want to treat differently, each with its own exit code.

Library code raises these; only the CLI turns them into ``Error: ...`` / ``Hint: ...`` lines and exit
codes. Anything else that escapes is a bug and shows a traceback.
"""

from __future__ import annotations


class ResoptError(Exception):
    """Base class: a failure the user can act on. ``hint`` is an optional next step."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # A DataLoader worker re-raises our error in the parent as ``cls("Caught X in DataLoader worker
        # ...\nOriginal Traceback ...")``: keep the one line the worker raised, not the whole traceback.
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(ResoptError):
    """Invalid option values or combinations."""

    exit_code = 2


class InputFileError(ResoptError):
    """A model file that is missing, of the wrong kind, corrupt or unsafe to load."""

    exit_code = 3


class DataError(ResoptError):
    """A data folder that is missing, empty, or does not match the model."""

    exit_code = 4


class OutputError(ResoptError):
    """An output could not be written (disk full, file size limit, permissions); nothing is left behind."""

    exit_code = 1


class MissingDependencyError(ResoptError):
    """An optional library (TensorRT, a CUDA build, ...) is not installed."""

    exit_code = 5


class VerificationError(ResoptError):
    """A transform's output disagrees with its parent beyond the tolerance (export parity, build parity)."""

    exit_code = 6


class AccuracyGateError(ResoptError):
    """An accuracy guard (e.g. ``quantize --max-drop``) could not be met by any setting."""

    exit_code = 7


class EnvironmentMismatchError(ResoptError):
    """The hardware or library versions cannot run this artifact (no GPU, engine from another GPU...)."""

    exit_code = 8


def choice_error(kind: str, value: object, allowed: list[str] | tuple[str, ...]) -> UsageError:
    """A ``UsageError`` naming the bad value and the allowed set."""
    return UsageError(f"unknown {kind} {value!r}; choose one of: {', '.join(allowed)}")
