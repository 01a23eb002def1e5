"""Every command a redis-server executes while a test runs (MONITOR), scripts' own commands
included, each as its list of arguments."""
from __future__ import annotations

import re
import threading

import redis

_LINE = re.compile(r"\[(\d+) (.*?)\] (.*)", re.S)
_ARG = re.compile(r'"(.*?)(?<!\\)"', re.S)


class Monitor:
    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.commands: list[list[str]] = []
        self._conn = self.client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() in (b"OK", "OK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            line = self._conn.read_response()
            line = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            m = _LINE.match(line.split(" ", 1)[1])
            args = [a.replace('\\"', '"') for a in _ARG.findall(m.group(3))] if m else []
            if args:
                self.commands.append([args[0].lower(), *args[1:]])

    def close(self) -> list[list[str]]:
        """Stop watching; the commands seen (each a list: the name lower-cased, its arguments)."""
        self._stop.set()
        self.client.ping()                       # wakes the reader up
        self._thread.join(10)
        self._conn.disconnect()
        self.client.close()
        return self.commands

    def writes_to(self, key: str) -> list[list[str]]:
        return [c for c in self.commands if len(c) > 1 and c[1] == key]
