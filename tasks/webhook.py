"""Webhooks: which URLs a request may name, how a delivery is signed, and how a receiver checks it.

Policy (``check_url``): ``http``/``https`` only, no credentials in the URL, and the host must be
on ``WEBHOOK_ALLOWED_HOSTS`` (a host name, ``*.domain`` for its subdomains, an IP address or a
CIDR network). Every address the host resolves to must be public (not loopback, private,
link-local, multicast, reserved...) unless that address is itself allow-listed by IP or network:
naming ``localhost`` alone does not open the loopback interface. The check runs when the request
is validated (an ``InvalidRequest``, no model time) and again before each delivery, which then
connects to exactly the addresses it checked (no second DNS lookup to rebind).

Signing (``sign`` / ``verify``): the body is JSON carrying a ``timestamp``; the signature is
HMAC-SHA256 of the raw body with ``WEBHOOK_SECRET``, sent as ``X-Renderfarm-Signature:
sha256=<hex>`` beside ``X-Renderfarm-Timestamp``. A receiver verifies the signature over the
exact bytes received, then refuses a timestamp older than a few minutes (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "WebhookPolicy",
    "Target",
    "UnresolvedHost",
    "check_url",
    "body_for",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Renderfarm-Signature"
TIMESTAMP_HEADER = "X-Renderfarm-Timestamp"
DELIVERY_HEADER = "X-Renderfarm-Delivery"
EVENT_HEADER = "X-Renderfarm-Event"
MAX_URL_CHARS = 2048

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnresolvedHost(ValueError):
    """The host name did not resolve (perhaps for now: a delivery retries)."""


@dataclass(frozen=True)
class WebhookPolicy:
    """The deployment's webhook settings: the allow-list, parsed, and whether a secret is set."""

    names: tuple[str, ...] = ()  # exact host names, lower case
    suffixes: tuple[str, ...] = ()  # from "*.example.com": ".example.com"
    networks: tuple[IPNetwork, ...] = ()  # from IP addresses and CIDR networks
    enabled: bool = False

    @classmethod
    def parse(cls, allowed_hosts: str, secret: str | None) -> WebhookPolicy:
        names, suffixes, networks = [], [], []
        for raw in allowed_hosts.split(","):
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if entry.startswith("*."):
                suffixes.append(entry[1:])
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.append(entry)
        return cls(tuple(names), tuple(suffixes), tuple(networks), bool(secret))

    def host_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)
        return self.address_listed(address)

    def address_listed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def describe(self) -> str:
        entries = [*self.names, *(f"*{s}" for s in self.suffixes), *(str(n) for n in self.networks)]
        return ", ".join(entries) or "(empty)"


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the addresses a delivery may connect to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def check_url(url: str, policy: WebhookPolicy, resolve: bool = True) -> Target:
    """The checked target of ``url``; ``ValueError`` saying what is wrong and what to do otherwise."""
    if not policy.enabled:
        raise ValueError("webhooks are not enabled on this deployment (WEBHOOK_SECRET is not set)")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"{len(url)} characters; at most {MAX_URL_CHARS} are allowed")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("use an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed; authenticate with the signature header")
    if parts.fragment:
        raise ValueError("a fragment (#...) is not allowed")
    host = parts.hostname.lower().rstrip(".")
    if not policy.host_allowed(host):
        raise ValueError(
            f"host {host!r} is not allowed; this deployment allows: {policy.describe()} (WEBHOOK_ALLOWED_HOSTS)"
        )
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(host, port) if resolve else ()
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address.is_global and not policy.address_listed(address):
            raise ValueError(
                f"host {host!r} resolves to {address}, an internal address (loopback, private, link-local or "
                "reserved); allow it explicitly by IP or network in WEBHOOK_ALLOWED_HOSTS"
            )
    return Target(url, parts.scheme, host, port, addresses)


def _addresses(host: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnresolvedHost(f"host {host!r} does not resolve: {exc}") from None
    found: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in found:
            found.append(address)
    if not found:
        raise UnresolvedHost(f"host {host!r} does not resolve")
    return tuple(found)


def body_for(payload: dict[str, Any], timestamp: int | None = None) -> bytes:
    """The raw JSON body of one delivery attempt: the payload plus its ``timestamp``."""
    stamped = {**payload, "timestamp": int(time.time()) if timestamp is None else timestamp}
    return json.dumps(stamped, sort_keys=True, separators=(",", ":")).encode()


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, timestamp: str, secret: str, tolerance_s: float = 300.0) -> dict[str, Any]:
    """What a receiver does: check the signature over the raw body, then its age; return the payload."""
    if not hmac.compare_digest(sign(body, secret), signature):
        raise ValueError("bad signature")
    payload: dict[str, Any] = json.loads(body)
    if str(payload.get("timestamp")) != timestamp:
        raise ValueError("timestamp header does not match the signed body")
    if abs(time.time() - int(timestamp)) > tolerance_s:
        raise ValueError("stale delivery (possible replay)")
    return payload
