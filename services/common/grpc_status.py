"""Map the stack's exceptions to gRPC status codes, in one place.

Model, runner and session code raise plain Python exceptions (they never import gRPC):
ValueError subclasses for bad input, LookupError for unknown ids, and the classes of
services/common/errors.py for limits. Deployments and servicers wrap their methods with
`grpc_errors` so a caller gets a precise status and message, and the replica stays up."""
from __future__ import annotations

import functools
import inspect
import logging
import math

import grpc

from services.common.errors import (
    AlreadyExists, Cancelled, NotFound, QuotaExceeded, ResourceExhausted, Unauthenticated, Unavailable,
)
from services.common.telemetry import get_metrics, trace_id_hex

RETRY_AFTER = "retry-after"                 # trailing metadata: whole seconds to wait, as in HTTP
STATUS_DETAILS = "grpc-status-details-bin"  # trailing metadata: google.rpc.Status with a RetryInfo

log = logging.getLogger(__name__)


class StatusError(Exception):
    """Raised by `grpc_errors` after the status was set on the context; picklable. `code`:
    the status's name (e.g. "NOT_FOUND"), for callers through a Serve handle, which get this
    exception and not the context (the Realtime ingress)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (str(self), self.code)


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def unwrap(exc: BaseException) -> BaseException:
    """The exception a stage raised, without Ray's wrapper.

    An error raised in another replica arrives as Ray's RayTaskError, whose text is the remote
    traceback (ANSI colours, replica class, pid, internal IP, actor id, server file paths): never
    for a caller. Its `cause` is the original exception, which carries the human message."""
    seen = {id(exc)}
    while _from_ray(exc) and isinstance(getattr(exc, "cause", None), BaseException) and id(exc.cause) not in seen:
        exc = exc.cause
        seen.add(id(exc))
    return exc


# Ray's own failures, by class name (this module does not import Ray): what a caller can do.
_RAY_STATUS = {
    "ActorDiedError": (grpc.StatusCode.UNAVAILABLE, "a replica serving this request died; retry"),
    "RayActorError": (grpc.StatusCode.UNAVAILABLE, "a replica serving this request died; retry"),
    "ActorUnavailableError": (grpc.StatusCode.UNAVAILABLE, "a replica is temporarily unreachable; retry"),
    "BackPressureError": (grpc.StatusCode.RESOURCE_EXHAUSTED, "the stage is at capacity; retry later"),
    "GetTimeoutError": (grpc.StatusCode.DEADLINE_EXCEEDED, "a stage did not answer in time; retry"),
    "TaskCancelledError": (grpc.StatusCode.CANCELLED, "the request was cancelled"),
    "RequestCancelledError": (grpc.StatusCode.CANCELLED, "the request was cancelled"),
}


def _redis_full(exc: BaseException) -> bool:
    """redis-py's OutOfMemoryError (a write refused at maxmemory), by name: no Redis import here."""
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.split(".")[0] == "redis"


REDIS_UNREACHABLE = ("Redis (sessions and turn streams) is not answering; retry with backoff "
                     "(operators: check the Redis server and redis.url)")


def _redis_unreachable(exc: BaseException) -> bool:
    """redis-py's ConnectionError or TimeoutError (Redis down, stopped or partitioned), by name."""
    return (type(exc).__module__.split(".")[0] == "redis" and "Authentication" not in type(exc).__name__
            and any(c.__name__ in ("ConnectionError", "TimeoutError") for c in type(exc).__mro__))


