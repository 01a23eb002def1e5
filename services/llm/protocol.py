"""The interleaved text/audio protocol of one request, without a model or a device.

- `ProtocolConfig`: the per-phase sampling table of reference-model.md §11.3.
- `Request` and the events a request produces (`TextToken`, `AudioFrame`, segment boundaries, `Done`).
- `Sequence`: one request's protocol state (§11.2, §11.6, corrections 10-14). It owns the
  token sequence exactly as the reference loop holds it (prompt, generated text, audio pads,
  host overwrites), how much of it is in the KV cache, and the current phase:

      PREFILL ──► FIRST_TEXT ──► AUDIO ──► TEXT ──► AUDIO ──► … ──► DONE      spoken reply
      PREFILL ──► FIRST_TEXT ──► DONE                                         text-only / ASR
      PREFILL ──► AUDIO ──► AUDIO (next chunk appended) ──► … ──► DONE        TTS

  The engine feeds it one decision at a time (`on_text(id)`, `on_frame(codes)`); it answers
  with events for the client and history effects for the device (`effects`).

Pure Python: who runs when is scheduler.py, which KV slot is kv_slots.py.
"""
from __future__ import annotations

import dataclasses
import re
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Sequence as Seq

from services.llm.sampler import SamplingParams
from services.llm.stop import StopStrings, StopTables


class Mode(str, Enum):
    SPOKEN = "spoken"   # s2s demo, audiogen_flag=True: interleaved text and audio
    TEXT = "text"       # s2s demo, audiogen_flag=False: one text reply
    ASR = "asr"         # base ASR demo
    TTS = "tts"         # base TTS demo


class Phase(str, Enum):
    PREFILL = "prefill"
    FIRST_TEXT = "first_text"
    TEXT = "text"
    AUDIO = "audio"
    DONE = "done"


class EngineError(ValueError):
    """A request the engine cannot take; the message says why."""


class UnknownSessionError(EngineError, KeyError):
    def __str__(self) -> str:      # KeyError would quote the message
        return self.args[0]


# ---------------------------------------------------------------------------- §11.3 table

@dataclass(frozen=True)
class PhaseSpec:
    params: SamplingParams
    max_new: int                       # tokens (text) or frames (audio)
    stops: tuple[str, ...] = ()        # stop strings (text); EOS always stops text


@dataclass(frozen=True)
class ProtocolConfig:
    spoken_first: PhaseSpec
    spoken_text: PhaseSpec             # later text segments
    spoken_audio: PhaseSpec
    text_only: PhaseSpec
    asr: PhaseSpec
    tts_audio: PhaseSpec
    max_rounds: int = 100              # the s2s loop's `for i in range(100)`: audio segments per reply

    @classmethod
    def reference(cls, audiogen_start: str, eos: str) -> "ProtocolConfig":
        """The demos' values. `audiogen_start` / `eos`: the token strings (from the tokenizer)."""
        S = SamplingParams
        return cls(
            spoken_first=PhaseSpec(S(0.8, 20, 0.85, 1.1), 50, (audiogen_start, eos)),
            spoken_text=PhaseSpec(S(0.3, 20, 0.85, 1.05), 50,
                                  (audiogen_start, ",", "!", "?", "，", "。", "！", "？", ". ")),
            spoken_audio=PhaseSpec(S(0.5, 5, 0.85, 1.3), 500),
            text_only=PhaseSpec(S(0.8, 20, 0.85, 1.1), 1024, (eos,)),
            asr=PhaseSpec(S(0.5, 5, 0.85, 1.3, greedy=True), 700),
            tts_audio=PhaseSpec(S(0.5, 5, 0.85, 1.3, greedy=True), 700),
        )


# ---------------------------------------------------------------------------- requests, events

