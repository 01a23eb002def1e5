"""Map the stack's exceptions to gRPC status codes, in one place.

Model and runner code raise plain Python exceptions (they never import gRPC): ValueError
subclasses for bad input, LookupError for unknown ids, and the few classes below for
limits. Deployments and servicers wrap their methods with `grpc_errors` so a caller gets a
precise status and message, and the replica stays up."""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class ResourceExhausted(RuntimeError):
    """A limit was hit (sessions, KV budget, queue length). Retry later or raise the limit."""


class Unavailable(RuntimeError):
    """A stage is down or not ready yet."""


class Cancelled(RuntimeError):
    """The request was cancelled (Interrupt)."""


class NotFound(LookupError):
    """An unknown or expired session, turn or job."""


class AlreadyExists(RuntimeError):
    """A caller-chosen id is taken."""


class StatusError(Exception):
    """Raised by `grpc_errors` after the status was set on the context; picklable."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception, and the message a person can act on."""
    msg = str(exc) or exc.__class__.__name__
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, msg
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, msg
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.CANCELLED, msg
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, msg
    return grpc.StatusCode.INTERNAL, f"internal error ({exc.__class__.__name__}): {msg}"


def _set(context, exc: BaseException) -> None:
    code, msg = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    if context is not None:
        context.set_code(code)
        context.set_details(msg)


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
            except Exception as e:  # noqa: BLE001 - mapped to a status, then re-raised
                _set(grpc_context, e)
                await _abort(grpc_context, e)
                raise StatusError(status_for(e)[1]) from None
        return agen

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(self, request, grpc_context=None):
            try:
                return await fn(self, request, grpc_context)
            except Exception as e:  # noqa: BLE001
                _set(grpc_context, e)
                await _abort(grpc_context, e)
                raise StatusError(status_for(e)[1]) from None
        return coro

    @functools.wraps(fn)
    def plain(self, request, grpc_context=None):
        try:
            return fn(self, request, grpc_context)
        except Exception as e:  # noqa: BLE001
            _set(grpc_context, e)
            raise StatusError(status_for(e)[1]) from None
    return plain


async def _abort(context, exc: BaseException) -> None:
    # A real grpc.aio context (direct server, tests) needs abort() to send the status;
    # Ray Serve's serialisable context has no abort and reads the code we set.
    abort = getattr(context, "abort", None)
    if abort is not None and inspect.iscoroutinefunction(abort):
        code, msg = status_for(exc)
        await abort(code, msg)
