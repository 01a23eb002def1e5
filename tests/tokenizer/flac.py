"""A real FLAC file of digital silence, written frame by frame: a few hundred KB that any decoder
expands to `seconds * rate * channels` samples (the decoded-size attack of issue 13).

Each frame is 4096 samples per channel coded as CONSTANT subframes (FLAC format, RFC 9639:
frame header with CRC-8, one 3-byte subframe per channel, CRC-16), so writing 600 s at
384 kHz stereo takes well under a second instead of encoding 460 million samples."""
from __future__ import annotations

BLOCK = 4096
_BLOCK_CODE = 0b1100          # 256 * 2^(12 - 8) = 4096 samples
_BPS = 16


def _crc8(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def _crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ b]
    return crc


def _utf8(n: int) -> bytes:
    """FLAC's UTF-8-like coding of the frame number."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    if n < 0x10000:
        return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])
    return bytes([0xF0 | n >> 18, 0x80 | (n >> 12) & 0x3F, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def silent_flac(seconds: float, rate: int, channels: int) -> bytes:
    """FLAC bytes of `seconds` of silence (rounded down to whole 4096-sample frames)."""
    assert 1 <= channels <= 8 and 1 <= rate < 1 << 20
    frames = int(seconds * rate) // BLOCK
    total = frames * BLOCK
    info = (BLOCK.to_bytes(2, "big") * 2 + bytes(6)                                  # block sizes, frame sizes unknown
            + ((rate << 44) | ((channels - 1) << 41) | ((_BPS - 1) << 36) | total).to_bytes(8, "big")
            + bytes(16))                                                              # MD5 unknown
    out = [b"fLaC", bytes([0x80]) + len(info).to_bytes(3, "big"), info]              # last block: STREAMINFO
    # header: sync + fixed blocksize, block size code | rate from STREAMINFO, channels (independent) | 16 bit
    head = bytes([0xFF, 0xF8, _BLOCK_CODE << 4, ((channels - 1) << 4) | (0b100 << 1)])
    sub = bytes([0, 0, 0]) * channels                                                 # CONSTANT 0, no wasted bits
    for n in range(frames):
        h = head + _utf8(n)
        body = h + bytes([_crc8(h)]) + sub
        out.append(body + _crc16(body).to_bytes(2, "big"))
    return b"".join(out)
