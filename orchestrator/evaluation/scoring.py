"""Scores and the report: reference matching, the judge's scores, the S->S consistency of the
spoken reply with its text (WER/CER of the stack's own ASR), latency percentiles; markdown + JSON.
Plain Python: no gRPC."""
from __future__ import annotations

import json
import re
import string
import unicodedata
from pathlib import Path

import jiwer
import numpy as np

from orchestrator.evaluation.dataset import SUBSETS, Item
from orchestrator.evaluation.judge import scale_max

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"，", "。", "！", "？", "；", "：", "、", "“", "”", "‘", "’", "（", "）", "《", "》"}


def normalize(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces (SQuAD-style); NFKC first
    so full-width characters match their ASCII forms."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if c in _PUNCT else c for c in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_reference(reply: str, references: list[str]) -> bool:
    """Whether the reply contains at least one reference answer as whole words (normalized)."""
    hay = f" {normalize(reply)} "
    return any(ref and f" {ref} " in hay for ref in (normalize(r) for r in references))


def consistency(pairs: list[tuple[str, str]]) -> dict:
    """WER and CER of the ASR transcripts of spoken replies against the replies' text, over the
    replies whose normalized text is not empty (corpus level: total edits / total reference length).
    CER is the measure for Chinese, which has no spaces between words."""
    refs, hyps = [], []
    for text, asr in pairs:
        r = normalize(text)
        if r:
            refs.append(r)
            hyps.append(normalize(asr))
    out = {"replies": len(pairs), "scored": len(refs), "wer": None, "cer": None}
    if refs:
        out["wer"] = round(100 * jiwer.wer(refs, hyps), 2)
        out["cer"] = round(100 * jiwer.cer([r.replace(" ", "") for r in refs],
                                           [h.replace(" ", "") for h in hyps]), 2)
    return out


def percentiles(values: list[float | None], ps=(50, 95)) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": round(float(np.percentile(v, p)), 3) for p in ps}


def subset_report(subset: str, mode: str, items: dict[str, Item], records: list[dict],
                  grades: dict[str, dict] | None) -> dict:
    spec = SUBSETS[subset]
    ok = [r for r in records if not r.get("error")]
    rep: dict = {
        "subset": subset, "mode": mode, "items": len(records), "published_items": spec.size,
        "errors": len(records) - len(ok),
        "published": spec.published[0 if mode == "s2t" else 1],
        "published_source": "Baichuan-Audio tech report, Table 8 (GPT-4o judge)",
        "third_party": spec.third_party if mode == "s2t" else None,
        "match_accuracy": None, "judge_score": None, "judge_graded": 0, "judge_errors": 0,
        "ttft_ms": percentiles([r.get("ttft_ms") for r in ok]),
        "ttfa_ms": percentiles([r.get("ttfa_ms") for r in ok]),
        "server_first_audio_ms": percentiles([r.get("server_first_audio_ms") for r in ok]),
        "rtf": percentiles([r.get("rtf") for r in ok]),
        "consistency": None,
        "error_samples": sorted({r["error"] for r in records if r.get("error")})[:5],
    }
    if spec.matchable and ok:
        hits = [contains_reference(r.get("reply_text", ""), items[r["id"]].references) for r in ok]
        rep["match_accuracy"] = round(100 * sum(hits) / len(hits), 2)
    if grades is not None:
        got = [grades[f"{mode}:{r['id']}"] for r in ok if f"{mode}:{r['id']}" in grades]
        points = [g["points"] for g in got if "points" in g]
        rep["judge_graded"], rep["judge_errors"] = len(points), len(got) - len(points)
        if points:
            rep["judge_score"] = round(100 * float(np.mean(points)) / scale_max(spec.judge), 2)
            rep["judge_scale"] = "mean of 0/1 x 100" if spec.judge == "qa" else \
                f"mean of 1-{scale_max(spec.judge)} as % of {scale_max(spec.judge)}"
    if mode == "s2s":
        pairs = [(r.get("reply_text", ""), r["asr_text"]) for r in ok if "asr_text" in r]
        rep["consistency"] = consistency(pairs) if pairs else None
    return rep


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    run = report["run"]
    lines = [
        "# OpenAudioBench through the served API", "",
        f"Server `{run['address']}`, mode {run['mode']}, concurrency {run['concurrency']}"
        + (f", first {run['limit']} items per subset" if run.get("limit") else "")
        + (f"; judge `{run['judge_model']}`" if run.get("judge_model") else "; no judge") + ".",
        "Scores are percentages. Published: Baichuan-Audio (7B) in the tech report's Table 8 "
        "(GPT-4o judge; S->S scored on the reply's text); third-party: Kimi-Audio-Evalkit's run (s->t). "
        "Latency is the client's, from sending the question: TTFT to the first text, TTFA to the first "
        "audio; RTF is the server's turn time over reply audio time (below 1: faster than real time).",
        "",
        "| subset | items | errors | match | judge | published | third-party | TTFT p50/p95 ms "
        "| TTFA p50/p95 ms | RTF p50/p95 | ASR WER/CER % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["subsets"]:
        c = s.get("consistency") or {}
        lines.append(
            f"| {s['subset']} | {s['items']} | {s['errors']} | {_fmt(s['match_accuracy'])} | {_fmt(s['judge_score'])} "
            f"| {_fmt(s['published'])} | {_fmt(s['third_party'])} "
            f"| {_fmt(s['ttft_ms']['p50'], 0)} / {_fmt(s['ttft_ms']['p95'], 0)} "
            f"| {_fmt(s['ttfa_ms']['p50'], 0)} / {_fmt(s['ttfa_ms']['p95'], 0)} "
            f"| {_fmt(s['rtf']['p50'], 2)} / {_fmt(s['rtf']['p95'], 2)} "
            f"| {_fmt(c.get('wer'))} / {_fmt(c.get('cer'))} |")
    errs = [(s["subset"], e) for s in report["subsets"] for e in s["error_samples"]]
    if errs:
        lines += ["", "Errors (up to five distinct ones per subset; every one is in records.jsonl):", ""]
        lines += [f"- {sub}: {e}" for sub, e in errs]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> tuple[Path, Path]:
    js, md = out_dir / "report.json", out_dir / "report.md"
    js.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md.write_text(markdown(report), encoding="utf-8")
    return js, md
