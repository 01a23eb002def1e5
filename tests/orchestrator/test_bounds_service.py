"""Resource bounds of the served stack (real Ray Serve apps, redis-server, gRPC, tiny checkpoint):
history limits at the model's context, callers that leave, and what Redis holds."""
from __future__ import annotations

import random
import time

import grpc
import pytest

from baichuan_audio.v1 import conversation_pb2 as pb
from tests.orchestrator.test_service import META, TIMEOUT, check_turn, converse, session, stub  # noqa: F401

WORDS = ("hello", "world", "session", "turn", "again", "long", "story", "about", "the", "model")


def long_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars]


@pytest.fixture(scope="module")
def settings(serve_stack):
    from services.common.settings import Settings
    return Settings.load(str(serve_stack.settings_path))


def test_a_long_session_keeps_working_at_the_context_limit(stub, settings, serve_stack):
    """Typed turns near limits.max_text_chars (~2,000 tokens each on the tiny tokenizer) fill the
    tiny model's 4,096-token context within three turns: the oldest turns are dropped and every
    turn still completes (without the rule, the third turn's prompt is refused)."""
    from services.common.checkpoint import Checkpoint
    from services.common.text_tokenizer import load_text_tokenizer

    ckpt = Checkpoint(serve_stack.checkpoint)
    context = settings.llm.context_tokens(ckpt.config.llm.max_position_embeddings)
    tok = load_text_tokenizer(ckpt.path)
    texts = [long_text(settings.limits.max_text_chars - 100, k) for k in range(4)]
    assert sum(len(tok.encode(t, add_special_tokens=False)) for t in texts[:3]) > context
    sid = session(stub, reply_mode=pb.REPLY_MODE_TEXT)
    for text in texts:
        end, _ = check_turn(converse(stub, sid, text=text), spoken=False)
        assert end.reason in ("complete", "length")
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=META, timeout=30)
    assert s.turns == 4 and [h.text for h in s.history[::2]] == texts


def test_system_prompt_over_the_limit_is_invalid_argument(stub, settings):
    n = settings.limits.max_system_prompt_chars
    with pytest.raises(grpc.RpcError) as e:
        session(stub, system_prompt="s" * (n + 1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limits.max_system_prompt_chars" in e.value.details()
    check_turn(converse(stub, session(stub, system_prompt="s" * n), text="Hello"))
