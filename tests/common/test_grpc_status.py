"""Errors reach callers as a status code and a human message; Ray's wrapped remote traceback
(ANSI colours, pid, internal IP, actor id, server file paths) never does."""
from __future__ import annotations

import logging
import traceback

import grpc
import pytest
import ray.exceptions as rex

from services.common import errors
from services.common.errors import NotFound, ResourceExhausted, Status
from services.common.grpc_status import StatusError, grpc_errors, status_for

LEAKS = ("\x1b[", "Traceback", 'File "', "pid=", "ip=", "ray::", "actor_id")


def assert_clean(msg: str) -> None:
    assert not [s for s in LEAKS if s in msg], f"internal details in a caller's message: {msg!r}"


def from_replica(exc: Exception) -> Exception:
    """`exc` as it arrives through a Serve handle: raised in another process, wrapped by Ray."""
    try:
        raise exc
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc()
        return rex.RayTaskError("Tokenizer.tokenize", tb, e, "ray::ServeReplica:tokenizer", 4242, "10.1.2.3",
                                "<Tokenizer object>", "d57782a11fe1a0dae72a89c101000000").as_instanceof_cause()


@pytest.mark.parametrize("exc, code", [
    (ValueError("audio could not be decoded as WAV/FLAC; send a complete WAV or FLAC file"),
     grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("session 'x' not found"), grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted("too many sessions"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_wrapped_stage_error_gives_the_original_message(exc, code):
    wrapped = from_replica(exc)
    assert any(s in str(wrapped) for s in LEAKS)          # what used to reach the caller
    got_code, msg = status_for(wrapped)
    assert got_code == code and msg == str(exc)
    assert_clean(msg)


@pytest.mark.parametrize("exc, code", [
    (errors.NotFound("no such session"), grpc.StatusCode.NOT_FOUND),
    (KeyError("a LookupError that is not NotFound"), grpc.StatusCode.INTERNAL),
    (errors.AlreadyExists("session id taken"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.QuotaExceeded("sessions", 3), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("no replica"), grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated("no key"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.Cancelled("interrupted"), grpc.StatusCode.CANCELLED),
    (TypeError("seed must be an integer"), grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError("no answer"), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_each_plain_exception_has_its_status(exc, code):
    got, msg = status_for(exc)
    assert got == code
    assert (msg == str(exc)) == (code != grpc.StatusCode.INTERNAL)


def test_turn_error_codes_are_grpcs_numbers():
    """Turn errors carry `Status` codes (no gRPC import where they are written): the same
    numbers as gRPC's codes of the same name."""
    assert {s.name: int(s) for s in Status} == {s.name: grpc.StatusCode[s.name].value[0] for s in Status}


def test_unexpected_error_is_internal_without_traceback():
    code, msg = status_for(from_replica(RuntimeError("CUDA error: an illegal memory access")))
    assert code == grpc.StatusCode.INTERNAL and "RuntimeError" in msg
    assert_clean(msg)


def test_ray_failures_map_to_retryable_statuses():
    code, msg = status_for(rex.ActorDiedError())
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in msg
    assert_clean(msg)
    code, _ = status_for(rex.GetTimeoutError("timed out"))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


class _Context:
    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_decorated_method_sets_status_and_logs_the_traceback(caplog):
    class Servicer:
        @grpc_errors
        def Call(self, request, grpc_context=None):
            raise from_replica(KeyError("slot"))

    ctx = _Context()
    with caplog.at_level(logging.ERROR, logger="services.common.grpc_status"), pytest.raises(StatusError) as e:
        Servicer().Call(None, ctx)
    assert ctx.code == grpc.StatusCode.INTERNAL
    assert_clean(ctx.details) and assert_clean(str(e.value))
    # the operator's log has the remote traceback the caller did not get
    assert any(r.exc_info and "ray::ServeReplica" in str(r.exc_info[1]) for r in caplog.records)
