"""The vocoder's work-stream handler (VocoderDeployment.handle_jobs), driven without Ray or
Redis: the real runner over the fixture 05 weights, jobs as the worker hands them over."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.entries import VOCODER_JOBS, Job, PermanentError, VocodeJob
from services.vocoder.deployment import VocoderDeployment
from services.vocoder.runner import VocoderRunner
from tests.vocoder.test_runner import FX, frames, mels, weights  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def replica(fixtures, weights):  # noqa: F811
    cls = VocoderDeployment.func_or_class          # the plain class under Serve's wrapper
    r = cls.__new__(cls)                           # no replica start: only the runner is needed
    r.runner = VocoderRunner(fixtures.hift_config, weights, source=FX, max_batch=4)
    return r


def job(n: int, mel, seed: int) -> Job:
    return Job(VOCODER_JOBS, f"1-{n}", VocodeJob.from_mel(f"turn{n}", 0, 0, mel, seed=seed), group="vocoder")


def audio(outcome) -> np.ndarray:
    ((_, chunk, _),) = outcome
    return np.frombuffer(chunk.pcm16.data, "<i2").astype(np.int64)


def test_a_seeded_job_sounds_the_same_alone_and_batched(replica, mels):  # noqa: F811
    """Each job is seeded with its own seed, not its batch's first: batched behind a job with
    another seed, a seeded piece is what it is alone to padded batching's rounding (as the
    runner's test_each_piece_is_seeded_on_its_own), far below what another seed changes."""
    (alone,) = replica.handle_jobs([job(1, mels[1], 7)])
    (other,) = replica.handle_jobs([job(1, mels[1], 8)])
    batched = replica.handle_jobs([job(0, mels[0], 3), job(1, mels[1], 7), job(2, mels[2], 5)])
    a, b, o = audio(alone), audio(batched[1]), audio(other)
    assert a.shape == b.shape
    rounding, seed_effect = np.abs(a - b).max(), np.abs(a - o).max()
    assert rounding < 1e-2 * seed_effect, (rounding, seed_effect)


def test_a_bad_mel_fails_only_its_own_job(replica, mels):  # noqa: F811
    bad = mels[0][:-1]                             # one mel bin short
    out = replica.handle_jobs([job(0, mels[0], 3), job(1, bad, 7), job(2, mels[2], 5)])
    assert isinstance(out[1], PermanentError) and "mel" in str(out[1])
    assert [len(audio(out[i])) for i in (0, 2)] == [len(audio(r)) for r in
                                                  replica.handle_jobs([job(0, mels[0], 3), job(2, mels[2], 5)])]
