"""Idempotent submission, after the IETF httpapi ``Idempotency-Key`` draft.

A submit made with a key records the key with the job, in one transaction
(see :meth:`conveyor.store.Store.create_job_once`). Made again with the same
key, it returns that job instead of making another, provided the request is
the same one: requests are compared by :func:`fingerprint`. Keys belong to a
caller (``scope``: the API key's id over HTTP, :data:`PYTHON_SCOPE` in Python),
so two callers cannot collide.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from conveyor.errors import ConfigurationError

#: The scope of keys given to ``Conveyor.submit`` in Python.
PYTHON_SCOPE = "python"
MAX_SCOPE_LENGTH = 100
MAX_KEY_LENGTH = 255
#: A submit that recorded its key but never said it finished is presumed dead after
#: this many seconds; its job was stored with the key, so it is returned from then on.
IN_FLIGHT_SECONDS = 60.0

_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")
#: RFC 8941 sf-string: printable ASCII in double quotes, with \" and \\ escaped.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r'\\(["\\])')


def check_key(key: str) -> str:
    """The key, if it is 1 to 255 printable ASCII characters; ConfigurationError otherwise."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ConfigurationError(
            f"an idempotency key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return key


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not 1 <= len(scope) <= MAX_SCOPE_LENGTH:
        raise ConfigurationError(f"an idempotency scope must be 1 to {MAX_SCOPE_LENGTH} characters")
    return scope


def parse_header(value: str) -> str:
    """The key in an ``Idempotency-Key`` header; ConfigurationError if it is not a valid one.

    The draft makes the header a structured-field string (``"abc"``); a bare
    value, as most clients send, is taken as it is.
    """
    if value.startswith('"'):
        string = _SF_STRING.fullmatch(value)
        if string is None:
            raise ConfigurationError("the Idempotency-Key header is not a valid quoted string")
        value = _SF_ESCAPE.sub(r"\1", string[1])
    return check_key(value)


def fingerprint(request: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the request's canonical JSON: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(
        request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
