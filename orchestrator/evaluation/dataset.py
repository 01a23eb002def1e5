"""OpenAudioBench in its published layout: `eval_datas/<subset>/<subset>.csv` and the spoken
questions as `eval_datas/<subset>/audios/*.mp3`.

The column names per subset are those of the published CSVs as the benchmark's own task code
and third-party evaluation kits read them (see README, Evaluation): every CSV names its audio
in `audio_filename`; the question and reference columns differ per subset. Plain Python: no
gRPC here, so scoring and tests of the layout need no server."""
from __future__ import annotations

import ast
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from services.common.audio import to_pcm16, wav_bytes

AUDIO_COLUMN = "audio_filename"
MODES = ("s2t", "s2s")       # text replies; spoken replies


@dataclass(frozen=True)
class Subset:
    name: str
    question: str                 # the column holding the question's text (for the judge)
    reference: str | None         # the reference answer(s) column; None: open-ended
    references_are_list: bool     # the reference cell is a Python list literal of answers
    judge: str                    # the judge scale: "qa" (correct/incorrect), "score5", "rating10"
    # Baichuan-Audio (7B) in the tech report's Table 8, GPT-4o-judged: (s->t, s->s)
    published: tuple[float, float]
    # a third-party run of Baichuan-Audio (Kimi-Audio's README, Kimi-Audio-Evalkit): s->t
    third_party: float | None = None
    size: int = 0                 # items in the published subset

    @property
    def matchable(self) -> bool:
        """Whether a reply can be scored by containing a reference answer (short-answer QA)."""
        return self.reference is not None and self.judge == "qa"


SUBSETS: dict[str, Subset] = {s.name: s for s in (
    Subset("reasoning_qa", "Prompt", "参考答案", False, "score5", (41.9, 37.9), 46.73, 202),
    Subset("llama_questions", "Questions", "Answer", False, "qa", (78.4, 74.5), 74.33, 300),
    Subset("web_questions", "question", "answers", True, "qa", (64.5, 60.3), 58.70, 1000),
    Subset("trivia_qa", "question", "answers", True, "qa", (61.7, 54.2), 55.40, 1000),
    Subset("alpaca_eval", "instruction", None, False, "rating10", (77.4, 69.6), 59.65, 199),
)}


class DatasetError(ValueError):
    """The data directory does not hold a subset in the published layout."""


@dataclass
class Item:
    subset: str
    index: int                    # the row of the CSV (0-based), as the benchmark numbers items
    audio_path: Path
    question: str
    references: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.subset}/{self.index}"

    def wav(self) -> bytes:
        """The question as a PCM16 WAV file (what the API takes): MP3 decoded by libsndfile,
        channels averaged to mono, the file's own sample rate kept (the server resamples)."""
        import soundfile as sf     # libsndfile >= 1.1 reads MP3

        data, rate = sf.read(str(self.audio_path), dtype="float32", always_2d=True)
        return wav_bytes(to_pcm16(data.mean(axis=1)), rate)


def subset_root(data_dir: Path) -> Path:
    """The folder holding the subsets: DATA_DIR/eval_datas, or DATA_DIR itself if it is that folder."""
    return data_dir / "eval_datas" if (data_dir / "eval_datas").is_dir() else data_dir


def available(data_dir: Path) -> list[str]:
    root = subset_root(data_dir)
    return [name for name in SUBSETS if (root / name / f"{name}.csv").is_file()]


def _references(cell: str, as_list: bool) -> list[str]:
    cell = (cell or "").strip()
    if as_list and cell.startswith("["):
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value if str(v).strip()]
    return [cell] if cell else []


def load_items(data_dir: Path, subset: str, limit: int | None = None) -> list[Item]:
    """The subset's items in CSV order (the first `limit` of them)."""
    spec = SUBSETS.get(subset)
    if spec is None:
        raise DatasetError(f"unknown subset {subset!r}; OpenAudioBench has {', '.join(SUBSETS)}")
    folder = subset_root(data_dir) / subset
    table = folder / f"{subset}.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found: DATA_DIR must hold eval_datas/{subset}/{subset}.csv "
                           "(the published OpenAudioBench layout)")
    # utf-8-sig: a CSV saved with a byte-order mark keeps its first column's name
    with table.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    needed = [AUDIO_COLUMN, spec.question] + ([spec.reference] if spec.reference else [])
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise DatasetError(f"{table} lacks the column(s) {', '.join(missing)} of the published {subset} CSV "
                           f"(it has {', '.join(rows[0])})")
    items = [Item(subset, i, folder / "audios" / row[AUDIO_COLUMN], row[spec.question],
                  _references(row[spec.reference], spec.references_are_list) if spec.reference else [])
             for i, row in enumerate(rows)]
    return items[:limit] if limit is not None else items

