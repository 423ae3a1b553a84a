"""The SSRF guard: webhooks and the SMS provider reach only public addresses, plus
the hosts and ranges ``CONVEYOR_NOTIFY_ALLOW_HOSTS`` lets through.

A host name is resolved once, every address it resolves to is checked, and the
connection is then made to a checked address (see ``webhooks.pinned``), so a DNS
answer that changes between the check and the connection (rebinding) cannot
take a request inside.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from conveyor.errors import DeliveryFailed, DeliveryRefused
from conveyor.settings import IPNetwork, parse_allow_list

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud instance metadata services: credentials live there.
METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack...
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    }
)
#: Carrier-grade NAT: not "private" to ``ipaddress``, but not the public Internet either.
SHARED = ipaddress.ip_network("100.64.0.0/10")


def classify(address: IPAddress) -> str | None:
    """Why a request may not go to ``address`` ("metadata", "loopback"...); None if public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return classify(address.ipv4_mapped)
    if address in METADATA:
        return "metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private or address in SHARED:
        return "private"
    if not address.is_global:
        return "reserved"
    return None


@dataclass(frozen=True)
class AllowList:
    """Hosts (by name, as written in a URL) and ranges let through despite their class."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in parse_allow_list(entries):
            if isinstance(entry, str):
                hosts.add(entry)
            else:
                networks.append(entry)
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if host.lower().strip("[]") in self.hosts:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def literal(host: str) -> IPAddress | None:
    """The address a URL's host is written as, or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_address(host: str, address: IPAddress, allow: AllowList) -> None:
    """Refuse (DeliveryRefused, nothing sent) an address the guard does not let through."""
    reason = classify(address)
    if reason is not None and not allow.allows(host, address):
        raise DeliveryRefused(
            f"{host} resolves to {address}, a {reason} address; add it to"
            " CONVEYOR_NOTIFY_ALLOW_HOSTS to allow it"
        )


def resolve(host: str, port: int, allow: AllowList) -> IPAddress:
    """The address to connect to for ``host``: every address it resolves to must pass
    the guard (one bad answer refuses it), and the first is used."""
    found = literal(host)
    if found is not None:
        check_address(host, found, allow)
        return found
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryFailed(f"cannot resolve {host}: {exc.strerror}") from None
    addresses: Sequence[IPAddress] = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise DeliveryFailed(f"{host} resolves to no address")
    for address in addresses:
        check_address(host, address, allow)
    return addresses[0]


def post(
    url: str,
    *,
    allow: AllowList,
    timeout: float,
    headers: Mapping[str, str],
    content: bytes | None = None,
    form: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> httpx.Response:
    """POST to ``url`` through the guard, connecting to the address it checked.

    Redirects are not followed (a 3xx is a refusal): a public receiver could
    otherwise send the request on to a guarded address. Proxies from the
    environment are ignored for the same reason. 408, 429 and 5xx, timeouts and
    unreachable receivers raise DeliveryFailed (retried); other 4xx DeliveryRefused.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise DeliveryRefused(f"not a URL: {exc}") from None
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise DeliveryRefused(f"{url!r} is not an http:// or https:// URL")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    address = resolve(parsed.host, port, allow)
    extensions = {}
    if parsed.scheme == "https" and literal(parsed.host) is None:
        extensions["sni_hostname"] = parsed.host  # TLS checks the name, not the address
    request_headers = {**headers, "Host": parsed.netloc.decode("ascii")}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST",
                parsed.copy_with(host=str(address)),
                headers=request_headers,
                content=content,
                data=form,
                extensions=extensions,
            )
            response = client.send(request, auth=httpx.BasicAuth(*auth) if auth else None)
    except httpx.TimeoutException as exc:
        raise DeliveryFailed(f"{parsed.host}: timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"{parsed.host}: {type(exc).__name__}: {exc}") from None
    status = response.status_code
    if status < 300:
        return response
    what = f"{parsed.host} answered {status}"
    if 300 <= status < 400:
        raise DeliveryRefused(f"{what}, a redirect; redirects are not followed")
    if status in RETRIED or status >= 500:
        raise DeliveryFailed(what, delay=_retry_after(response))
    raise DeliveryRefused(what)


#: 4xx answers that mean "later", not "never".
RETRIED = frozenset({408, 425, 429})
#: The most a receiver's Retry-After may push the next attempt back, in seconds.
MAX_RETRY_AFTER = 3600.0


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None