# The plain exceptions (services/common/errors.py, then Python's), first match wins: the
# exception's own message is the status message.
_PLAIN_STATUS = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    ((ValueError, TypeError), grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception, and the message a person can act on (never a traceback)."""
    exc = unwrap(exc)
    if _redis_full(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, ("Redis is at its memory limit (maxmemory) and refuses writes; "
                                                    "retry later")
    if _redis_unreachable(exc):
        return grpc.StatusCode.UNAVAILABLE, REDIS_UNREACHABLE
    if _from_ray(exc):
        for cls in type(exc).__mro__:
            if cls.__name__ in _RAY_STATUS:
                return _RAY_STATUS[cls.__name__]
        return grpc.StatusCode.INTERNAL, f"internal error ({exc.__class__.__name__}); see the server log"
    msg = str(exc) or exc.__class__.__name__
    for classes, code in _PLAIN_STATUS:
        if isinstance(exc, classes):
            return code, msg
    return grpc.StatusCode.INTERNAL, f"internal error ({exc.__class__.__name__}): {msg}"


def retry_metadata(code: grpc.StatusCode, message: str, retry_after_s: float) -> list[tuple[str, str | bytes]]:
    """Trailing metadata telling a caller when to retry: `retry-after` (whole seconds, rounded
    up) and the standard `grpc-status-details-bin` (google.rpc.Status with a RetryInfo), which
    gRPC's status libraries read in every language."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(retry_after_s, 0.0) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return [(RETRY_AFTER, str(max(1, math.ceil(retry_after_s)))), (STATUS_DETAILS, status.SerializeToString())]


def _set(context, exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """Log the failure with the request's trace id, count it and set the status on the context
    (with retry metadata for a QuotaExceeded)."""
    code, msg = status_for(exc)
    get_metrics().record_call(method, code.name)
    trace_id = trace_id_hex()
    if code == grpc.StatusCode.INTERNAL:
        # the whole traceback (the remote one inside Ray's wrapper too) is for the operator; the
        # caller gets the trace id to quote
        log.error("internal error (trace %s): %s", trace_id or "-", msg, exc_info=exc)
        if trace_id:
            msg = f"{msg} (trace id {trace_id})"
    else:
        log.info("request failed with %s (trace %s): %s", code.name, trace_id or "-", msg)
    if context is not None:
        context.set_code(code)
        context.set_details(msg)
        retry = unwrap(exc)
        if isinstance(retry, QuotaExceeded):
            context.set_trailing_metadata(retry_metadata(code, msg, retry.retry_after_s))
    return code, msg


class _NoMessage:
    """What a unary method returns on Serve once it set an error status with trailing metadata.
    Ray Serve 2.60 carries only the code and details of a call that raised; the trailing
    metadata of one that returned reaches the caller, and gRPC sends no message with a non-OK
    status. A streaming call cannot do this (its first message would go out): its retry delay
    is in the message text only."""

    def SerializeToString(self) -> bytes:
        return b""


def _returns_status(context, exc: BaseException) -> bool:
    """Serve's context (no abort) and an error whose status carries trailing metadata."""
    return (context is not None and not inspect.iscoroutinefunction(getattr(context, "abort", None))
            and isinstance(unwrap(exc), QuotaExceeded))


def grpc_errors(fn):
    """Decorate a servicer / deployment method taking `(self, request, grpc_context)`.

    On an exception the status code and details are set on the context and a plain
    `StatusError` raised in its place (Ray Serve pickles the exception across processes;
    exception classes with custom constructors do not survive that, a one-string one does).
    A plain grpc.aio server context is aborted with the status instead."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen(self, request, grpc_context=None):
            try:
                async for item in fn(self, request, grpc_context):
                    yield item
                get_metrics().record_call(fn.__qualname__, "OK")
            except Exception as e:  # noqa: BLE001 - mapped to a status, then re-raised
                status = _set(grpc_context, e, fn.__qualname__)
                await _abort(grpc_context, status)
                raise StatusError(status[1], status[0].name) from None
        return agen

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(self, request, grpc_context=None):
            try:
                out = await fn(self, request, grpc_context)
                get_metrics().record_call(fn.__qualname__, "OK")
                return out
            except Exception as e:  # noqa: BLE001
                status = _set(grpc_context, e, fn.__qualname__)
                if _returns_status(grpc_context, e):
                    return _NoMessage()
                await _abort(grpc_context, status)
                raise StatusError(status[1], status[0].name) from None
        return coro

    @functools.wraps(fn)
    def plain(self, request, grpc_context=None):
        try:
            out = fn(self, request, grpc_context)
            get_metrics().record_call(fn.__qualname__, "OK")
            return out
        except Exception as e:  # noqa: BLE001
            code, msg = _set(grpc_context, e, fn.__qualname__)
            raise StatusError(msg, code.name) from None
    return plain


async def _abort(context, status: tuple[grpc.StatusCode, str]) -> None:
    # A real grpc.aio context (direct server, tests) needs abort() to send the status;
    # Ray Serve's serialisable context has no abort and reads the code we set.
    abort = getattr(context, "abort", None)
    if abort is not None and inspect.iscoroutinefunction(abort):
        await abort(*status)
