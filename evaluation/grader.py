"""MM-Vet's GPT grader, through any OpenAI-compatible chat-completions endpoint (optional).

MM-Vet has no rule-based score: its official ``mm-vet_evaluator.py`` asks GPT-4 to grade each
answer against the ground truth with a few-shot prompt (``metrics.MMVET_GRADER_PROMPT``) and
averages the grades per capability. This module sends those requests, with the evaluator's
protocol (``metrics.mmvet_grader_query``: one user message, ``max_tokens`` 3, the temperature
schedule ``metrics.MMVET_TEMPERATURES``, ``metrics.mmvet_parse_grade``), to the endpoint given:
OpenAI itself (``--grader-url https://api.openai.com/v1 --grader-model gpt-4-0613``, the
evaluator's model) or any server speaking the same API (vLLM, llama.cpp's server, ...). A grader
other than the evaluator's GPT-4 gives scores that are not comparable with published ones; the
report names the grader model so this is never hidden.

The key comes from an environment variable (``OPENAI_API_KEY`` unless ``--grader-key-env``
names another). When it is unset no key is sent over urllib, and the openai client (which
insists on one) sends the placeholder "none": local servers ignore either. The ``openai`` client is used
when it is installed (it is in the dev extra), plain ``urllib`` otherwise. A failed request
(connection refused, timeout, HTTP 429 or 5xx) is tried again ``retries`` times with a doubling
pause; any other HTTP error (a bad key, an unknown model) or retries running out is a
``GraderError`` naming the endpoint, the question and the cause.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ftz_edge.evaluation import metrics as m
from ftz_edge.evaluation.errors import EvalDataError

RETRYABLE_STATUS = (408, 409, 429, 500, 502, 503, 504)


class GraderError(EvalDataError):
    """The grader endpoint could not grade an answer (after its retries)."""


class _Retryable(Exception):
    pass


@dataclass
class GraderConfig:
    url: str  # the API's base URL (".../v1"); a full ".../chat/completions" URL is taken too
    model: str = m.MMVET_DEFAULT_GRADER
    key_env: str = "OPENAI_API_KEY"
    retries: int = 5  # extra tries of a request that failed in transit
    backoff_s: float = 2.0  # the first pause between tries; doubled each time
    timeout_s: float = 60.0
    use_openai: Optional[bool] = None  # None: the openai client when installed

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/chat/completions")] if url.endswith("/chat/completions") else url

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise GraderError(f"--grader-url must be an http:// or https:// URL, got {self.url!r}")
        if not self.model:
            raise GraderError("--grader-model must not be empty")


class ChatClient:
    """One chat-completions request at a time: ``complete(text, temperature, max_tokens)`` ->
    (the reply's text or None, the model that answered)."""

    def __init__(self, config: GraderConfig, sleep: Callable[[float], None] = time.sleep):
        config.check()
        self.config = config
        self.key = os.environ.get(config.key_env) or None
        self._sleep = sleep
        use_openai = config.use_openai
        if use_openai is None:
            try:
                import openai  # noqa: F401

                use_openai = True
            except ImportError:
                use_openai = False
        self._openai = None
        if use_openai:
            import openai

            # No retries inside the client: ours, counted and reported alike on both paths.
            self._openai = openai.OpenAI(base_url=config.base_url, api_key=self.key or "none", max_retries=0,
                                         timeout=config.timeout_s)

    @property
    def transport(self) -> str:
        return "openai" if self._openai is not None else "urllib"

    def complete(self, text: str, temperature: float, max_tokens: int) -> Tuple[Optional[str], str]:
        request = {"model": self.config.model, "messages": [{"role": "user", "content": text}],
                   "max_tokens": max_tokens, "temperature": temperature}
        pause, last = self.config.backoff_s, ""
        for attempt in range(self.config.retries + 1):
            try:
                return self._send_openai(request) if self._openai is not None else self._send_urllib(request)
            except _Retryable as err:
                last = str(err)
                if attempt < self.config.retries:
                    self._sleep(pause)
                    pause *= 2
        raise GraderError(f"grader {self.config.base_url} failed {self.config.retries + 1} times: {last}")

    def _send_openai(self, request: Dict[str, Any]) -> Tuple[Optional[str], str]:
        import openai

        try:
            response = self._openai.chat.completions.create(**request)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        except openai.APIStatusError as err:
            if err.status_code in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {err.status_code}: {err.message}") from None
            raise GraderError(f"grader {self.config.base_url}: HTTP {err.status_code}: {err.message}"
                              + self._key_hint(err.status_code)) from None
        except openai.OpenAIError as err:
            raise GraderError(f"grader {self.config.base_url}: {type(err).__name__}: {err}") from None
        if not response.choices:
            raise GraderError(f"grader {self.config.base_url}: a reply without choices")
        return response.choices[0].message.content, response.model or self.config.model

    def _send_urllib(self, request: Dict[str, Any]) -> Tuple[Optional[str], str]:
        url = self.config.base_url + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        http = urllib.request.Request(url, data=json.dumps(request).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http, timeout=self.config.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:200]
            if err.code in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {err.code}: {detail}") from None
            raise GraderError(f"grader {url}: HTTP {err.code}: {detail}" + self._key_hint(err.code)) from None
        except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            data = json.loads(body)
            return data["choices"][0]["message"]["content"], data.get("model") or self.config.model
        except (ValueError, KeyError, IndexError, TypeError):
            raise GraderError(f"grader {url}: not a chat completion: {body[:200]!r}") from None

    def _key_hint(self, status: int) -> str:
        if status in (401, 403):
            return f" (the key is read from ${self.config.key_env}, which is {'set' if self.key else 'unset'})"
        return ""


def grade_answer(client: ChatClient, question: str, answer: str, prediction: str) -> Dict[str, Any]:
    """One answer's grade by the evaluator's protocol: {"grade", "reply", "model", "attempts"}.
    Five unparsable replies give the grade 0.0, as the evaluator does."""
    reply, model = None, client.config.model
    for attempt, temperature in enumerate(m.MMVET_TEMPERATURES, start=1):
        query = m.mmvet_grader_query(question, answer, prediction, retry=attempt > 1)
        reply, model = client.complete(query, temperature, m.MMVET_MAX_TOKENS)
        grade = m.mmvet_parse_grade(reply)
        if grade is not None:
            return {"grade": grade, "reply": reply, "model": model, "attempts": attempt}
    return {"grade": 0.0, "reply": reply, "model": model, "attempts": len(m.MMVET_TEMPERATURES)}


def grade_entries(entries: List[Dict[str, Any]], client: ChatClient, progress: Callable = lambda items, desc: items,
                  desc: str = "grading") -> None:
    """Grade every MM-Vet entry in place: each gets ``grade`` (0..1), ``grader_reply``,
    ``grader_model`` and ``grader_attempts``, so ``scoring.score_mmvet`` (and anyone with
    eval.json) can recompute the scores. Raises GraderError, naming the question, when the
    endpoint fails; the entries graded until then keep their grades."""
    for entry in progress(entries, desc):
        try:
            result = grade_answer(client, entry["prompt"], entry["answer"], entry["prediction"])
        except GraderError as err:
            raise GraderError(f"MM-Vet question {entry['id']}: {err}") from None
        entry.update(grade=result["grade"], grader_reply=result["reply"], grader_model=result["model"],
                     grader_attempts=result["attempts"])
