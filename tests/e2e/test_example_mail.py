"""Example 3, ``examples/mail_pipeline``, run as its README says, as a real process,
sending to a real SMTP server on 127.0.0.1: each welcome e-mail arrives once."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.notifications.receivers import SmtpSink

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "examples" / "mail_pipeline" / "README.md"


def documented_commands() -> list[str]:
    return re.findall(r"^    (uv run .+)$", README.read_text(encoding="utf-8"), re.MULTILINE)


def test_the_readme_has_two_commands() -> None:
    commands = documented_commands()
    assert len(commands) == 2
    assert commands[1] == "uv run pytest tests/e2e/test_example_mail.py"


def test_the_welcome_emails_arrive_once(tmp_path: Path) -> None:
    run = documented_commands()[0].split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    with SmtpSink() as smtp:
        env |= {"CONVEYOR_SMTP_URL": smtp.url, "CONVEYOR_DATA_DIR": str(tmp_path / "data")}
        done = subprocess.run(
            run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        messages = list(smtp.messages)

    assert sorted(m["To"] for m in messages) == [
        "ada@example.com",
        "eve@example.com",
        "grace@example.com",
    ]
    assert len({m["Message-ID"] for m in messages}) == 3
    eve = next(m for m in messages if m["To"] == "eve@example.com")
    assert eve["Subject"] == "Welcome to Acme, <Eve>"
    html = next(p for p in eve.walk() if p.get_content_type() == "text/html")
    assert "Hello &lt;Eve&gt;," in html.get_payload(decode=True).decode()
    assert done.stdout.count("succeeded: ") == 3
