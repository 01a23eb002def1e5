"""The stack's own exceptions and the status codes of turn errors: plain Python, no gRPC import.

services/common/grpc_status.py maps these (and ValueError, LookupError, TimeoutError) to gRPC
statuses for callers; pure modules (sessions, merge, runners) raise them without importing gRPC."""
from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """The gRPC status codes a turn's error entry carries (`TurnError.code`), by name."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ResourceExhausted(RuntimeError):
    """A limit was hit (sessions, KV budget, queue length). Retry later or raise the limit."""


class QuotaExceeded(ResourceExhausted):
    """A per-identity limit (orchestrator/quotas.py): retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)

    def __reduce__(self):  # picklable across Ray (a custom constructor needs its arguments)
        return type(self), (str(self), self.retry_after_s)


class Unauthenticated(RuntimeError):
    """No valid credentials; the message says how to authenticate, never what was sent."""


class Unavailable(RuntimeError):
    """A stage is down or not ready yet."""


class Cancelled(RuntimeError):
    """The request was cancelled (Interrupt)."""


class NotFound(LookupError):
    """An unknown or expired session, turn or job."""


class AlreadyExists(RuntimeError):
    """A caller-chosen id is taken."""
