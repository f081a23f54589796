"""The project's error types and the exit codes the CLI maps them to."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# what a shell reports for a process ended by SIGPIPE (128 + 13): its reader closed the pipe
EXIT_BROKEN_PIPE = 141


class CorpError(Exception):
    """An error the user can fix; the CLI prints its message as one line.

    `exit_code` is 2 for bad usage or bad input and 1 for runtime failures.
    """

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(CorpError):
    """Bad input: a path, a value, a file that does not match what it should."""


class ArtifactError(InputError):
    """A statistics, masks or checkpoint file that is missing, foreign, truncated or inconsistent."""


class UnsupportedModelError(InputError):
    """A model whose architecture corp cannot prune."""


class NumericalError(CorpError):
    """Non-finite activations or a solve that cannot be made well posed."""

    exit_code = EXIT_RUNTIME


def existing_file(path: Path, what: str) -> Path:
    """The path is a file (the CLI's one-line refusal otherwise)."""
    if not path.is_file():
        raise CorpError(f"{what} {path} does not exist or is not a file")
    return path
