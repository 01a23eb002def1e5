"""Stream entries and their flat field encoding (services/common/entries.py), without Redis."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.entries import (
    FLOAT32, INT16, INT32, SCHEMA_VERSION, Array, BusError, DecodeJob, PcmChunk, Timing, TurnEnd, VocodeJob,
    decode_entry,
)


def test_float_and_large_int_fields_are_exact():
    e = Timing("t", "x", 0.1 + 0.2)
    assert decode_entry(e.encode()).unix_ms == 0.1 + 0.2
    j = DecodeJob.from_codes("t", 0, 0, np.zeros((1, 8), np.int64), seed=2**64 - 1)
    assert decode_entry(j.encode()).seed == 2**64 - 1


def test_malformed_entries_are_named_errors():
    with pytest.raises(BusError, match="integer payload expected"):
        DecodeJob.from_codes("t", 0, 0, np.zeros((2, 8)))
    good = DecodeJob.from_codes("t", 0, 0, np.zeros((2, 8), np.int32)).encode()
    with pytest.raises(BusError, match="unknown type 'nope'"):
        decode_entry({**good, b"type": b"nope"})
    with pytest.raises(BusError, match="lacks field 'codes_shape'"):
        decode_entry({k: v for k, v in good.items() if k != b"codes_shape"})
    with pytest.raises(BusError, match="lacks field 'codes_dtype'"):
        decode_entry({k: v for k, v in good.items() if k != b"codes_dtype"})
    with pytest.raises(BusError, match=r"decode_job.codes: 64 bytes do not hold shape \(3, 8\) of int32 \(96 bytes\)"):
        decode_entry({**good, b"codes_shape": b"3,8"})
    with pytest.raises(BusError, match=r"decode_job.codes must be \(frames, codebooks\); got shape \(16,\)"):
        decode_entry({**good, b"codes_shape": b"16"})
    with pytest.raises(BusError, match="decode_job.codes has dtype '<f4'; expected '<i4'"):
        decode_entry({**good, b"codes_dtype": b"<f4"})
    with pytest.raises(BusError, match="decode_job.codes has dtype 'int32'; expected a little-endian number"):
        decode_entry({**good, b"codes_dtype": b"int32"})
    with pytest.raises(BusError, match="field 'codes_shape' is not a valid tuple"):
        decode_entry({**good, b"codes_shape": b"2,x"})
    with pytest.raises(BusError, match="field 'final' is not a valid bool"):
        decode_entry({**good, b"final": b"yes"})
    with pytest.raises(BusError, match=f"schema version '1'; this code reads {SCHEMA_VERSION}"):
        decode_entry({**good, b"v": b"1"})
    # a field added by a newer writer is ignored
    assert decode_entry({**good, b"new_field": b"x"}) == decode_entry(good)


def test_arrays_travel_as_three_explicit_fields():
    mel = np.arange(6, dtype=np.float32).reshape(2, 3)
    fields = VocodeJob.from_mel("t", 1, 0, mel).encode()
    assert (fields[b"mel"], fields[b"mel_dtype"], fields[b"mel_shape"]) == (mel.astype("<f4").tobytes(), b"<f4", b"2,3")
    assert fields[b"v"] == str(SCHEMA_VERSION).encode()
    end = TurnEnd.with_tokens("t", "eos", [5, -1])
    assert end.encode()[b"tokens_shape"] == b"2" and decode_entry(end.encode()) == end
    # an array field with a default may be left out whole, never in part
    bare = {k: v for k, v in TurnEnd("t", "eos").encode().items() if not k.startswith(b"tokens")}
    assert decode_entry(bare).tokens == Array(INT32, (0,), b"")
    with pytest.raises(BusError, match="end entry lacks field 'tokens_dtype'"):
        decode_entry({**bare, b"tokens": b"", b"tokens_shape": b"0"})


def test_array_from_and_to_torch_and_numpy():
    t = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()     # not contiguous
    a = Array.of(t, INT32)
    assert (a.dtype, a.shape) == ("<i4", (4, 3)) and a.numpy().tolist() == t.tolist()
    assert not a.numpy().flags.writeable, "a view of the payload"
    x = a.tensor("int64")
    assert x.dtype == torch.int64 and x.tolist() == t.tolist()
    x += 1                                                          # a copy: the payload is untouched
    assert a.numpy().tolist() == t.tolist()
    assert Array.of([[1.5, 2]], "float32").dtype == FLOAT32        # dtypes are written canonically
    assert Array.of(np.zeros((0, 8)), INT32).shape == (0, 8)       # empty: no integer check needed
    with pytest.raises(BusError, match="integer payload expected"):
        Array.of(torch.ones(2), INT32)


def test_entries_check_their_arrays_when_built():
    with pytest.raises(BusError, match=r"vocode_job.mel must be \(n_mels, frames\); got shape \(3,\)"):
        VocodeJob.from_mel("t", 0, 0, np.zeros(3))
    with pytest.raises(BusError, match="decode_job.codes has dtype '<f4'; expected '<i4'"):
        DecodeJob("t", 0, 0, Array.of(np.zeros((1, 8)), FLOAT32))
    with pytest.raises(BusError, match=r"pcm.pcm16: 3 bytes do not hold shape \(1,\) of int16"):
        PcmChunk.from_pcm16("t", 0, 0, b"\0\0\0", 24000)
    with pytest.raises(BusError, match="negative dimension"):
        PcmChunk("t", 0, 0, Array(INT16, (-2,), b""), 24000)
    assert PcmChunk.from_pcm16("t", 0, 0, b"\1\0\2\0", 24000).pcm16.numpy().tolist() == [1, 2]
