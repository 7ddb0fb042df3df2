"""Typed errors. Library code raises these with a hint; only the CLI turns them into messages."""

from __future__ import annotations


class AbliterateError(Exception):
    """Base error: `str(err)` names the problem, `err.hint` says how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message the CLI prints: problem, then fix."""
        text = str(self)
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(AbliterateError):
    """A bad option value or combination."""


class ModelError(AbliterateError):
    """The model can't be found, loaded or is of an unsupported family."""


class CheckpointError(AbliterateError):
    """A checkpoint on disk is missing, corrupt or inconsistent."""


class DataError(AbliterateError):
    """A prompt source or data file is missing or malformed."""


class OutputError(AbliterateError):
    """The output location can't be written safely."""


class ResourceError(AbliterateError):
    """The machine lacks the memory or disk space a run needs (the pre-flight check, before anything runs)."""


class PublishError(AbliterateError):
    """Uploading to the Hugging Face hub failed: no token, no permission, or the hub kept failing."""


class VerifyError(AbliterateError):
    """An edited checkpoint does not match its provenance: changed files or a tensor that is not orthogonal."""
