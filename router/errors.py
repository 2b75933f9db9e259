"""The router's exception tree. Each class carries its HTTP status and OpenAI error type.

```
OpenWeightError                     500 internal_error
├── ClientError                     4xx: the caller's own mistake, never a fallback trigger
│   ├── InvalidRequest              400 invalid_request_error
│   ├── AuthenticationFailed        401 authentication_error
│   ├── PermissionDenied            403 permission_error
│   ├── NotFound                    404 invalid_request_error
│   │   └── ModelNotFound           404 model_not_found
│   ├── MethodNotAllowed            405
│   ├── RequestTimeout              408 the request did not arrive in time
│   ├── PayloadTooLarge             413
│   ├── UnsupportedMediaType        415
│   ├── HeadersTooLarge             431
│   ├── ClientDisconnected          499 (recorded, never sent: the client left mid-request)
│   └── RateLimited                 429 rate_limit_error (Retry-After)
└── UpstreamError                   an attempt at one upstream failed; the dispatcher may fall back
    ├── UpstreamConnectError        502 connection refused / reset / DNS
    ├── UpstreamTimeout             504 connect or first-byte timeout
    ├── UpstreamProtocolError       502 the upstream broke the HTTP exchange
    ├── UpstreamSaturated           503 the router's in-flight limit for it is reached (max_connections)
    ├── UpstreamUnavailable         503 no upstream left to try (all failed, open or inactive)
    └── ServiceShuttingDown         503 the router is draining
```
Third-party exceptions (the HTTP client's) are translated into this tree in exactly one place,
:func:`router.upstreams.http.map_client_errors`.
"""

from __future__ import annotations

import json

from router.outcomes import Outcome


class OpenWeightError(Exception):
    """Base of every error the router renders to a client."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        """The OpenAI error JSON."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


class ClientError(OpenWeightError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    pass


class AuthenticationFailed(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ClientError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class HeadersTooLarge(ClientError):
    status = 431
    code = "request_header_fields_too_large"


class ClientDisconnected(ClientError):
    """The client went away before its request was read; nothing can be answered."""

    status = 499
    code = "client_closed_request"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after_s + 0.5)))})


class UpstreamError(OpenWeightError):
    """One attempt at an upstream failed in a way that another upstream may not."""

    status = 502
    type = "upstream_error"
    outcome: Outcome = Outcome.SERVER_ERROR
    """The `outcome` label of openweight_upstream_attempts_total and the fallback reason."""


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"
    outcome = Outcome.CONNECT_ERROR


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    outcome = Outcome.TIMEOUT


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"
    outcome = Outcome.PROTOCOL_ERROR


class UpstreamSaturated(UpstreamError):
    """The router's own limit of requests in flight towards that upstream is reached (no attempt made)."""

    status = 503
    code = "upstream_saturated"
    outcome = Outcome.OVERLOADED


class UpstreamUnavailable(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "no_upstream_available"
    outcome = Outcome.UNAVAILABLE


SHUTDOWN_MESSAGE = "the router is shutting down and its grace period for this request ran out"
"""Why a request still unanswered when the shutdown grace ran out fails: in its 503, or in the
error event that ends its stream."""


class ServiceShuttingDown(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"

    def __init__(self, message: str = SHUTDOWN_MESSAGE) -> None:
        super().__init__(message)
