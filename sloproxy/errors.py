"""OpenAI-format errors: every failure a client sees has this shape and the right status."""

from __future__ import annotations

import msgspec

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """Raised anywhere in request handling; rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_object(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return msgspec.json.encode({"error": error_object(status, message, param=param, code=code)})


def error_frame(status: int, message: str, *, code: str | None = None) -> bytes:
    """An error inside an SSE stream (HTTP status already sent), followed by ``[DONE]``."""
    return b"data: " + error_body(status, message, code=code) + b"\n\ndata: [DONE]\n\n"
