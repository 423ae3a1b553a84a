"""Webhooks in the style of Standard Webhooks (standardwebhooks.com): a JSON POST
with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers.

The signature is ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`` keyed with
the decoded ``whsec_`` secret. The id is derived from the job, so every attempt of
one notification carries the same id: receivers deduplicate by it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from conveyor.notifications.guard import AllowList, post


def message_id(job_id: str) -> str:
    return f"msg_{job_id}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def body_of(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def deliver(
    url: str,
    data: Mapping[str, Any],
    *,
    msg_id: str,
    key: bytes | None,
    allow: AllowList,
    timeout: float,
) -> httpx.Response:
    """POST ``data`` to ``url``, signed when there is a key (see :func:`guard.post`)."""
    body = body_of(data)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if key is not None:
        headers["webhook-signature"] = sign(key, msg_id, timestamp, body)
    return post(url, allow=allow, timeout=timeout, headers=headers, content=body)
