"""Shared builders for the decoder-stage tests: modules from fixture 04 in fp32 or bf16."""
from __future__ import annotations

import pytest
import torch

from services.common.checkpoint import PREFIX, load_state
from services.decoder.audio_decoder import AudioDecoder
from services.decoder.estimator import Estimator
from services.decoder.prenet import Prenet

FIX = "04_decoder_flow"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# bf16: the harness's max |diff| tolerance is about 10x the kernel noise, so a systematic error
# (a linear instead of cosine CFM schedule, batch-coupled GroupNorm statistics) hides under it.
# The mean |diff| separates them: kernel and op-order differences average at most 1.14 bf16 eps
# of the mean |value| (native, AVX2 and SSE4.1 kernels), those bugs 4 eps or more.
BF16_MEAN_EPS = 2.5


def assert_bf16_mean_close(actual: torch.Tensor, expected: torch.Tensor, check: str) -> None:
    """mean |actual - expected| <= BF16_MEAN_EPS bf16 eps x mean |expected|."""
    mean = (actual.float() - expected.float()).abs().mean().item()
    bound = BF16_MEAN_EPS * torch.finfo(torch.bfloat16).eps * expected.float().abs().mean().item()
    assert mean <= bound, f"{check}: mean |diff| {mean:.3g} > {bound:.3g} ({BF16_MEAN_EPS} bf16 eps x mean |value|)"


def check_close(fixtures, actual, expected, check: str, kind: str, scale=None) -> None:
    """The harness's max |diff| tolerance; in bf16 also the mean |diff| bound above."""
    fixtures.assert_close(actual, expected, check, kind, scale=scale)
    if kind == "bf16":
        assert_bf16_mean_close(actual, expected, check)


class Stage04:
    """Fixture 04 weights, inputs and outputs of one variant ('fp32' or 'bf16'), modules loaded."""

    def __init__(self, fixtures, kind: str):
        self.fx, self.kind, self.dtype = fixtures, kind, DTYPES[kind]
        cfg = fixtures.model_config
        w = fixtures.load(FIX, "weights.safetensors")
        self.weights = w
        self.inputs = fixtures.load(FIX, "inputs.safetensors")
        self.out = fixtures.load(FIX, f"outputs_{kind}.safetensors")
        src = f"fixture {FIX}"
        # Build in fp32, load, then cast: buffers round to bf16 exactly as in the fixture's bf16 model.
        self.decoder = AudioDecoder(cfg)
        load_state(self.decoder, w, PREFIX["audio_decoder"], source=src)
        self.prenet = Prenet(cfg.flow)
        load_state(self.prenet, w, PREFIX["flow"] + "prenet.", source=src)
        self.estimator = Estimator(cfg.flow)
        load_state(self.estimator, w, PREFIX["flow"] + "conditional_decoder.", source=src)
        for m in (self.decoder, self.prenet, self.estimator):
            m.to(self.dtype).eval()
        self.config = cfg

    def check(self, actual, expected, name, kind=None, scale=None):
        check_close(self.fx, actual, expected, f"04/{self.kind}/{name}", kind or self.kind, scale=scale)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core test machine, two threads spin against other users'
    processes and ran these tests up to 15x slower. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def stage(request, fixtures):
    fixtures.require(FIX)
    return Stage04(fixtures, request.param)
