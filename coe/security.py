"""Who may call the service, log redaction and the bind-address check: what makes coe safe to put
in front of users.

Keys live in the registry's Redis and the environment (:mod:`coe.keys`, decision 5 of DESIGN.md);
:class:`APIKeyMiddleware` asks the service's :class:`~coe.keys.KeyRing` about every request. Deny by
default: once any key exists, every route needs one except the probes in ``OPEN_PATHS``. Every key
may call every route: there are no admin-only routes (keys and the registry are managed with
``coe keys`` and ``coe-registry``, next to Redis); what an ``admin`` key may do beyond a user key is
decided where it matters (scoring feedback on another key's request, coe/feedback.py).

When no key is configured at all, auth is off (the embedded default, bound to 127.0.0.1);
:func:`check_bind` warns loudly when such a service is bound beyond loopback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger("coe.security")

#: the only routes open without a key when keys are configured (exact paths, relative to the app's
#: route prefix): liveness and readiness probes. Everything else, ``/metrics`` and the API docs
#: included, needs a key (deny by default; see docs/security.md).
OPEN_PATHS: frozenset[str] = frozenset({"/healthz", "/livez", "/readyz"})


class KeyChecker(Protocol):
    """What the middleware asks about keys (:class:`coe.keys.KeyRing` is the service's)."""

    @property
    def configured(self) -> bool: ...  # is auth on (does any key exist)?

    def verify(self, key: str | None) -> Any: ...  # the key's record (with ``public()``), or None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None otherwise)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


# ------------------------------------------------------------------------------------- ASGI middleware
def _error_body(message: str, code: str) -> bytes:
    from coe.api.protocol import error_payload

    return json.dumps(error_payload(message, "invalid_request_error", None, code)).encode()


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the app routes on: ``scope["path"]`` without the ``root_path`` a mount or Ray
    Serve's ``route_prefix`` puts in front (Ray Serve keeps the prefix in ``path``), computed the
    way Starlette's router does, so that the auth decision and the route chosen always agree."""
    path = scope.get("path", "") or ""
    root = (scope.get("root_path", "") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


async def _send_json(send: Callable, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Pure ASGI middleware, deny by default: when keys are configured, every route except the
    probes in ``open_paths`` needs ``Authorization: Bearer <key>`` (otherwise 401, code
    ``missing_api_key`` when no Bearer key was sent, ``invalid_api_key`` for a key the service does
    not know; OpenAI's error shape), whatever prefix the app is served under, unknown paths included. Streaming
    responses pass through untouched. ``scope["coe.key"]`` holds the matched record's public fields.

    ``store`` is a :class:`KeyChecker`, or a callable returning one (the service builds its key ring
    from its config after this module is imported)."""

    def __init__(self, app: Any, store: KeyChecker | Callable[[], KeyChecker],
                 open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self._store = store
        self.open_paths = open_paths

    @property
    def store(self) -> KeyChecker:
        return self._store if hasattr(self._store, "verify") else self._store()  # type: ignore[operator]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if route_path(scope) in self.open_paths or not self.store.configured:
            return await self.app(scope, receive, send)
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        token = bearer_token(auth)
        rec = self.store.verify(token)
        if rec is None:
            if token is None:  # no key sent (no header, or not a Bearer one): say so, not "invalid"
                msg, code = "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key"
            else:
                msg, code = "invalid API key (keys are managed with `coe keys`)", "invalid_api_key"
            return await _send_json(send, 401, _error_body(msg, code), [(b"www-authenticate", b'Bearer realm="coe"')])
        scope["coe.key"] = rec.public()
        return await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------- redaction
_REDACTIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?!bearer\b)[^\s'\",]+"), r"\1***"),
    (re.compile(r"\bcoe-[A-Za-z0-9_-]{16,}"), "coe-***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "sk-***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_***"),
    (re.compile(r"(?i)\b(api[_-]?key|password|passwd|secret|token)(['\"]?\s*[:=]\s*['\"]?)[^\s'\",&]+"),
     r"\1\2***"),
    (re.compile(r"((?:rediss?|https?|unix)://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
]


def redact(text: Any) -> str:
    """``text`` with anything that looks like a secret replaced by ``***``: bearer tokens, coe/OpenAI/HF
    keys, ``api_key=…``/``password=…`` pairs and passwords in URLs. For log lines and error messages."""
    s = str(text)
    for pat, repl in _REDACTIONS:
        s = pat.sub(repl, s)
    return s


_factory_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process when it is created (message and args, idempotent)."""
    global _factory_installed
    if _factory_installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = base(*args, **kwargs)
        try:
            msg = rec.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error path
            return rec
        clean = redact(msg)
        if clean != msg or rec.args:
            rec.msg, rec.args = clean, ()
        return rec

    logging.setLogRecordFactory(factory)
    _factory_installed = True


# ------------------------------------------------------------------------------------- bind check
def is_loopback(host: str) -> bool:
    h = (host or "").strip().strip("[]").lower()
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def check_bind(host: str, keys_configured: bool, warn: Callable[[str], None] | None = None) -> str | None:
    """A loud warning (returned, logged and passed to ``warn``) when the API is bound beyond loopback
    with no API key configured: anyone who can reach the port can use every expert. None if fine."""
    if is_loopback(host) or keys_configured:
        return None
    msg = (f"WARNING: coe's API is bound to {host}, reachable from other machines, and NO API KEY is "
           f"configured: anyone who can reach it can use every expert. Create a key with `coe keys add "
           f"<name>` (or set COE_API_KEYS), or bind to 127.0.0.1.")
    log.warning(msg)
    if warn is not None:
        warn(msg)
    return msg
