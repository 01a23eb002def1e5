"""The output folder's JSONL files: one record per line, appended as items finish."""
from __future__ import annotations

import json
from pathlib import Path

RECORDS = "records.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def latest_records(out_dir: Path) -> dict[str, dict]:
    """The newest record per "mode:item id": a re-run's record replaces a failed one."""
    latest: dict[str, dict] = {}
    for rec in read_jsonl(out_dir / RECORDS):
        latest[f"{rec['mode']}:{rec['id']}"] = rec
    return latest
