"""The errors ftjobs raises, in one small tree.

    FtjobsError
    ├── ConfigError                 bad settings file or environment; the CLI prints it and exits 2
    ├── RequestError                a webhook request we refuse; carries the HTTP status and a short code
    │   ├── SignatureError          401: missing header, bad signature, timestamp outside tolerance
    │   ├── NotJSONError            400: the body is not JSON
    │   ├── WebhookIdError          400: a signed webhook-id outside its grammar (or too long)
    │   ├── BodyTimeoutError        408: the body arrived too slowly
    │   ├── PayloadTooLargeError    413: the body is over the limit
    │   ├── UnsupportedMediaError   415: the content type is not JSON
    │   └── UnavailableError        503: Redis could not take the write (the sender retries)
    ├── CommandFailed               a CLI command could not do what was asked; the CLI prints it, exits 1 or 2
    └── HandlerError                raised by handlers; the worker owns what happens next
        ├── RetryLater              try again (optionally after `after` seconds)
        └── PermanentFailure        do not retry: dead-letter now

The receiver's middleware is the only place a `RequestError` becomes an HTTP response.
"""

from __future__ import annotations

from http import HTTPStatus


class FtjobsError(Exception):
    """Base of every error ftjobs raises on purpose."""


class ConfigError(FtjobsError):
    """The configuration is wrong; the message names the key (e.g. `handlers[1].when.status`)."""


class RequestError(FtjobsError):
    """A request we refuse: `status` is the HTTP status, `code` a stable machine-readable word."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    code: str = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SignatureError(RequestError):
    status = HTTPStatus.UNAUTHORIZED
    code = "invalid_signature"


class NotJSONError(RequestError):
    status = HTTPStatus.BAD_REQUEST
    code = "invalid_json"


class WebhookIdError(RequestError):
    status = HTTPStatus.BAD_REQUEST
    code = "invalid_webhook_id"


class BodyTimeoutError(RequestError):
    status = HTTPStatus.REQUEST_TIMEOUT
    code = "body_timeout"


class PayloadTooLargeError(RequestError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class UnsupportedMediaError(RequestError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class UnavailableError(RequestError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HandlerError(FtjobsError):
    """Base for what a handler raises to steer the worker's retry policy."""


class RetryLater(HandlerError):
    """A transient failure: deliver again later, after `after` seconds if given, else by the backoff."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class PermanentFailure(HandlerError):
    """A failure retrying cannot fix (e.g. the target answered 4xx): dead-letter the event now."""


class CommandFailed(FtjobsError):
    """A CLI command could not do what was asked (nothing to connect to, an unknown entry id): the CLI prints
    the message on one line and exits with `code` (1 a runtime failure, 2 a usage error)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
