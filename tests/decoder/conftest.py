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

    def check(self, actual, expected, name, kind=None):
        self.fx.assert_close(actual, expected, f"04/{self.kind}/{name}", kind or self.kind)


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
    return Stage04(fixtures, request.param)
