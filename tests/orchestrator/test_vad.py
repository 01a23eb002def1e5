"""Server VAD (orchestrator/vad.py) on the bundled spoken sample: silero's packaged model, no
server."""
from __future__ import annotations

import pytest

from orchestrator.vad import SpeechDetector, load_model
from tests.orchestrator.test_realtime import RATE, question_pcm


@pytest.fixture(scope="module")
def model():
    return load_model()


def feed(d: SpeechDetector, pcm: bytes, piece_s: float = 0.1) -> list:
    n = int(piece_s * RATE) * 2
    return [ev for i in range(0, len(pcm), n) for ev in d.feed(pcm[i:i + n])]


def test_speech_between_silences_starts_and_stops(model):
    speech = question_pcm()
    speech_ms = len(speech) / 2 / RATE * 1000
    silence = b"\0\0" * RATE                                    # 1 s
    events = feed(SpeechDetector(model, silence_ms=500), silence + speech + silence)
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
    start, stop = events[0].ms, events[1].ms
    assert 1000 <= start < 1000 + speech_ms / 2                # in the speech, near its start
    # after the speech's last word, by the silence duration (the sample ends in a short tail)
    assert 1000 + speech_ms / 2 < stop - 500 <= 1000 + speech_ms


def test_silence_is_not_speech_and_settings_are_checked(model):
    assert feed(SpeechDetector(model), b"\0\0" * 2 * RATE) == []
    with pytest.raises(ValueError, match="threshold"):
        SpeechDetector(model, threshold=1.5)
    with pytest.raises(ValueError, match="silence_duration_ms"):
        SpeechDetector(model, silence_ms=0)


def test_a_short_pause_does_not_end_the_turn(model):
    speech = question_pcm()
    pause = b"\0\0" * int(0.3 * RATE)
    events = feed(SpeechDetector(model, silence_ms=800), speech + pause + speech + b"\0\0" * RATE)
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"]
