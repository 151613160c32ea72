"""API keys, log redaction and the bind-address check: what makes coe safe to put in front of users.

Keys
----
Two roles: ``user`` keys may call every route (all need a key once one exists, except the probes in
``OPEN_PATHS``); ``admin`` keys may too, and are the only
ones accepted on admin routes (anything that changes the registry over HTTP; see ``ADMIN_PREFIXES``).
Keys come from, in this order (all of them count):

* ``COE_API_KEYS`` / ``COE_ADMIN_KEYS``: comma-separated plain keys (the environment is the secret
  store there, e.g. a Kubernetes Secret). They are hashed when read; the plain text is not kept.
* the keys file, ``$COE_API_KEYS_FILE`` or ``$COE_HOME/api_keys.json`` (mode 0600), written by
  ``coe keys add``: it holds only salted SHA-256 hashes. The plain key is printed once, by ``add``.

Why SHA-256 and not scrypt: coe's keys are 256-bit random tokens, so guessing one from its hash is
infeasible whatever the hash; a deliberately slow hash would instead cost every request milliseconds
of CPU and hand unauthenticated clients a cheap way to burn it (one scrypt per wrong key).

Verification compares the presented key's salted hash with every stored hash using
:func:`hmac.compare_digest`, without stopping at the first match, so its timing does not depend on
which key (if any) matched. The running service re-reads the keys file when it changes (checked at
most once a second), so ``coe keys add`` / ``coe keys remove`` take effect without a restart.

When no key is configured at all, auth is off (the embedded default, bound to 127.0.0.1);
:func:`check_bind` warns loudly when such a service is bound beyond loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("coe.security")

Role = Literal["user", "admin"]
ENV_KEYS = "COE_API_KEYS"
ENV_ADMIN_KEYS = "COE_ADMIN_KEYS"
ENV_KEYS_FILE = "COE_API_KEYS_FILE"
KEYS_FILE = "api_keys.json"
KEY_PREFIX = "coe-"
FILE_FORMAT = 1
#: the only routes open without a key when keys are configured (exact paths, relative to the app's
#: route prefix): liveness and readiness probes. Everything else, ``/metrics`` and the API docs
#: included, needs a key (deny by default; see docs/security.md).
OPEN_PATHS: frozenset[str] = frozenset({"/healthz", "/livez", "/readyz"})
#: routes that need an *admin* key (none exist yet: no HTTP route changes the registry)
ADMIN_PREFIXES: tuple[str, ...] = ("/v1/admin/", "/admin/")
RELOAD_EVERY_S = 1.0


class KeyFileError(Exception):
    """The keys file cannot be read or written (the message names the file)."""


# ------------------------------------------------------------------------------------- hashing
def _hash(key: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + key.encode("utf-8", "surrogateescape")).digest()


def _hint(key: str) -> str:
    """A few leading characters to tell keys apart; only for long generated keys (a short key's
    prefix would give too much of it away)."""
    return key[:8] + "…" if key.startswith(KEY_PREFIX) and len(key) >= 40 else "…"


def new_key() -> str:
    """A fresh API key: ``coe-`` + 43 url-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: never the key itself, only its salted hash and what to show for it."""

    id: str
    name: str
    role: Role
    salt: str  # hex
    sha256: str  # hex of sha256(salt + key)
    hint: str  # first characters, e.g. "coe-Ab3x…", so a user can tell keys apart
    created_at: str
    source: str = "file"  # "file" | "env"

    @classmethod
    def create(cls, key: str, name: str, role: Role, source: str = "file") -> KeyRecord:
        salt = secrets.token_bytes(16)
        return cls(id=secrets.token_hex(4), name=name, role=role, salt=salt.hex(), sha256=_hash(key, salt).hex(),
                   hint=_hint(key), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   source=source)

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(_hash(key, bytes.fromhex(self.salt)), bytes.fromhex(self.sha256))

    def public(self) -> dict[str, str]:
        """What ``coe keys list`` shows (no hash, no salt)."""
        return {"id": self.id, "name": self.name, "role": self.role, "hint": self.hint,
                "created_at": self.created_at, "source": self.source}


# ------------------------------------------------------------------------------------- keys file
def keys_file_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit`` > ``$COE_API_KEYS_FILE`` > ``$COE_HOME/api_keys.json``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_KEYS_FILE, "").strip()
    if env:
        return Path(env).expanduser()
    from expert_registry.paths import coe_home

    return coe_home() / KEYS_FILE


def read_keys_file(path: Path) -> list[KeyRecord]:
    """Records of the keys file; [] when it does not exist."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KeyFileError(f"cannot read keys file {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            raise ValueError(f"expected {{'format': {FILE_FORMAT}, 'keys': [...]}}")
        return [KeyRecord(**{**k, "source": "file"}) for k in doc.get("keys", [])]
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"keys file {path} is malformed: {e}") from None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_keys_file(path: Path, records: Iterable[KeyRecord]) -> None:
    """Atomic write with mode 0600 from the start (the temp file is never world-readable)."""
    doc = {"format": FILE_FORMAT,
           "keys": [{k: v for k, v in r.__dict__.items() if k != "source"} for r in records]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def add_key(name: str, role: Role = "user", path: str | os.PathLike[str] | None = None) -> tuple[str, KeyRecord]:
    """Create a key, store its hash, return ``(plain key, record)``; the plain key is not stored."""
    if role not in ("user", "admin"):
        raise ValueError(f"role must be 'user' or 'admin', got {role!r}")
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name or ""):
        raise ValueError(f"invalid key name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ @ -")
    p = keys_file_path(path)
    key = new_key()
    rec = KeyRecord.create(key, name, role)
    with _locked(p):
        records = read_keys_file(p)
        if any(r.name == name for r in records):
            raise ValueError(f"a key named {name!r} already exists in {p} (remove it first)")
        _write_keys_file(p, [*records, rec])
    return key, rec


