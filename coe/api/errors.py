"""OpenAI-shaped errors and the FastAPI handlers that produce them.

Every bad input gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``; a 5xx only
means a coe bug or a failed expert, never a malformed request.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.api.protocol import error_payload
from coe.errors import ErrorKind, ErrorReport

log = logging.getLogger("coe.api")


class APIError(Exception):
    """An error that becomes an OpenAI error response with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429 / 503)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(int(self.retry_after))} if self.retry_after is not None else None
        return JSONResponse(error_payload(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=headers)


#: the status of a deployment's error report: by its code where the code says more than its kind
_STATUS_BY_CODE = {"model_not_found": 404, "queue_full": 429}
_STATUS_BY_KIND = {ErrorKind.REQUEST: 400, ErrorKind.TRANSIENT: 503, ErrorKind.PERMANENT: 503,
                   ErrorKind.INTERNAL: 500}


def from_report(report: ErrorReport) -> APIError:
    """The HTTP error a deployment's :class:`~coe.errors.ErrorReport` becomes (the one place that
    maps the kinds of decision 2 to a status). Its message may quote an expert's load failure,
    which can name server paths: they are cut (:func:`hide_paths`)."""
    status = _STATUS_BY_CODE.get(report.code or "", _STATUS_BY_KIND[report.kind])
    etype = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    retry = None if report.retry_after_s is None else max(1, math.ceil(report.retry_after_s))
    return APIError(status, hide_paths(report.message) or "error", etype, report.param, report.code, retry)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = "model", code: str | None = "model_not_found") -> APIError:
    return APIError(404, message, "invalid_request_error", param, code)


def upstream_error(exc: BaseException) -> APIError | None:
    """An exception from a deployment call (pool/router replica died or is restarting, the request
    timed out) as a clean API error; None when it is not one of those."""
    from coe.limits import RequestTimeout

    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), "server_error", None, "request_timeout")
    try:
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
    except Exception:  # pragma: no cover - ray missing
        return None
    if isinstance(exc, BackPressureError):
        return APIError(429, "coe is at capacity; retry later", "rate_limit_error", None, "overloaded", 2)
    if isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, DeploymentUnavailableError,
                        ReplicaUnavailableError, rex.TaskCancelledError)):
        return APIError(503, f"an expert pool replica failed or is restarting ({type(exc).__name__}); retry",
                        "server_error", None, "expert_unavailable", 2)
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """One readable line from pydantic's error list, plus the offending parameter."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg"))), None, "invalid_json"
    if first.get("type") == "missing":
        return f"missing required parameter: '{param}'", param, "missing_required_parameter"
    msg = first.get("msg", "invalid value")
    return (f"invalid value for '{param}': {msg}" if param else msg), param, "invalid_value"


def served_endpoints(app: Any) -> list[str]:
    """``METHOD /path`` of every API route the app serves, read from its own OpenAPI schema (which
    also sees the routes Ray Serve re-mounts from the ingress class), never a hand-kept copy."""
    try:
        paths = app.openapi().get("paths", {})
    except Exception:  # pragma: no cover - a schema that cannot be built must not break a 404
        return []
    return [f"{m.upper()} {p}" for p, ops in paths.items() for m in ops]


def _not_json(request: Request, exc: RequestValidationError) -> APIError | None:
    """A body that is not a JSON object because it was not sent as JSON (text/plain, a form, no
    content type): 415 naming what to send, instead of pydantic's "Input should be a valid dictionary"."""
    errors = exc.errors()
    if not errors or tuple(errors[0].get("loc", ())) != ("body",):
        return None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return None
    got = f"Content-Type '{ctype}'" if ctype else "no Content-Type"
    return APIError(415, f"the request body must be a JSON object sent with Content-Type: application/json "
                         f"(got {got})", "invalid_request_error", None, "unsupported_media_type")


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to the OpenAI error shape with the right status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        wrong_type = _not_json(request, exc)
        if wrong_type is not None:
            return wrong_type.response()
        message, param, code = _validation_message(exc)
        return APIError(400, message, "invalid_request_error", param, code).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            # e.g. /v1/completions or /v1/embeddings: say what coe does serve
            message = (f"coe does not serve {request.method} {request.url.path}; it serves: "
                       + ", ".join(served_endpoints(request.app)))
        return APIError(exc.status_code, message, etype, None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        known = upstream_error(exc)
        if known is not None:
            log.warning("%s", known.message)
            return known.response()
        from coe.api.request_id import request_id_of

        resp = internal_error(request_id_of(request), exc).response()
        # Starlette answers this handler outside the user middlewares: add the id here
        resp.headers["x-request-id"] = request_id_of(request)
        return resp


def internal_error(rid: str, exc: BaseException) -> APIError:
    """A 500 that says only that it happened and the request id; the traceback (which can name
    pids, node IPs, actor ids and file paths) goes to the log, under the same id."""
    log.error("unhandled error in request %s", rid, exc_info=exc)
    return APIError(500, f"internal error; request id {rid} (the server log has the details)", "server_error",
                    None, "internal_error")


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/:'\"()\[\],;]+){2,}/?")


def hide_paths(text: str | None) -> str | None:
    """``text`` with absolute server paths cut to their last part (``…/model.safetensors``): status
    reasons and load errors reach every client, the layout of the server's disk should not."""
    if not text:
        return text
    return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
