"""Errors of the router.

Each message is one line that names what is at fault (which model name, which file and line,
which constraint), so the CLI prints it as is and exits with code 2, and the service can put it
into an OpenAI-shaped error body.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class of the errors a user can cause through the router."""

    exit_code = 2

    def __str__(self) -> str:  # one line, whatever the cause text holds
        return " ".join(super().__str__().split())


class UnknownModel(RouterError, ValueError):
    """The request's ``model`` is neither ``coe``, ``coe/<category>`` nor an expert's name."""

    def __init__(self, model: str, valid: list[str]):
        self.model = model
        self.valid = list(valid)
        super().__init__(f"unknown model {model!r}; valid models: {', '.join(self.valid)}")


class NoEligibleExpert(RouterError):
    """The hard constraints (allowed set, context length, cost, failed status) exclude every expert."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None):
        self.reasons = dict(reasons or {})
        super().__init__(message)


class DataError(RouterError, ValueError):
    """A training/evaluation file is malformed (the message names the file and line)."""


class ArtifactError(RouterError):
    """A saved router/classifier folder is missing files or was written by an incompatible version."""
