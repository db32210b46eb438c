"""The command line's exit codes and its one error type (imported by the parser and by every command)."""

from __future__ import annotations

EXIT_BUG, EXIT_ARGS, EXIT_LOAD, EXIT_OUTPUT, EXIT_QUANT, EXIT_INTERRUPT = 1, 2, 3, 4, 5, 130


class CliError(Exception):
    """An error the command line reports as one line, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
