"""Typed request errors and the one place they become gRPC status codes.

Validation raises these where it happens; `status_for` is the only mapping from
an exception to a gRPC code, used by every RPC through `servicer.handlers`.
Anything that is not one of these is our bug: INTERNAL, never blamed on the client.

A gateway retries RESOURCE_EXHAUSTED (SMG: up to 5 attempts, then HTTP 429), so it means "later, or
elsewhere" only: a limit no retry can meet (n, logprobs, context, images per prompt, the shared-memory
ring's size) is INVALID_ARGUMENT naming the field and the flag.
"""

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from engine_adapter.errors import (
    EngineCapacityError,
    EngineCursorError,
    EngineDeadError,
    EngineOperationError,
    EngineRequestError,
    EngineRetryableError,
    EngineStateError,
)


class ServicerError(Exception):
    """Base of the errors a client can act on. `metadata` goes into trailing metadata."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.metadata = metadata


class InvalidArgument(ServicerError):
    """The request is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServicerError):
    """The request is valid but the capacity it needs is taken right now; a retry may succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServicerError):
    """The request refers to state this servicer does not hold (e.g. an unknown image)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ServicerError):
    """An optional part of the contract this deployment does not run (the message says which flag enables it)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(ServicerError):
    """The engine is not (or no longer) able to serve."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(ServicerError):
    """The call conflicts with an operation in progress (e.g. a refit); retrying after it ends may succeed."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(ServicerError):
    """No valid credentials (the control endpoint's bearer key)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServicerError):
    """Authenticated, but this deployment does not allow the call (the message names the flag that would)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServicerError):
    """No such route or object."""

    code = grpc.StatusCode.NOT_FOUND


# How long a client should wait before retrying a RESOURCE_EXHAUSTED call: a hint, not a measurement.
RETRY_AFTER_MS = 100


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """(code, message, trailing metadata) for an exception raised while serving an RPC."""
    code, message, metadata = _status(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        metadata += _retry_hint(code, message)
    return code, message, metadata


def _retry_hint(code: grpc.StatusCode, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """gRPC's own retry pushback (honoured by a client whose retry policy covers the code) and the
    rich error model's RetryInfo (google.rpc.Status in grpc-status-details-bin, code and message as sent)."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=RETRY_AFTER_MS * 1_000_000)))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("grpc-retry-pushback-ms", str(RETRY_AFTER_MS)), ("grpc-status-details-bin", status.SerializeToString()))


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    if isinstance(exc, ServicerError):
        return exc.code, str(exc), exc.metadata
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, f"engine is not running: {exc}", ()
    if isinstance(exc, EngineCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ()
    if isinstance(exc, EngineRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    if isinstance(exc, EngineRetryableError):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry", ()
    if isinstance(exc, EngineCursorError):
        return grpc.StatusCode.OUT_OF_RANGE, str(exc), ()
    if isinstance(exc, EngineStateError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), ()
    if isinstance(exc, EngineOperationError):  # the engine's own failure; the message says what state it left
        return grpc.StatusCode.INTERNAL, str(exc), ()
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ()


# The same outcomes for the HTTP control endpoint (servicer/control.py).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def http_status_for(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error code name, message) for an exception raised while serving a control call."""
    code, message, _ = status_for(exc)
    return _HTTP_STATUS.get(code, 500), code.name.lower(), message
