"""The server's errors: each names the HTTP status and the OpenAI error type a client sees
(`softprompt.serve.http` turns them into OpenAI's error envelope). No HTTP here: the
scheduler and the engines raise them too."""

from __future__ import annotations


class ServeError(Exception):
    """An error with the HTTP status and OpenAI error type the client should see."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class NotFound(ServeError):
    status = 404
    code = "model_not_found"


class Overloaded(ServeError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServeError):
    status = 503
    type = "server_error"
    code = "unavailable"


class InternalError(ServeError):
    status = 500
    type = "server_error"
    code = "internal_error"


class Forbidden(ServeError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class TooLarge(ServeError):
    status = 413
    code = "body_too_large"


__all__ = ["Forbidden", "InternalError", "NotFound", "Overloaded", "ServeError", "TooLarge", "Unauthorized",
           "Unavailable"]  # fmt: skip
