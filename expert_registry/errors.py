"""Errors of the expert registry.

Every error a user can cause derives from :class:`RegistryError`; its message is one line that
names the thing at fault (which expert, which file, which field, which URL), so the CLI can print
it as is and exit with code 2, and the service can put it into an OpenAI-shaped error body.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class: a registry operation was refused; nothing was changed."""

    exit_code = 2

    def __str__(self) -> str:  # keep messages on one line, whatever the cause text holds
        return " ".join(BaseException.__str__(self).split())


class InvalidExpert(RegistryError):
    """An expert spec failed validation (bad name, unknown field, capability outside [0, 1]...)."""


class InvalidCategoryMap(RegistryError):
    """A category map is malformed or names experts that are not registered."""


class ExpertNotFound(RegistryError, KeyError):
    """No expert of that name in this namespace."""

    def __str__(self) -> str:  # KeyError would quote the message
        return RegistryError.__str__(self)


class ExpertExists(RegistryError):
    """An expert of that name is already registered in this namespace."""


class ExpertInUse(RegistryError):
    """The expert is still named by the category map (remove with ``force=True`` to drop it there too)."""


class ModelNotFound(RegistryError):
    """The expert's model (path, GGUF file or hub id) cannot be found."""


class ModelUnreadable(RegistryError):
    """The model was found but its config or GGUF header cannot be read."""


class RedisUnavailable(RegistryError):
    """Redis cannot be reached (the message names the URL, password masked)."""


class RegistryBusy(RegistryError):
    """A write kept losing optimistic-locking races (WATCH) and gave up."""


class EmbeddedRedisError(RegistryError):
    """The embedded redis-server could not be found, started, or stopped."""
