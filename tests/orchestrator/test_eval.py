"""`baichuan-audio eval openaudiobench`: a tiny OpenAudioBench made here in the published layout
(questions spoken by espeak-ng, stored as MP3), run over real gRPC against the test stack, judged
by a real HTTP server on loopback that speaks the OpenAI chat-completions format."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import soundfile as sf

from orchestrator.cli import main
from orchestrator.evaluation.dataset import SUBSETS, DatasetError, Item, load_items
from orchestrator.evaluation.judge import Judge, JudgeError, JudgeSettings, judge_records, parse_verdict
from orchestrator.evaluation.records import read_jsonl
from orchestrator.evaluation.scoring import consistency, contains_reference
from tests.conftest import TEST_KEYS
from tests.parity import missing

JUDGE_KEY = "judge-test-key-0123456789"

# subset -> rows (the published CSV's columns); the audio is the question spoken
TINY = {
    "llama_questions": [{"Questions": "What is the capital of France?", "Answer": "Paris"},
                        {"Questions": "How many legs does a spider have?", "Answer": "eight"}],
    "trivia_qa": [{"question": "Which planet is known as the red planet?", "answers": "['Mars', 'planet Mars']"}],
    "alpaca_eval": [{"instruction": "Tell me a short story about a cat."}],
}
BROKEN = "trivia_qa_1.mp3"       # a trivia item whose file is not audio: its error is recorded
ABSENT = "trivia_qa_2.mp3"       # and one whose file is missing
FAILING = ["trivia_qa/1", "trivia_qa/2"]


def speak(text: str, path: Path) -> None:
    """`text` spoken by espeak-ng, stored as MP3 (libsndfile's MPEG layer III writer)."""
    if shutil.which("espeak-ng") is None:
        missing("espeak-ng not found (make system-deps installs it)")
    wav = path.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), text], check=True, capture_output=True)
    data, rate = sf.read(str(wav), dtype="float32")
    sf.write(str(path), data, rate, format="MP3")
    wav.unlink()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openaudiobench")
    for subset, rows in TINY.items():
        folder = root / "eval_datas" / subset
        (folder / "audios").mkdir(parents=True)
        spec = SUBSETS[subset]
        rows = [dict(r, audio_filename=f"{subset}_{i}.mp3") for i, r in enumerate(rows)]
        for r in rows:
            speak(r[spec.question], folder / "audios" / r["audio_filename"])
        if subset == "trivia_qa":
            rows.append({"question": "broken", "answers": "['x']", "audio_filename": BROKEN})
            rows.append({"question": "absent", "answers": "['y']", "audio_filename": ABSENT})
            (folder / "audios" / BROKEN).write_bytes(b"ID3 this is not an mp3 file" * 10)
        with (folder / f"{subset}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


class StubJudge(ThreadingHTTPServer):
    """OpenAI chat completions on loopback: grades as a strict but simple judge would, from the
    prompt it is sent (a QA answer is correct when it contains a reference answer)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _grade(prompt: str) -> str:
    if "Rating: [[N]]" in prompt:
        return "Helpful enough.\nRating: [[6]]"
    if "Score: [N]" in prompt:
        return "Right answer, no working shown.\nScore: [4]"
    refs = prompt.split("Reference answer(s):\n", 1)[1].split("\n\nAnswer to be judged:\n", 1)
    answer = refs[1].split("\n\nGive a one-sentence", 1)[0].lower()
    ok = any(r.strip().lower() in answer for r in refs[0].splitlines() if r.strip())
    return f"Checked against the reference.\nVerdict: [{'Correct' if ok else 'Incorrect'}]"


class _JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != f"Bearer {JUDGE_KEY}":
            return self._send(401, {"error": {"message": "Incorrect API key provided"}})
        prompt = body["messages"][-1]["content"]
        content = "no verdict here" if "NO-VERDICT" in prompt else _grade(prompt)
        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_server():
    server = StubJudge()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def judge_key_file(tmp_path) -> Path:
    path = tmp_path / "judge-key"
    path.write_text(JUDGE_KEY + "\n")
    return path


# -- the dataset, matching and consistency (no server) ---------------------------------------

def test_published_layout_and_columns(bench, tmp_path):
    items = load_items(bench, "trivia_qa")
    assert [i.id for i in items] == ["trivia_qa/0", "trivia_qa/1", "trivia_qa/2"]
    assert items[0].references == ["Mars", "planet Mars"] and items[0].question.startswith("Which planet")
    wav = items[0].wav()
    assert wav[:4] == b"RIFF" and sf.info(str(items[0].audio_path)).format == "MP3"
    assert load_items(bench, "llama_questions", limit=1)[0].references == ["Paris"]
    with pytest.raises(DatasetError, match="eval_datas/reasoning_qa/reasoning_qa.csv"):
        load_items(bench, "reasoning_qa")
    bad = tmp_path / "eval_datas" / "llama_questions"
    bad.mkdir(parents=True)
    (bad / "llama_questions.csv").write_text("question,answer,audio_filename\nq,a,x.mp3\n")
    with pytest.raises(DatasetError, match="lacks the column.*Questions, Answer"):
        load_items(tmp_path, "llama_questions")


def test_reference_matching():
    assert contains_reference("The capital of France is Paris.", ["Paris"])
    assert contains_reference("It's the planet MARS!", ["Jupiter", "Mars"])
    assert not contains_reference("Parisian food is famous.", ["Paris"])      # whole words only
    assert not contains_reference("", ["Paris"]) and not contains_reference("Paris", [])
    assert contains_reference("答案是：巴黎。", ["巴黎"])


def test_consistency_wer_cer():
    c = consistency([("Hello, world", "hello word"), ("", "anything"), ("good morning", "good morning")])
    assert c["replies"] == 3 and c["scored"] == 2
    assert c["wer"] == pytest.approx(100 * 1 / 4, abs=0.005)      # one substitution in four reference words
    assert c["cer"] == pytest.approx(100 * 1 / 21, abs=0.005)     # one deletion in 21 characters (spaces dropped)


# -- the judge against a real HTTP server ------------------------------------------------------

def test_judge_grades_caches_and_reports_errors(judge_server, judge_key_file, tmp_path):
    items = {i.id: i for i in (
        Item("llama_questions", 0, Path("q0.mp3"), "What is the capital of France?", ["Paris"]),
        Item("llama_questions", 1, Path("q1.mp3"), "How many legs does a spider have?", ["eight"]),
        Item("reasoning_qa", 0, Path("r0.mp3"), "1+1?", ["2"]),
        Item("alpaca_eval", 0, Path("a0.mp3"), "A story, please.", []),
        Item("alpaca_eval", 1, Path("a1.mp3"), "NO-VERDICT", []))}
    records = [{"id": "llama_questions/0", "mode": "s2t", "reply_text": "It is Paris."},
               {"id": "llama_questions/1", "mode": "s2t", "reply_text": "Six, I think."},
               {"id": "reasoning_qa/0", "mode": "s2t", "reply_text": "2"},
               {"id": "alpaca_eval/0", "mode": "s2t", "reply_text": "Once upon a time..."},
               {"id": "alpaca_eval/1", "mode": "s2t", "reply_text": "..."},
               {"id": "llama_questions/0", "mode": "s2s", "error": "UNAVAILABLE: gone"}]
    judge = Judge(JudgeSettings.load(url=judge_server.url, model="judge-x", api_key_file=str(judge_key_file)))
    before = len(judge_server.requests)
    grades = judge_records(judge, items, records, tmp_path)
    assert len(judge_server.requests) - before == 5                       # failed runs are not judged
    assert {r["model"] for r in judge_server.requests[before:]} == {"judge-x"}
    assert {k: g.get("points") for k, g in grades.items()} == {
        "s2t:llama_questions/0": 1.0, "s2t:llama_questions/1": 0.0, "s2t:reasoning_qa/0": 4.0,
        "s2t:alpaca_eval/0": 6.0, "s2t:alpaca_eval/1": None}
    assert "no verdict" in grades["s2t:alpaca_eval/1"]["error"]
    # a re-run asks only for what is not graded yet (the unparseable one), nothing twice
    judge_records(judge, items, records, tmp_path)
    assert len(judge_server.requests) - before == 6
    assert len(read_jsonl(tmp_path / "judgments.jsonl")) == 6
    # a changed reply is graded again
    records[1]["reply_text"] = "A spider has eight legs."
    assert judge_records(judge, items, records, tmp_path)["s2t:llama_questions/1"]["points"] == 1.0
    # a wrong key: the endpoint's answer, per item, not an exception
    (tmp_path / "bad").write_text("wrong-key")
    (tmp_path / "other-run").mkdir()
    wrong = Judge(JudgeSettings.load(url=judge_server.url, api_key_file=str(tmp_path / "bad")))
    g = judge_records(wrong, items, records[:1], tmp_path / "other-run")
    assert "HTTP 401" in g["s2t:llama_questions/0"]["error"]


def test_verdict_formats():
    assert parse_verdict("qa", "first [Correct] then... Verdict: [Incorrect]") == 0.0   # the last counts
    assert parse_verdict("rating10", "Rating: [[10]]") == 10.0
    with pytest.raises(JudgeError):
        parse_verdict("score5", "Score: [7]")


def test_judge_settings_file_and_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("url: http://127.0.0.1:1/v1\nmodel: from-file\nconcurrency: 2\n")
    monkeypatch.setenv("BAICHUAN_AUDIO_JUDGE_MODEL", "from-env")
    monkeypatch.setenv("BAICHUAN_AUDIO_JUDGE_API_KEY", "env-key-0123")
    s = JudgeSettings.load(cfg)
    assert (s.url, s.model, s.concurrency, s.key()) == ("http://127.0.0.1:1/v1", "from-env", 2, "env-key-0123")
    assert "env-key-0123" not in repr(s)
    assert JudgeSettings.load(cfg, model="from-flag").model == "from-flag"     # a flag beats both
    cfg.write_text("url: http://x/v1\napi_key: sk-in-a-file\n")
    with pytest.raises(JudgeError, match="never in the settings file"):
        JudgeSettings.load(cfg)
    cfg.write_text("url: http://x/v1\nconcurrency: 0\n")
    with pytest.raises(JudgeError, match="concurrency"):
        JudgeSettings.load(cfg)


# -- the whole command against the served tiny stack ---------------------------------------------

def test_eval_openaudiobench_s2s_resume_and_report(serve_stack, bench, judge_server, judge_key_file, tmp_path,
                                                   capsys):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    key = tmp_path / "one-turn-key"     # an identity allowed one running turn: concurrency 2 waits its quota
    key.write_text(TEST_KEYS["one-turn"])
    out = tmp_path / "run"
    args = ["eval", "openaudiobench", str(bench), "--mode", "s2s", "--concurrency", "2", "--out", str(out),
            "--address", serve_stack.address, "--api-key-file", str(key), "--judge-url", judge_server.url,
            "--judge-model", "judge-x", "--judge-api-key-file", str(judge_key_file), "--no-progress"]
    assert main(args) == 2                            # two items failed; the others ran
    records = read_jsonl(out / "records.jsonl")
    assert sorted(r["id"] for r in records) == ["alpaca_eval/0", "llama_questions/0", "llama_questions/1",
                                                "trivia_qa/0", *FAILING]
    errors = {r["id"]: r.get("error") for r in records if r["id"] in FAILING}
    assert errors["trivia_qa/1"].startswith(f"cannot decode {BROKEN} as audio")
    assert errors["trivia_qa/2"] == f"audio file missing: {ABSENT}"
    good = [r for r in records if r["id"] not in FAILING]
    rate = None
    for r in good:
        assert "error" not in r, r
        assert r["mode"] == "s2s" and r["turn_id"] and isinstance(r["reply_text"], str) and isinstance(r["asr_text"], str)
        assert 0 < r["ttfa_ms"] <= r["wall_s"] * 1000
        if r["reply_text"]:             # the random tiny model sometimes speaks without any text
            assert 0 < r["ttft_ms"] <= r["wall_s"] * 1000
        assert r["rtf"] > 0 and r["audio_seconds"] > 0
        info = sf.info(str(out / r["reply_audio"]))
        rate = rate or info.samplerate
        assert info.frames / info.samplerate == pytest.approx(r["audio_seconds"], abs=1 / info.samplerate)

    report = json.loads((out / "report.json").read_text())
    assert report["run"]["concurrency"] == 2 and report["run"]["judge_model"] == "judge-x"
    by = {s["subset"]: s for s in report["subsets"]}
    assert set(by) == set(TINY)
    assert (by["trivia_qa"]["items"], by["trivia_qa"]["errors"]) == (3, 2)
    for name, s in by.items():
        assert s["published"] == SUBSETS[name].published[1]                 # the S->S column
        assert s["published_items"] == SUBSETS[name].size
        assert s["ttfa_ms"]["p50"] <= s["ttfa_ms"]["p95"] and s["rtf"]["p50"] > 0
        assert s["consistency"]["replies"] == s["items"] - s["errors"]
        assert s["judge_graded"] == s["items"] - s["errors"]
    # the stub judge's verdicts on the tiny model's replies, recomputed here from its rule
    for name in ("llama_questions", "trivia_qa"):
        rs = [r for r in good if r["subset"] == name]
        refs = {i.id: i.references for i in load_items(bench, name)}
        expect = sum(any(x.lower() in r["reply_text"].strip().lower() for x in refs[r["id"]]) for r in rs) / len(rs)
        assert by[name]["judge_score"] == pytest.approx(100 * expect)
        assert by[name]["match_accuracy"] is not None
    assert by["alpaca_eval"]["judge_score"] == pytest.approx(60.0) and by["alpaca_eval"]["match_accuracy"] is None
    md = (out / "report.md").read_text()
    assert "| alpaca_eval | 1 | 0 |" in md and "69.6" in md and BROKEN in md
    assert md in capsys.readouterr().out

    # a re-run skips what is done: only the failed items run again, the judge is asked nothing new
    asked = len(judge_server.requests)
    assert main(args) == 2
    again = read_jsonl(out / "records.jsonl")
    assert sorted(r["id"] for r in again[len(records):]) == FAILING
    assert len(judge_server.requests) == asked
    # an interrupted run (its record lost) runs that item only
    lines = (out / "records.jsonl").read_text().splitlines()
    first_ok = next(i for i, line in enumerate(lines) if "error" not in json.loads(line))
    dropped = json.loads(lines[first_ok])["id"]
    (out / "records.jsonl").write_text("\n".join(lines[:first_ok] + lines[first_ok + 1:]) + "\n")
    assert main(args) == 2
    after = read_jsonl(out / "records.jsonl")
    assert sorted(r["id"] for r in after[len(lines) - 1:]) == sorted([dropped, *FAILING])


def test_eval_s2t_text_replies(serve_stack, bench, tmp_path, capsys):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    out = tmp_path / "s2t"
    assert main(["eval", "openaudiobench", str(bench), "--subset", "llama_questions", "--limit", "1",
                 "--out", str(out), "--address", serve_stack.address, "--api-key-file",
                 str(serve_stack.api_keys_file), "--no-progress"]) == 0
    [rec] = read_jsonl(out / "records.jsonl")
    assert rec["mode"] == "s2t" and rec["ttfa_ms"] is None and "reply_audio" not in rec and "asr_text" not in rec
    assert not (out / "audio").exists()
    [s] = json.loads((out / "report.json").read_text())["subsets"]
    assert s["published"] == SUBSETS["llama_questions"].published[0] and s["third_party"] == 74.33
    assert s["judge_score"] is None and s["consistency"] is None
    # usage errors are one line, exit 1
    assert main(["eval", "openaudiobench", str(tmp_path), "--out", str(out)]) == 1
    assert "holds no OpenAudioBench subset" in capsys.readouterr().err
