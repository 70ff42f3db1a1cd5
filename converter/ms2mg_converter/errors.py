"""Typed errors of the converter and the exit codes they map to.

Every error the converter raises on purpose is a `ConversionError`. Its message says what failed, where
(file, tensor, flag) and what to do. The command line turns it into one paragraph on stderr, the exit code
below and the `--result-file` JSON; it never prints a traceback for these.

Exit codes are part of the interface: the operator maps the deterministic ones (2-5) to a Job
`podFailurePolicy` rule `FailJob`, so a bad input is not retried.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of `ms2mg` (documented in README.md)."""

    OK = 0
    INTERNAL = 1
    """An unexpected error (a bug): the message and a traceback go to stderr."""
    USAGE = 2
    """Bad or contradictory flags, or a needed flag is missing."""
    INVALID_SOURCE = 3
    """The source checkpoint is unreadable, corrupt, or does not match the model description."""
    DESTINATION = 4
    """The destination exists and is not empty (no --overwrite), or cannot be written."""
    VERIFICATION = 5
    """The written checkpoint does not match the source."""
    IO = 6
    """An operating-system I/O error while running (disk full, I/O error): may succeed on retry."""
    INTERRUPTED = 130
    """Stopped by SIGINT or SIGTERM; nothing was left at the destination."""


DETERMINISTIC_EXIT_CODES: tuple[int, ...] = (
    ExitCode.USAGE,
    ExitCode.INVALID_SOURCE,
    ExitCode.DESTINATION,
    ExitCode.VERIFICATION,
)
"""Exit codes that a retry cannot fix (the operator fails the Job at once on these)."""


class ConversionError(Exception):
    """Base of every error the converter raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL
    reason: str = "InternalError"
    """A CamelCase reason, used as the Kubernetes condition reason."""


class UsageError(ConversionError):
    """A flag is missing, malformed or contradicts another flag."""

    exit_code = ExitCode.USAGE
    reason = "InvalidArguments"


class SourceError(ConversionError):
    """The source checkpoint cannot be read or is not what the flags describe."""

    exit_code = ExitCode.INVALID_SOURCE
    reason = "InvalidSource"


class ShapeError(SourceError):
    """A tensor's shape contradicts the architecture (from flags, YAML or other tensors)."""

    reason = "ShapeMismatch"


class UnknownKeyError(SourceError):
    """The source holds a key that no mapping table knows (and no --ignore-keys pattern matches)."""

    reason = "UnknownKey"


class MissingKeyError(SourceError):
    """A tensor the architecture needs is not in the source."""

    reason = "MissingKey"


class NonFiniteError(SourceError):
    """A tensor holds NaN or Inf values (refused unless --allow-nonfinite)."""

    reason = "NonFiniteWeights"


class ParallelismError(UsageError):
    """The model cannot be split for the requested tensor/pipeline parallel sizes."""

    reason = "ParallelismMismatch"


class DestinationError(ConversionError):
    """The destination exists and is not empty, or cannot be written."""

    exit_code = ExitCode.DESTINATION
    reason = "DestinationNotWritable"


class DestinationExistsError(DestinationError):
    reason = "DestinationExists"


class VerificationError(ConversionError):
    """The written checkpoint does not match the source."""

    exit_code = ExitCode.VERIFICATION
    reason = "VerificationFailed"


class ConversionIOError(ConversionError):
    """An operating-system error while reading or writing (disk full, I/O error)."""

    exit_code = ExitCode.IO
    reason = "IOError"


class InterruptedConversion(ConversionError):
    exit_code = ExitCode.INTERRUPTED
    reason = "Interrupted"