@dataclass
class Request:
    """One generation: a turn of a conversation (spoken / text), an ASR or a TTS job.

    prompt_ids: the full prompt (prompts.PromptBuilder); audio_codes [n_pads, C]: the codes
    of its `<audio_pad>` tokens in order. tts_chunks: TTS chunks 2.. (chunk 1 is the prompt).
    forced: a fixed pattern [("text", n), ("audio", m), ...] replacing every stop decision
    (benchmarks on random weights; spoken mode). greedy: argmax everywhere (penalties kept).
    max_audio_frames: lower the audio-segment cap (default: the phase's, 500 / 700).
    max_new_tokens / max_turn_frames: per-request totals (the operator's limits.max_new_tokens /
    limits.max_audio_frames): tokens generated (text tokens and audio pads) and audio frames
    over all segments; reaching one ends the request with reason "length"."""

    prompt_ids: Seq[int]
    mode: Mode | str = Mode.SPOKEN
    audio_codes: object = None                  # torch.Tensor [n_pads, C] | nested list | None
    tts_chunks: Seq[Seq[int]] = ()
    session_id: Optional[str] = None
    greedy: bool = False
    seed: Optional[int] = None
    forced: Optional[Seq[tuple[str, int]]] = None
    max_audio_frames: Optional[int] = None
    max_new_tokens: Optional[int] = None
    max_turn_frames: Optional[int] = None
    request_id: Optional[str] = None
    # per-request sampling overrides of the §11.3 table: keys text_temperature, text_top_k,
    # text_top_p (every text phase) and audio_temperature, audio_top_k, audio_top_p
    sampling: Optional[dict] = None
    # a reply another replica began (continuation.py): its decisions so far, ("text", id) or
    # ("audio", codes), replayed onto the prompt before the first new decision
    replay: Seq[tuple[str, object]] = ()


@dataclass(frozen=True)
class Event:
    request_id: str


@dataclass(frozen=True)
class SegmentStart(Event):
    kind: str                  # "text" | "audio"
    segment: int               # index among this request's segments of that kind


@dataclass(frozen=True)
class TextToken(Event):
    """A decided text token (token_id None: a segment's closing flush) and the display text it
    adds. The publisher turns these into the turn stream's text deltas (entries.TextDelta)."""

    segment: int
    token_id: Optional[int]    # the new token; None for the flush at the end of a segment
    text: str                  # newly decodable display text ("" while a character is incomplete)


@dataclass(frozen=True)
class AudioFrame(Event):
    segment: int
    index: int                 # frame index in the segment
    codes: tuple[int, ...]     # one code per codebook


@dataclass(frozen=True)
class SegmentEnd(Event):
    kind: str
    segment: int
    reason: str                # eos | stop:<s> | max_new | forced | cancelled | length
    token_ids: tuple[int, ...] = ()               # text: what was generated, before host writes
    text: str = ""                                # text: the segment's display text
    codes: tuple[tuple[int, ...], ...] = ()       # audio: every valid frame (before the EOS frame)
    end_codes: tuple[int, ...] = ()               # audio: the end-of-audio frame (code 0 = K_0), if any


@dataclass(frozen=True)
class Done(Event):
    reason: str                # eos | max_new | max_rounds | forced | cancelled | length | error
    final_sequence: tuple[int, ...]
    kv_len: int                # tokens of final_sequence that are in the KV cache
    prefix_reused: int = 0     # prompt tokens taken from the session's cache
    host_writes: tuple[tuple[int, int, int], ...] = ()   # (position, old id, new id), no-ops included
    error: Optional[str] = None
    # The session's model history after the request, for the next turn's prompt to extend:
    # final_sequence with an unforwarded end-of-audio pad closed by <audiogen_end>, as the host
    # closes every other audio span (§11.2 e), and the codes of the audio pads the reply added
    # to it (the prompt's own are the request's audio_codes).
    history: tuple[int, ...] = ()
    reply_codes: tuple[tuple[int, ...], ...] = ()


OVERRIDE_KEYS = ("temperature", "top_k", "top_p")


def _override(specs: dict, sampling: dict, mode: "Mode") -> dict:
    """The phase table with a request's overrides applied (text phases / audio phases)."""
    unknown = sorted(set(sampling) - {f"{k}_{n}" for k in ("text", "audio") for n in OVERRIDE_KEYS})
    if unknown:
        raise EngineError(f"unknown sampling overrides {unknown}: use text_/audio_ + {OVERRIDE_KEYS}")
    out = {}
    for name, spec in specs.items():
        kind = "audio" if name == "audio" or (name == "first" and mode == Mode.TTS) else "text"
        changes = {n: sampling[f"{kind}_{n}"] for n in OVERRIDE_KEYS if f"{kind}_{n}" in sampling}
        try:
            params = dataclasses.replace(spec.params, **changes)
        except ValueError as e:
            raise EngineError(f"sampling override: {e}") from None
        out[name] = PhaseSpec(params, spec.max_new, spec.stops)
    return out


# ---------------------------------------------------------------------------- protocol context

