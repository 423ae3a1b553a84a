"""SMS through a provider with Twilio's Messages API shape::

    POST {base}/2010-04-01/Accounts/{account}/Messages.json
    Authorization: Basic account:token      form: To, From, Body

answered with JSON carrying the message's ``sid``. Each request carries an
``Idempotency-Key`` derived from the job, which providers honouring it use to
send a retried request once.
"""

from __future__ import annotations

from urllib.parse import quote

from conveyor.notifications.guard import AllowList, post


def idempotency_key(job_id: str) -> str:
    return f"conveyor-{job_id}"


def send(
    base_url: str,
    *,
    account: str,
    token: str,
    sender: str,
    to: str,
    text: str,
    key: str,
    allow: AllowList,
    timeout: float,
) -> str | None:
    """Send one SMS; returns the provider's id for it (None if its answer has none)."""
    url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account, safe='')}/Messages.json"
    response = post(
        url,
        allow=allow,
        timeout=timeout,
        headers={"Idempotency-Key": key, "Accept": "application/json"},
        form={"To": to, "From": sender, "Body": text},
        auth=(account, token),
    )
    try:
        sid = response.json().get("sid")
    except (ValueError, AttributeError):
        return None  # accepted all the same: it is sent
    return sid if isinstance(sid, str) and sid else None
