"""Errors a user can act on. The CLI prints their message as one paragraph, never a traceback."""

from __future__ import annotations


class AugmentRayError(Exception):
    """Base for errors whose message is written for the user."""

    exit_code = 1


class JobSpecError(AugmentRayError):
    """The job file is wrong: bad YAML, an unknown or invalid field. Exit code 2."""

    exit_code = 2


class StorageError(AugmentRayError):
    """A path or bucket cannot be read or written (missing, no access, bad credentials)."""


class InputDataError(AugmentRayError):
    """The input data does not fit the job: missing column, wrong type, unreadable file."""


class EngineError(AugmentRayError):
    """A model cannot be found or loaded."""


class RunFailedError(AugmentRayError):
    """The run went wrong as a whole: a step rejected too many rows, rows went missing, an
    engine kept dying. Nothing is committed; the model answers so far are kept for a rerun."""


class OutputLeasedError(StorageError):
    """Another run holds the output's lease: two runs must not write one output."""


class LeaseLostError(RunFailedError):
    """This run's lease on its output was taken over (it stopped renewing it for too long), so
    it must not commit: the run that took it over writes the output."""


class ObjectReadError(StorageError):
    """An object could not be read, after its retries (the message names it)."""
