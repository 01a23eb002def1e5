"""The LLM judge: any OpenAI-compatible chat-completions endpoint grades the replies of the
subsets the tech report judges with GPT-4o, on the scale each subset uses (README, Evaluation,
shows the prompts). Settings from a YAML file and the environment (`BAICHUAN_AUDIO_JUDGE_*`);
the key only from the environment or a file it names."""
from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.evaluation.dataset import SUBSETS, Item
from orchestrator.evaluation.records import read_jsonl

JUDGMENTS = "judgments.jsonl"


class JudgeError(RuntimeError):
    pass


class JudgeSettings(BaseSettings):
    """url: the API base (`https://HOST/v1`; requests go to `{url}/chat/completions`)."""
    model_config = SettingsConfigDict(env_prefix="BAICHUAN_AUDIO_JUDGE_", extra="forbid")

    url: str | None = None
    model: str = "gpt-4o-2024-08-06"       # the judge the benchmark's own tasks name
    api_key: SecretStr | None = None        # environment only (BAICHUAN_AUDIO_JUDGE_API_KEY)
    api_key_file: Path | None = None
    concurrency: int = Field(4, ge=1, le=64)
    timeout_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(4, ge=1, le=20)
    max_tokens: int = Field(512, ge=16)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "JudgeSettings":
        """The file's settings, then the environment's, then `overrides` (the flags; None: unset)."""
        data: dict[str, Any] = {}
        if path:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise JudgeError(f"{path}: expected a mapping of judge settings")
            if "api_key" in data:
                raise JudgeError(f"{path}: the judge's key goes in BAICHUAN_AUDIO_JUDGE_API_KEY or a file "
                                 "named by api_key_file, never in the settings file")
        try:
            data.update(cls().model_dump(exclude_unset=True))       # what the environment sets
            data.update({k: v for k, v in overrides.items() if v is not None})
            return cls(**data)
        except ValidationError as e:
            raise JudgeError(f"judge settings: {e}") from None

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None


# -- prompts: one per scale; {question}, {reference}, {answer} are filled in ------------------

QA_PROMPT = """You grade answers to spoken general-knowledge questions.
Decide whether the answer to be judged is correct given the reference answer(s). It is correct
when it states, or clearly contains, the meaning of at least one reference answer; wording,
language, number format (digits or words), punctuation and tone do not matter. An answer that
hedges between several candidates, or that is off topic, is incorrect.

Question:
{question}

Reference answer(s):
{reference}

Answer to be judged:
{answer}

Give a one-sentence justification, then end with exactly one line: "Verdict: [Correct]" or
"Verdict: [Incorrect]"."""

SCORE5_PROMPT = """You are a mathematics teacher grading a student's answer to a reasoning question
against the standard answer, on a scale of 1 to 5:
5: the final answer is correct and the reasoning is correct and complete, considering every case;
4: the final answer is correct but no reasoning is given;
3: the final answer is wrong but most of the reasoning is right, or the answer is right but the
   reasoning has a clear error;
2: the final answer is wrong and most of the reasoning is wrong;
1: the final answer, the reasoning and the approach are all wrong.
Ignore formatting: LaTeX or plain formulas, fractions or decimals (1/3 and 0.33), pi or 3.14 and
the names of constants are equivalent.

Question:
{question}

Standard answer:
{reference}

Student's answer:
{answer}

Explain briefly, then end with exactly one line: "Score: [N]" where N is 1, 2, 3, 4 or 5."""

RATING10_PROMPT = """Act as an impartial judge of the response an AI assistant gave to the user's
spoken request below. Consider helpfulness, relevance, accuracy, depth, creativity and level of
detail. Give a short explanation, as objective as possible, then rate the response from 1 to 10
and end with exactly one line in this format: "Rating: [[N]]".

[Request]
{question}

[Start of the assistant's response]
{answer}
[End of the assistant's response]"""

