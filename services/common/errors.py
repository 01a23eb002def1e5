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
