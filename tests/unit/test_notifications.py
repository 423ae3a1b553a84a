"""Notifications without servers: the SSRF guard's address classes, the SMTP URL,
webhook signatures, templates, and the settings that switch them on."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from conveyor.errors import ConfigurationError, DeliveryRefused
from conveyor.notifications import guard, templates, webhooks
from conveyor.settings import decode_webhook_secret, load_settings, parse_smtp_url


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_addresses_are_classified(address: str, reason: str | None) -> None:
    """Classification alone: nothing is sent to any of these addresses."""
    assert guard.classify(ipaddress.ip_address(address)) == reason


def test_the_allow_list_lets_named_hosts_and_ranges_through_and_nothing_else() -> None:
    allow = guard.AllowList.parse(["127.0.0.1", "10.0.0.0/8", "Hooks.Internal"])
    loopback = ipaddress.ip_address("127.0.0.1")
    guard.check_address("127.0.0.1", loopback, allow)
    guard.check_address("x", ipaddress.ip_address("10.9.8.7"), allow)
    guard.check_address("hooks.internal", ipaddress.ip_address("192.168.0.9"), allow)
    for host, address in [
        ("127.0.0.2", "127.0.0.2"),
        ("::1", "::1"),
        ("x", "169.254.169.254"),
        ("x", "192.168.0.9"),
    ]:
        with pytest.raises(DeliveryRefused, match="CONVEYOR_NOTIFY_ALLOW_HOSTS"):
            guard.check_address(host, ipaddress.ip_address(address), allow)


def test_a_literal_address_is_checked_without_resolving() -> None:
    with pytest.raises(DeliveryRefused, match="metadata"):
        guard.resolve("169.254.169.254", 80, guard.AllowList())
    with pytest.raises(DeliveryRefused, match="metadata"):
        guard.resolve("[fd00:ec2::254]", 80, guard.AllowList())


def test_a_guarded_url_is_refused_before_any_connection() -> None:
    """post() raises before opening a socket (the address has no listener to see it)."""
    with pytest.raises(DeliveryRefused, match="link-local"):
        guard.post("http://169.254.1.1/hook", allow=guard.AllowList(), timeout=0.1, headers={})
    with pytest.raises(DeliveryRefused, match="not an http"):
        guard.post("file:///etc/passwd", allow=guard.AllowList(), timeout=0.1, headers={})


def test_smtp_urls_say_how_to_connect() -> None:
    target = parse_smtp_url("smtp://us%40er:p%3Ass@mail.example:587?starttls=true")
    assert (target.host, target.port, target.starttls, target.ssl) == (
        "mail.example",
        587,
        True,
        False,
    )
    assert (target.username, target.password) == ("us@er", "p:ss")
    tls = parse_smtp_url("smtps://mail.example")
    assert (tls.port, tls.ssl, tls.username) == (465, True, None)
    assert parse_smtp_url("smtp://relay").port == 25


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mail.example", "unsupported scheme"),
        ("smtp://", "no host"),
        ("smtp://mail.example?starttls=maybe", "starttls must be"),
        ("smtps://mail.example?starttls=true", "TLS already"),
        ("smtp://mail.example?tls=1", "unknown SMTP URL options"),
        ("smtp://mail.example:99999", "not an SMTP URL"),
    ],
)
def test_a_bad_smtp_url_stops_start_up_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"CONVEYOR_SMTP_URL: .*{message}") as caught:
        load_settings(smtp_url=url)
    assert "p:ss" not in str(caught.value)


def test_settings_for_notifications_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="CONVEYOR_WEBHOOK_SECRET: write it as whsec_"):
        load_settings(webhook_secret="plain")
    with pytest.raises(ConfigurationError, match="CONVEYOR_NOTIFY_ALLOW_HOSTS: 'a b'"):
        load_settings(notify_allow_hosts="127.0.0.1,a b")
    with pytest.raises(ConfigurationError, match="CONVEYOR_NOTIFY_SMS_RATE_LIMIT"):
        load_settings(notify_sms_rate_limit="fast")
    settings = load_settings(
        notifications=True, notify_allow_hosts="127.0.0.1, fd00::/8 ,hooks.internal"
    )
    assert settings.notify_allow_hosts == ("127.0.0.1/32", "fd00::/8", "hooks.internal")


def test_signatures_match_the_standard_webhooks_example() -> None:
    """The example of the Standard Webhooks specification, signed as it says."""
    key = decode_webhook_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signature = webhooks.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_html_is_autoescaped_and_subjects_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "welcome.html").write_text("<p>Hello {{ data.name }}</p>")
    (tmp_path / "welcome.txt").write_text("Hello {{ data.name }}")
    (tmp_path / "welcome.subject").write_text("Welcome\n{{ data.name }}")
    rendered = templates.render(
        "welcome", {"name": "<script>x</script>"}, subject=None, directory=tmp_path
    )
    assert rendered.html == "<p>Hello &lt;script&gt;x&lt;/script&gt;</p>"
    assert rendered.text == "Hello <script>x</script>"
    assert rendered.subject == "Welcome <script>x</script>"
    built_in = templates.render("message", {"message": "hi"}, subject="S\r\nBcc: x", directory=None)
    assert built_in.subject == "S Bcc: x"
    assert built_in.text == "hi"
    with pytest.raises(DeliveryRefused, match="no template 'nope'"):
        templates.render("nope", {}, subject=None, directory=tmp_path)
    with pytest.raises(DeliveryRefused, match=r"has no attribute 'name'"):
        templates.render("welcome", {}, subject=None, directory=tmp_path)