PROMPTS = {"qa": QA_PROMPT, "score5": SCORE5_PROMPT, "rating10": RATING10_PROMPT}
# the verdict in the judge's reply (the last one counts) and the points it gives, and the
# scale's maximum: a subset's score is the mean points as a percentage of the maximum
VERDICTS = {
    "qa": (re.compile(r"\[\s*(correct|incorrect)\s*\]", re.I), lambda v: 1.0 if v.lower() == "correct" else 0.0, 1),
    "score5": (re.compile(r"\[\s*([1-5])\s*\]"), float, 5),
    "rating10": (re.compile(r"\[\[\s*(10|[1-9])\s*\]\]"), float, 10),
}


def prompt_for(item: Item, answer: str) -> str:
    scale = SUBSETS[item.subset].judge
    return PROMPTS[scale].format(question=item.question.strip(), reference="\n".join(item.references),
                                 answer=answer.strip() or "(no answer)")


def parse_verdict(scale: str, text: str) -> float:
    """The points the judge gave; JudgeError if its reply holds no verdict in the asked format."""
    pattern, points, _ = VERDICTS[scale]
    found = pattern.findall(text or "")
    if not found:
        raise JudgeError(f"no verdict in the judge's reply: {text[:200]!r}")
    return points(found[-1])


def scale_max(scale: str) -> int:
    return VERDICTS[scale][2]


class Judge:
    """A chat-completions client (stdlib HTTP; one request per grade, retried on 429/5xx)."""

    def __init__(self, settings: JudgeSettings):
        if not settings.url:
            raise JudgeError("no judge endpoint: set BAICHUAN_AUDIO_JUDGE_URL, `url` in --judge-config "
                             "or --judge-url (an OpenAI-compatible API base, e.g. https://api.openai.com/v1)")
        self.settings = settings
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        self._key = settings.key()

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.settings.model, "temperature": 0, "max_tokens": self.settings.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        delay = 1.0
        for attempt in range(self.settings.max_attempts):
            req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as resp:
                    data = json.loads(resp.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                retryable = e.code == 429 or e.code >= 500
                if not retryable or attempt == self.settings.max_attempts - 1:
                    detail = e.read()[:300].decode(errors="replace")
                    raise JudgeError(f"judge endpoint answered HTTP {e.code}: {detail}") from None
                wait = float(e.headers.get("retry-after") or delay)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                if attempt == self.settings.max_attempts - 1:
                    raise JudgeError(f"judge endpoint {self.endpoint} unreachable: {e}") from None
                wait = delay
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise JudgeError(f"judge endpoint's reply is not a chat completion: {e!r}") from None
            time.sleep(min(wait, 30.0))
            delay *= 2
        raise JudgeError("unreachable")  # pragma: no cover


def _fingerprint(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:16]


def judge_records(judge: Judge, items: dict[str, Item], records: list[dict], out_dir: Path) -> dict[str, dict]:
    """Grades every successful record (its reply text; for S->S the text the model spoke).
    Grades are kept in judgments.jsonl by (record, judge model, prompt): a re-run asks only for
    what is new. Returns the grade per record key ("mode:id")."""
    path = out_dir / JUDGMENTS
    known = {(g["key"], g["fingerprint"]): g for g in read_jsonl(path) if "points" in g}
    todo, out = [], {}
    for rec in records:
        if rec.get("error") or rec["id"] not in items:
            continue
        item = items[rec["id"]]
        prompt = prompt_for(item, rec.get("reply_text", ""))
        key, fp = f"{rec['mode']}:{rec['id']}", _fingerprint(judge.settings.model, prompt)
        if (key, fp) in known:
            out[key] = known[(key, fp)]
        else:
            todo.append((key, fp, SUBSETS[item.subset].judge, prompt))

    def grade(job):
        key, fp, scale, prompt = job
        g = {"key": key, "fingerprint": fp, "model": judge.settings.model}
        try:
            g["reply"] = judge.complete(prompt)
            g["points"] = parse_verdict(scale, g["reply"])
        except JudgeError as e:
            g["error"] = str(e)
        return g

    with path.open("a", encoding="utf-8") as f, ThreadPoolExecutor(judge.settings.concurrency) as pool:
        for g in pool.map(grade, todo):
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
            f.flush()
            out[g["key"]] = g
    return out