@dataclass
class ProtocolRules:
    """What every sequence shares: ids, the phase table, stop-string tables, the decoder."""

    eos: int
    audio_pad: int
    audiogen_start: int
    audiogen_end: int
    eoa: int                                   # codebook 0's end-of-audio class (K_0)
    num_codebooks: int
    config: ProtocolConfig
    stops: StopTables | None                   # None: stop strings never match (tests)
    decode: Callable[[Seq[int]], str] = lambda ids: ""
    decode_plain: Optional[Callable[[Seq[int]], str]] = None   # special tokens skipped (ASR demo)
    # token strings the s2s demo removes from shown text (<|endoftext|>, <audiogen_start>,
    # <audiogen_end>: the engine takes them from the tokenizer)
    strip: tuple[str, ...] = ()

    def __post_init__(self):
        self._strip_re = re.compile("|".join(re.escape(s) for s in self.strip)) if self.strip else None

    def stop_set(self, stops: tuple[str, ...]) -> StopStrings | None:
        return self.stops.stops(stops) if (stops and self.stops is not None) else None

    def display(self, ids: Seq[int], mode: "Mode") -> str:
        """The text a demo shows: the s2s demo decodes each segment and removes `strip`;
        the ASR demo decodes with special tokens skipped."""
        if mode == Mode.ASR and self.decode_plain is not None:
            return self.decode_plain(ids)
        text = self.decode(ids)
        return self._strip_re.sub("", text) if self._strip_re else text


# ---------------------------------------------------------------------------- one sequence

