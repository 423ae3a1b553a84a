"""One call to an OpenAI-compatible ``POST {base}/chat/completions``, in two halves.

:func:`send` is what runs inside the ``llm`` circuit breaker: it raises
ModelUnavailable when the provider is down (unreachable, timeout, 5xx, 408), which
the breaker counts. :func:`read` runs outside it: a 429 is the provider answering
(it is up, only busy), so it retries after ``Retry-After`` without counting against
the breaker, nor, when the header is there (ModelBusy), against the job's attempts;
another 4xx is ModelRefused, for good.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from conveyor.errors import ModelBusy, ModelRefused, ModelUnavailable

#: Longest Retry-After honoured, seconds; a provider asking for more is asked again then.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class Answer:
    """What the provider answered: the text, the model that wrote it, and token usage."""

    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def as_result(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
        }


def send(
    base_url: str, api_key: str | None, model: str, prompt: str, *, timeout: float
) -> httpx.Response:
    """POST the chat completion; ModelUnavailable if the provider is down."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise ModelUnavailable(f"the LLM endpoint timed out after {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise ModelUnavailable(f"the LLM endpoint is unreachable: {exc}") from exc
    if response.status_code >= 500 or response.status_code == 408:
        raise ModelUnavailable(f"the LLM endpoint answered HTTP {response.status_code}")
    return response


def read(response: httpx.Response) -> Answer:
    """The answer in a response :func:`send` returned; on 429 ModelBusy with the delay
    ``Retry-After`` asks for (ModelUnavailable, retried on the job's backoff, without
    one); ModelRefused on any other 4xx or a body that is not a chat completion."""
    status = response.status_code
    if status == 429:
        delay = retry_after(response.headers.get("retry-after"))
        if delay is None:  # no word on when: an ordinary retry, so it cannot go on forever
            raise ModelUnavailable("the LLM endpoint is rate limiting (HTTP 429)")
        raise ModelBusy(
            f"the LLM endpoint is rate limiting (HTTP 429); retrying after {delay:g} s",
            delay=delay,
        )
    if status >= 400:
        raise ModelRefused(f"the LLM endpoint refused the request: HTTP {status} {_said(response)}")
    try:
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"]
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelRefused(f"the LLM endpoint's answer is not a chat completion: {exc!r}") from None
    if not isinstance(text, str):
        raise ModelRefused("the LLM endpoint's answer has no text content")
    return Answer(
        text=text,
        model=str(body.get("model") or ""),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=max(0, prompt_tokens),
        completion_tokens=max(0, completion_tokens),
    )


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), capped
    at :data:`MAX_RETRY_AFTER`; None when absent or unreadable (the backoff decides)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _said(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message)[:500] if message else ""
    except (ValueError, AttributeError):
        return response.text[:200]
