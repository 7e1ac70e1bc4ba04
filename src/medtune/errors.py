"""Error types that reach users.

Every error a person can fix (a bad dataset line, a wrong recipe key, a missing model) is raised as a
`MedtuneError` subclass whose message names *where* (file, line, key) and *what* (expected vs
found). The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class MedtuneError(Exception):
    """Base class for errors caused by user input or environment, printed without a traceback."""

    exit_code = 2


class ConfigError(MedtuneError):
    """A recipe or setting is invalid. `problems` lists every problem found, one per line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class DataError(MedtuneError):
    """A dataset file or record is invalid; the message names file and line."""


class ModelError(MedtuneError):
    """A model cannot be found, loaded or used as asked."""


class HardwareError(MedtuneError):
    """The requested feature needs hardware this machine lacks (e.g. QLoRA or vLLM without CUDA)."""