class Sequence:
    """The reference loop's state for one request (see the module docstring)."""

    def __init__(self, request: Request, rules: ProtocolRules, request_id: str, seed: int, max_len: int,
                 pad_rows: list[tuple[int, ...]]):
        self.request = request
        self.rules = rules
        self.id = request_id
        self.mode = Mode(request.mode)
        self.seed = seed
        self.max_len = max_len                 # KV capacity of a slot
        self.tokens: list[int] = list(request.prompt_ids)
        self.pad_rows = pad_rows               # codes of every audio_pad in `tokens`, in order
        self.prompt_pads = len(pad_rows)
        self.kv_len = 0                        # tokens[:kv_len] are in the KV cache
        self.pads_fwd = 0                      # audio_pads among tokens[:kv_len]
        self.prefix_reused = 0
        self.generated = 0                     # tokens decided (text tokens + audio pads)
        self.turn_frames = 0                   # audio frames over all segments
        self.slot: Optional[int] = None
        self.draws = 0                         # sampling-counter stream position
        self.cancelled = False
        self.events: list[Event] = []
        # device-history changes for the engine: ("add", ids) | ("replace", old, new) |
        # ("clear_codes",) | ("codes", frame)
        self.effects: list[tuple] = []
        self.host_writes: list[tuple[int, int, int]] = []
        self.done: Optional[Done] = None
        # segments
        self.n_text = 0
        self.n_audio = 0                       # emitted (non-empty) audio segments
        self.rounds = 0                        # audio steps run (0-frame ones included)
        self.seg_ids: list[int] = []
        self.seg_shown = ""
        self.frames: list[tuple[int, ...]] = []
        self.final_audio = False
        self.tts_queue = deque(list(c) for c in request.tts_chunks)
        self.forced = deque((k, int(n)) for k, n in request.forced) if request.forced else None
        self.forced_n = 0
        cfg = rules.config
        greedy = request.greedy
        pick = {
            Mode.SPOKEN: cfg.spoken_first, Mode.TEXT: cfg.text_only, Mode.ASR: cfg.asr, Mode.TTS: cfg.tts_audio,
        }[self.mode]
        self.first_phase = Phase.AUDIO if self.mode == Mode.TTS else Phase.FIRST_TEXT
        self._specs = {
            "first": pick,
            "text": cfg.spoken_text,
            "audio": cfg.tts_audio if self.mode == Mode.TTS else cfg.spoken_audio,
        }
        if request.sampling:
            self._specs = _override(self._specs, request.sampling, self.mode)
        if greedy:
            self._specs = {k: PhaseSpec(s.params.as_greedy(), s.max_new, s.stops) for k, s in self._specs.items()}
        self.phase = Phase.PREFILL
        self.spec: PhaseSpec = self._specs["first"]
        self.stops: StopStrings | None = None
        if request.replay:
            self._replay(request.replay)

    def _replay(self, decisions: Seq[tuple[str, object]]) -> None:
        """Make the decisions a dead replica made of this reply, as it made them: the sequence
        holds the reply so far in the protocol's layout (host writes included), in the phase,
        segment and counts after the last one; its prefill forwards the prompt and that reply.
        Their events come first, for the publisher to skip what was published of them."""
        self._begin(self.first_phase)
        for kind, x in decisions:
            due = "audio" if self.phase == Phase.AUDIO else "text"
            if self.phase == Phase.DONE or kind != due:
                raise EngineError(f"request {self.id}: the reply to continue has a {kind} decision where the "
                                  f"protocol is {self.phase.value}")
            if kind == "text":
                self.on_text(int(x))
            else:
                self.on_frame(x)

    # ------------------------------------------------------------------ KV bookkeeping
    @property
    def pending(self) -> int:
        """Tokens of the sequence not yet forwarded (1 while decoding)."""
        return len(self.tokens) - self.kv_len

    def chunk(self, n: int) -> tuple[list[int], list[tuple[int, ...]]]:
        """The next n tokens to forward and the codes of the audio_pads among them."""
        ids = self.tokens[self.kv_len:self.kv_len + n]
        m = sum(1 for t in ids if t == self.rules.audio_pad)
        return ids, self.pad_rows[self.pads_fwd:self.pads_fwd + m]

    def advance(self, n: int) -> bool:
        """n tokens were forwarded. True when a decision is due (nothing left pending)."""
        ids = self.tokens[self.kv_len:self.kv_len + n]
        self.pads_fwd += sum(1 for t in ids if t == self.rules.audio_pad)
        self.kv_len += n
        if self.phase == Phase.PREFILL and self.pending == 0:
            self._begin(self.first_phase)
        return self.pending == 0 and self.phase != Phase.DONE

    def reuse_prefix(self, n: int) -> None:
        """The first n prompt tokens are already in this slot (a session's earlier turn)."""
        n = min(n, len(self.tokens) - 1)          # the last prompt token must run: its logits decide
        self.kv_len = self.prefix_reused = max(0, n)
        self.pads_fwd = sum(1 for t in self.tokens[:self.kv_len] if t == self.rules.audio_pad)

    @property
    def kind(self) -> str:
        """The decision due after the pending tokens: "text" or "audio"."""
        p = self.first_phase if self.phase == Phase.PREFILL else self.phase
        return "audio" if p == Phase.AUDIO else "text"

    # ------------------------------------------------------------------ phases
    def _begin(self, phase: Phase) -> None:
        self.phase = phase
        if phase in (Phase.FIRST_TEXT, Phase.TEXT):
            self.spec = self._specs["first" if phase == Phase.FIRST_TEXT else "text"]
            self.stops = self.rules.stop_set(self.spec.stops)
            self.seg_ids, self.seg_shown = [], ""
            self.events.append(SegmentStart(self.id, "text", self.n_text))
            self.forced_n = self._next_forced("text")
        elif phase == Phase.AUDIO:
            self.spec = self._specs["audio"]
            self.frames = []
            self.rounds += 1
            self.effects.append(("clear_codes",))
            self.forced_n = self._next_forced("audio")

    def _next_forced(self, kind: str) -> int:
        if self.forced is None:
            return 0
        k, n = self.forced.popleft()
        if k != kind:
            raise EngineError(f"request {self.id}: forced schedule wants a {k} segment where the "
                              f"protocol has a {kind} segment")
        return n

    def _overwrite_last(self, new: int) -> None:
        """A host write on the last (unforwarded) token, as the demo loop does (§11.2 c, e)."""
        old = self.tokens[-1]
        if old == self.rules.audio_pad and new != old:
            self.pad_rows.pop()
        self.tokens[-1] = new
        self.host_writes.append((len(self.tokens) - 1, old, new))
        self.effects.append(("replace", old, new))

    def _append(self, ids: Seq[int]) -> None:
        self.tokens.extend(ids)
        self.effects.append(("add", list(ids)))

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        if self.phase == Phase.DONE:
            return
        if self.phase in (Phase.FIRST_TEXT, Phase.TEXT) and reason in ("cancelled", "length", "error"):
            self._end_text(reason)
        elif self.phase == Phase.AUDIO and reason in ("cancelled", "length", "error") and self.frames:
            self._end_audio(reason)
        history, rows = list(self.tokens), self.pad_rows[self.prompt_pads:]
        if (self.phase == Phase.AUDIO and self.forced is None and history[-1] == self.rules.audio_pad
                and rows and rows[-1][0] == self.rules.eoa):
            history[-1] = self.rules.audiogen_end          # the reply ended on its end-of-audio pad
            rows = rows[:-1]
        self.phase = Phase.DONE
        self.done = Done(self.id, reason, tuple(self.tokens), self.kv_len, self.prefix_reused,
                         tuple(self.host_writes), error, tuple(history), tuple(rows))
        self.events.append(self.done)

    # ------------------------------------------------------------------ text decisions
    def on_text(self, tok: int) -> None:
        assert self.phase in (Phase.FIRST_TEXT, Phase.TEXT), self.phase
        self.draws += 1
        self.generated += 1
        self._append([tok])
        self.seg_ids.append(tok)
        shown = self.rules.display(self.seg_ids, self.mode)
        delta = ""
        if not shown.endswith("\ufffd") and shown.startswith(self.seg_shown):
            delta, self.seg_shown = shown[len(self.seg_shown):], shown
        self.events.append(TextToken(self.id, self.n_text, tok, delta))

        if self.forced is not None:
            reason = "forced" if len(self.seg_ids) >= self.forced_n else None
        else:
            reason = None
            if tok == self.rules.eos:
                reason = "eos"
            elif self.stops is not None and (s := self.stops.check(self.tokens)) is not None:
                reason = f"stop:{s}"
            elif len(self.seg_ids) >= self.spec.max_new:
                reason = "max_new"
        if reason is None:
            self._check_room()
            return
        eos = reason == "eos"
        self._end_text(reason)
        if self.mode != Mode.SPOKEN:
            self.finish(reason)
        elif self.forced is not None and not self.forced:
            self.finish("forced")
        elif self.rounds >= self.rules.config.max_rounds:
            self.finish("max_rounds")
        elif eos and len(self.seg_ids) <= 1:
            self.finish("eos")
        else:
            # §11.2 b/c: whatever ended the segment, the host writes audiogen_start over it;
            # after an EOS (with > 1 new token) the final audio segment still follows (correction 11)
            self.final_audio = eos
            self._overwrite_last(self.rules.audiogen_start)
            self._begin(Phase.AUDIO)
            self._check_room()

    def _end_text(self, reason: str) -> None:
        shown = self.rules.display(self.seg_ids, self.mode)
        if shown.startswith(self.seg_shown) and len(shown) > len(self.seg_shown):
            self.events.append(TextToken(self.id, self.n_text, None, shown[len(self.seg_shown):]))
        self.events.append(SegmentEnd(self.id, "text", self.n_text, reason, tuple(self.seg_ids), shown))
        self.n_text += 1

    # ------------------------------------------------------------------ audio decisions
    def on_frame(self, codes: Seq[int]) -> None:
        assert self.phase == Phase.AUDIO, self.phase
        codes = tuple(map(int, codes))
        self.draws += self.rules.num_codebooks
        eoa = self.forced is None and codes[0] == self.rules.eoa
        # a pad for every frame, the end-of-audio frame included; the last one is never forwarded
        self.pad_rows.append(codes)
        self._append([self.rules.audio_pad])
        self.generated += 1
        if not eoa:
            self.turn_frames += 1
            if not self.frames:
                self.events.append(SegmentStart(self.id, "audio", self.n_audio))
            self.events.append(AudioFrame(self.id, self.n_audio, len(self.frames), codes))
            self.frames.append(codes)
            self.effects.append(("codes", codes))
        cap = self.forced_n if self.forced is not None else self.spec.max_new
        if self.request.max_audio_frames is not None and self.forced is None:
            cap = min(cap, self.request.max_audio_frames)
        if not eoa and len(self.frames) < cap:
            self._check_room()
            return
        reason = "eos" if eoa else ("forced" if self.forced is not None else "max_new")
        if self.frames:                        # correction 12: a 0-frame segment emits nothing
            self._end_audio(reason, codes if eoa else ())
        if self.mode == Mode.TTS:
            if self.tts_queue:
                self._overwrite_last(self.rules.audiogen_end)
                self._append(self.tts_queue.popleft())
                self._begin(Phase.AUDIO)
                self._check_room()
            else:
                self.finish(reason)
        elif self.final_audio:
            self.finish("eos")
        elif self.forced is not None and not self.forced:
            self.finish("forced")
        else:
            self._overwrite_last(self.rules.audiogen_end)      # §11.2 e
            self._begin(Phase.TEXT)
            self._check_room()

    def _end_audio(self, reason: str, end_codes: tuple[int, ...] = ()) -> None:
        self.events.append(SegmentEnd(self.id, "audio", self.n_audio, reason, codes=tuple(self.frames),
                                      end_codes=end_codes))
        self.n_audio += 1

    def _check_room(self) -> None:
        r = self.request
        if (len(self.tokens) > self.max_len
                or (r.max_new_tokens is not None and self.generated >= r.max_new_tokens)
                or (r.max_turn_frames is not None and self.turn_frames >= r.max_turn_frames)):
            self.finish("length")
