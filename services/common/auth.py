"""API keys: who is calling. Plain Python (no gRPC import): the servicers pass the call's
metadata in and get the caller's identity back, or an `Unauthenticated` error that
services/common/grpc_status.py turns into UNAUTHENTICATED.

A key ring holds named keys, `name:key` entries one per line (or comma-separated; `#` starts a
comment), from a file (e.g. a mounted Kubernetes Secret, re-read when it changes, so keys
rotate without a restart) and from an environment variable. The name is the identity:
sessions and quotas belong to it. A caller sends `authorization: Bearer <key>`; the key is
compared with every key of the ring in constant time (hmac.compare_digest), so neither the
time taken nor the answer tells which key came close. Keys never appear in errors or logs;
a problem in a key file names the line, never the key.

Two rings: the public API keys (ConversationService) and the internal keys of the stage
services (Tokenizer, LLM, Decoder, Vocoder), which bypass every limit of the conversation
service and so take no public key."""
from __future__ import annotations

import hmac
import os
import secrets
import threading
from pathlib import Path
from typing import Iterable

from services.common.errors import Unauthenticated
from services.common.settings import IDENTITY_RE, IDENTITY_RULE, AuthSettings

MIN_KEY_CHARS = 16
ANONYMOUS = "anonymous"   # the identity of calls without a key where auth.required is false
HEADER = "authorization"


class KeyRingError(ValueError):
    """A key ring that cannot be read: names the source and line, never a key."""


def parse_keys(text: str, source: str) -> dict[str, str]:
    """`name:key` entries (one per line or comma-separated) -> {name: key}."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, key = entry.partition(":")
            name, key = name.strip(), key.strip()
            where = f"{source} line {lineno}"
            if not sep or not key:
                raise KeyRingError(f"{where}: an entry is not `name:key`")
            if not IDENTITY_RE.fullmatch(name):
                raise KeyRingError(f"{where}: key name {name!r} is not valid ({IDENTITY_RULE})")
            if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
                raise KeyRingError(f"{where}: the key of {name!r} is shorter than {MIN_KEY_CHARS} characters "
                                "or has spaces (make one with `openssl rand -hex 32`)")
            if name in out:
                raise KeyRingError(f"{where}: {name!r} has a second key (one key per name)")
            if key in out.values():
                raise KeyRingError(f"{where}: the key of {name!r} is also another name's key")
            out[name] = key
    return out


def new_key() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(path: Path, name: str = "local") -> str:
    """Write a key ring with one new key (owner-only permissions); returns the key."""
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{name}:{key}\n")
    return key


def read_client_key(path: Path) -> str:
    """The key a client sends, from a file holding a bare key or a key ring (its first entry)."""
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise KeyRingError(f"{path} is empty")
    first = text.splitlines()[0].strip()
    if ":" not in first:
        return first
    keys = parse_keys(text, str(path))
    if not keys:
        raise KeyRingError(f"{path} holds no key")
    return next(iter(keys.values()))


class KeyRing:
    """Named keys from a file and/or a string (the environment's). Thread-safe."""

    def __init__(self, *, file: str = "", text: str = "", what: str = "API key"):
        self.file = Path(file) if file else None
        self.what = what
        self._env = parse_keys(text, f"the environment's {what}s") if text else {}
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._file_keys: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        if self.file is None:
            return
        try:
            st = self.file.stat()
        except OSError as e:
            raise KeyRingError(f"{self.what} file {self.file} cannot be read ({e.strerror})") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            keys = parse_keys(self.file.read_text(encoding="utf-8"), str(self.file))
            with self._lock:
                self._file_keys, self._stamp = keys, stamp

    def keys(self) -> dict[str, str]:
        """{name: key}; the file is re-read when it changed (a rotated Secret)."""
        try:
            self._reload()
        except (KeyRingError, OSError, UnicodeDecodeError):
            pass  # a half-written or vanished file: keep the keys read last
        with self._lock:
            return {**self._file_keys, **self._env}

    def __len__(self) -> int:
        return len(self.keys())

    def identify(self, presented: str) -> str | None:
        """The name of `presented`, or None. Every key is compared, in constant time."""
        found = None
        given = presented.encode()
        for name, key in self.keys().items():
            if hmac.compare_digest(given, key.encode()):
                found = name
        return found


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer <token>` (scheme case-insensitive); None if absent.
    ValueError-free: a malformed header is the same as a wrong key to the caller."""
    for k, v in metadata or ():
        if k.lower() == HEADER:
            value = v.decode(errors="replace") if isinstance(v, bytes) else v
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class Authenticator:
    """Who is calling, from a gRPC call's metadata."""

    def __init__(self, ring: KeyRing, *, required: bool, how: str):
        self.ring = ring
        self.required = required
        self.how = how                     # how a caller gets a key, for the error message

    @classmethod
    def public(cls, auth: AuthSettings) -> "Authenticator":
        """The ConversationService's: the API keys. With auth.required and no key at all, the
        replica refuses to start (every call would fail)."""
        ring = KeyRing(file=auth.api_keys_file, text=auth.api_keys)
        if auth.required and not len(ring):
            raise KeyRingError("auth.required is true but no API key is configured: set auth.api_keys_file (a file "
                            "of `name:key` lines) or BAICHUAN_AUDIO_API_KEYS, or set auth.required: false "
                            "for a private network")
        return cls(ring, required=auth.required,
                   how="send the metadata 'authorization: Bearer <API key>' with a key the operator "
                       "issued you (auth.api_keys_file / BAICHUAN_AUDIO_API_KEYS)")

    @classmethod
    def internal(cls, auth: AuthSettings) -> "Authenticator":
        """The stage services': only the internal keys (no key configured: no call passes)."""
        return cls(KeyRing(file=auth.internal_keys_file, text=auth.internal_keys, what="internal key"),
                   required=True,
                   how="the stage services are internal: send 'authorization: Bearer <internal key>' with a key "
                       "of auth.internal_keys_file / BAICHUAN_AUDIO_INTERNAL_KEYS (API keys are not accepted)")

    def identity(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's identity; Unauthenticated (with how to authenticate) otherwise."""
        token = bearer(metadata)
        if token is None:
            if not self.required:
                return ANONYMOUS
            raise Unauthenticated(f"this call needs an API key: {self.how}")
        name = self.ring.identify(token) if token else None
        if name is None:
            raise Unauthenticated(f"the key in the 'authorization' metadata is not valid: {self.how}")
        return name

    def caller(self, grpc_context) -> str:
        """identity() of a servicer's context (Serve's or grpc's); no context: no metadata."""
        md = grpc_context.invocation_metadata() if grpc_context is not None else None
        return self.identity(md)
