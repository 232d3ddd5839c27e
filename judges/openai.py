"""The rubric judge over any OpenAI-compatible endpoint (OpenAI, vLLM's ``vllm serve``, ...).

``OpenAIJudge(base_url="http://host:8000/v1", model="...")`` sends one chat completion request
per completion (``n=k`` replies each, averaged like ``judges.llm``), at most ``concurrency`` at a
time, each with a ``timeout_s`` socket timeout and up to ``retries`` retries with exponential
backoff on timeouts, connection errors, HTTP 429 and 5xx; other HTTP errors (e.g. 400 for a
prompt too long) are not retried. A request that still fails scores ``None`` and is counted
(``pop_failures``: ``timeout``, ``connection``, ``http_<code>``, ``bad_response``; ``retried``
counts retries). ``extra_body`` is merged into each request (e.g. vLLM's
``{"structured_outputs": {"regex": "Score: [0-5]"}}``).

The API key is read from the environment variable named by ``api_key_env`` at each request and
is never stored on the judge, logged or shown in its repr; when the variable is unset no
``Authorization`` header is sent (a local server without a key). Plain ``urllib``: no client
library needed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from judges.base import Judge, JudgeItem, prompt_text
from judges.rubric import DEFAULT_TEMPLATE, check_template, mean_score, render


class _Failed(Exception):
    def __init__(self, kind: str, retry: bool):
        super().__init__(kind)
        self.kind, self.retry = kind, retry


class OpenAIJudge(Judge):
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        template: str | None = None,
        k: int = 1,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 256,
        max_score: int = 5,
        backoff_s: float = 0.5,
        extra_body: dict[str, Any] | None = None,
    ):
        """``base_url``: the API root, e.g. ``http://127.0.0.1:8000/v1``. ``api_key_env``: the name of
        the environment variable holding the key (not the key)."""
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        for name, value, low in (("k", k, 1), ("concurrency", concurrency, 1), ("retries", retries, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if k > 1 and temperature == 0:
            raise ValueError("k > 1 needs temperature > 0 (greedy replies would all be the same)")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.template = template if template is not None else DEFAULT_TEMPLATE
        check_template(self.template)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.k, self.concurrency, self.timeout_s, self.retries = k, concurrency, timeout_s, retries
        self.temperature, self.max_tokens, self.max_score, self.backoff_s = temperature, max_tokens, max_score, backoff_s
        self.extra_body = dict(extra_body or {})
        self._failures: Counter = Counter()
        self._lock = threading.Lock()

    @classmethod
    def check_kwargs(cls, kwargs: dict) -> None:
        cls(**kwargs)

    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def pop_failures(self) -> dict[str, int]:
        with self._lock:
            out, self._failures = dict(self._failures), Counter()
        return out

    def _count(self, kind: str) -> None:
        with self._lock:
            self._failures[kind] += 1

    def score(self, items: list[JudgeItem]) -> list[list[float | None]]:
        prompts = [render(self.template, prompt_text(item.prompt), c.text) for item in items for c in item.completions]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(self._ask, prompts))
        flat = [mean_score(r, self.max_score) for r in replies]
        out, i = [], 0
        for item in items:
            out.append(flat[i: i + len(item.completions)])
            i += len(item.completions)
        return out

    def _ask(self, prompt: str) -> list[str] | None:
        """The ``k`` reply texts for one judge prompt, or None after the retries."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": self.k,
                "temperature": self.temperature, "max_tokens": self.max_tokens, **self.extra_body}
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Failed as e:
                if not e.retry or attempt == self.retries:
                    self._count(e.kind)
                    return None
                self._count("retried")
                time.sleep(self.backoff_s * 2 ** attempt)
        return None

    def _post(self, body: dict) -> list[str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            e.close()
            raise _Failed(f"http_{e.code}", retry=e.code == 429 or e.code >= 500) from None
        except (TimeoutError, socket.timeout):
            raise _Failed("timeout", retry=True) from None
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, (TimeoutError, socket.timeout))
            raise _Failed("timeout" if timed_out else "connection", retry=True) from None
        except (ConnectionError, OSError):
            raise _Failed("connection", retry=True) from None
        except ValueError:  # not JSON
            raise _Failed("bad_response", retry=False) from None
        try:
            return [str(choice["message"]["content"] or "") for choice in payload["choices"]]
        except (KeyError, TypeError, IndexError):
            raise _Failed("bad_response", retry=False) from None
