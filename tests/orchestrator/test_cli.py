"""The `baichuan-audio` client commands against the running stack, as a user types them."""
from __future__ import annotations

import soundfile as sf

from orchestrator.cli import main
from services.common.checkpoint import Checkpoint
from tests.orchestrator.test_service import QUESTION


def test_converse_transcribe_synthesize(serve_stack, tmp_path, capsys):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    addr = ["--address", serve_stack.address, "--api-key-file", str(serve_stack.api_keys_file)]
    out = tmp_path / "reply.wav"
    assert main(["converse", str(QUESTION), "-o", str(out), *addr]) == 0
    info = sf.info(str(out))
    assert info.samplerate == Checkpoint(serve_stack.checkpoint).hift_config().sampling_rate and info.frames > 0
    printed = capsys.readouterr()
    assert "time to first audio" in printed.out and "session " in printed.err
    sid = printed.err.split("session ", 1)[1].split()[0]
    # the next turn of the same session, text-only flags are per new session
    assert main(["converse", str(QUESTION), "-o", str(tmp_path / "r2.wav"), "--session", sid, *addr]) == 0
    assert main(["transcribe", str(QUESTION), *addr]) == 0
    tts = tmp_path / "tts.wav"
    assert main(["synthesize", "你好，欢迎收听今天的节目。", "-o", str(tts), *addr]) == 0
    assert sf.info(str(tts)).frames > 0
    # a bad request is a clear one-line error and a non-zero exit, not a traceback
    assert main(["converse", str(QUESTION), "--session", "nope", *addr]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
