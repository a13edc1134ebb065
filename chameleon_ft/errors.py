"""The error hierarchy: every error chameleon-ft raises on purpose derives from :class:`ChameleonFTError`.

The command-line entry points print such an error as one line (``error: <message>``) and exit with
status 2; anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback of
every error.
"""

from __future__ import annotations


class ChameleonFTError(Exception):
    """A problem with the user's config, data, checkpoint or command (not a bug in chameleon-ft)."""


class ConfigError(ChameleonFTError, ValueError):
    """A setting is invalid, or settings contradict each other."""


class DataError(ChameleonFTError, ValueError):
    """Input data is unusable: a file, a record, an image."""


class CheckpointError(ChameleonFTError, ValueError):
    """A checkpoint or adapter directory is missing files, is malformed, or does not fit the model."""


class RunError(ChameleonFTError, RuntimeError):
    """A run cannot start or continue: a diverged loss, a mismatched resume, a busy run directory."""


class RunInterrupted(RunError):
    """The user stopped a run (Ctrl-C, SIGTERM) and it saved a checkpoint to continue from."""

    exit_code = 130  # the shell's code for a SIGINT