def remove_key(name_or_id: str, path: str | os.PathLike[str] | None = None) -> KeyRecord:
    """Revoke a key by name or id; raises KeyError if none matches."""
    p = keys_file_path(path)
    with _locked(p):
        records = read_keys_file(p)
        gone = [r for r in records if name_or_id in (r.name, r.id)]
        if not gone:
            raise KeyError(f"no key named or with id {name_or_id!r} in {p}")
        _write_keys_file(p, [r for r in records if r not in gone])
    return gone[0]


def list_keys(path: str | os.PathLike[str] | None = None) -> list[KeyRecord]:
    return read_keys_file(keys_file_path(path))


# ------------------------------------------------------------------------------------- key store
def _split_env(value: str | None) -> list[str]:
    return [k.strip() for k in (value or "").split(",") if k.strip()]


class KeyStore:
    """The keys a running service accepts: env keys (hashed at load) + the keys file (re-read on change)."""

    def __init__(self, env: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None,
                 reload_every_s: float = RELOAD_EVERY_S):
        env = os.environ if env is None else env
        self._env_records = [KeyRecord.create(k, f"env-{i}", "user", "env")
                             for i, k in enumerate(_split_env(env.get(ENV_KEYS)))]
        self._env_records += [KeyRecord.create(k, f"env-admin-{i}", "admin", "env")
                              for i, k in enumerate(_split_env(env.get(ENV_ADMIN_KEYS)))]
        self.path = keys_file_path(path or env.get(ENV_KEYS_FILE) or None)
        self._file_records: list[KeyRecord] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._reload_every = reload_every_s
        self._lock = threading.Lock()
        self.reload(force=True)

    @property
    def records(self) -> list[KeyRecord]:
        return self._env_records + self._file_records

    @property
    def configured(self) -> bool:
        """True when at least one key exists: then every protected route needs one."""
        self.reload()
        return bool(self._env_records or self._file_records)

    def reload(self, force: bool = False) -> None:
        """Re-read the keys file if it changed (stat checked at most every ``reload_every_s``)."""
        now = time.monotonic()
        if not force and now - self._checked < self._reload_every:
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            except OSError as e:
                log.error("cannot stat keys file %s: %s; keeping %d key(s)", self.path, e, len(self._file_records))
                return
            if stamp == self._stamp and not force:
                return
            try:
                self._file_records = read_keys_file(self.path) if stamp else []
                self._stamp = stamp
                _warn_if_loose(self.path)
            except KeyFileError as e:  # keep the last good set: a half-edited file must not open the door
                log.error("%s; keeping the previous %d key(s)", e, len(self._file_records))

    def verify(self, key: str | None) -> KeyRecord | None:
        """The record ``key`` matches, or None. Checks every record (no early exit)."""
        self.reload()
        if not key:
            return None
        found = None
        for rec in self.records:
            if rec.matches(key) and found is None:
                found = rec
        return found


def _warn_if_loose(path: Path) -> None:
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("keys file %s has mode %o; it should be 0600 (chmod 600 %s)", path, mode, path)


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
    probes in ``open_paths`` needs ``Authorization: Bearer <key>`` (401 ``invalid_api_key``
    otherwise), whatever prefix the app is served under, unknown paths included; admin routes
    need an admin key (403). Streaming responses pass through untouched. ``scope["coe.key"]``
    holds the matched record's public fields.

    The store is anything with ``configured`` (is auth on?) and ``verify(key) -> record | None``
    (the one call that checks a key), so another key store (e.g. one in Redis) plugs in."""

    def __init__(self, app: Any, store: KeyStore | Callable[[], KeyStore] | None = None,
                 open_paths: frozenset[str] = OPEN_PATHS, admin: tuple[str, ...] = ADMIN_PREFIXES):
        self.app = app
        self._store = store
        self.open_paths = open_paths
        self.admin = admin

    @property
    def store(self) -> KeyStore:
        """The store now (a callable lets the service build it from its config after import)."""
        if self._store is None:
            self._store = KeyStore()
        return self._store() if callable(self._store) and not isinstance(self._store, KeyStore) else self._store

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        needs_admin = path.startswith(self.admin)
        if (path in self.open_paths and not needs_admin) or not self.store.configured:
            return await self.app(scope, receive, send)
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        rec = self.store.verify(bearer_token(auth))
        if rec is None:
            msg = ("missing API key: send 'Authorization: Bearer <key>'" if not auth else
                   "invalid API key (keys are managed with `coe keys`)")
            return await _send_json(send, 401, _error_body(msg, "invalid_api_key"),
                                    [(b"www-authenticate", b'Bearer realm="coe"')])
        if needs_admin and rec.role != "admin":
            return await _send_json(send, 403, _error_body("this operation needs an admin key",
                                                           "insufficient_permissions"))
        scope["coe.key"] = rec.public()
        return await self.app(scope, receive, send)


def install_auth(app: Any, store: KeyStore | None = None) -> KeyStore:
    """Add :class:`APIKeyMiddleware` to a FastAPI/Starlette app; returns the store it uses."""
    store = store or KeyStore()
    app.add_middleware(APIKeyMiddleware, store=store)
    return store


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
           f"<name>` (or set {ENV_KEYS}), or bind to 127.0.0.1.")
    log.warning(msg)
    if warn is not None:
        warn(msg)
    return msg
