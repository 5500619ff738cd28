"""Webhooks: which URLs a request may name, how a delivery is signed, and how a receiver checks it.

Policy (``check_url``): ``http``/``https`` only, no credentials in the URL, and the host must be
on ``WEBHOOK_ALLOWED_HOSTS`` (a host name, ``*.domain`` for its subdomains, an IP address or a
CIDR network), on port 80 or 443 unless the entry names another (``host:8443``, ``host:*``).
Every address the host resolves to must be public (not loopback, private, link-local, shared,
reserved, nor an IPv6 address carrying an IPv4 one: NAT64, 6to4, Teredo, IPv4-mapped) unless
that address is itself allow-listed by IP or network: naming ``localhost`` alone does not open the
loopback interface. When the request is validated (an ``InvalidRequest``, no model time) the URL
is checked without resolving its host (no DNS lookup on the render path, and a name that does not
resolve yet is not a bad request); each delivery checks it again, resolving, retries a name that
does not resolve like a connection error, and connects to exactly the addresses it checked (no
second DNS lookup to rebind). ``redact`` is how a URL appears in logs and errors: no query, no
credentials.

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

from celery import Task

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "WebhookPolicy",
    "Target",
    "UnresolvedHost",
    "check_url",
    "redact",
    "RedactingTask",
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


STANDARD_PORTS = (80, 443)


@dataclass(frozen=True)
class _Entry:
    """One allow-list entry: an exact name, a ``*.domain`` suffix or an IP network; ``port`` when it names one."""

    name: str | None = None
    suffix: str | None = None
    network: IPNetwork | None = None
    port: int | None = None  # None: ports 80 and 443 only; -1 ("host:*"): any port

    def matches(self, host: str, address: IPAddress | None) -> bool:
        if address is not None:
            return self.network is not None and address in self.network
        if self.name is not None:
            return host == self.name
        return self.suffix is not None and host.endswith(self.suffix)

    def opens(self, port: int) -> bool:
        return port in STANDARD_PORTS or self.port in (-1, port)

    def __str__(self) -> str:
        if self.network is not None:
            single = self.network.num_addresses == 1
            host = str(self.network.network_address if single else self.network)
        else:
            host = self.name or f"*{self.suffix}"
        if self.port is None:
            return host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{'*' if self.port == -1 else self.port}"


@dataclass(frozen=True)
class WebhookPolicy:
    """The deployment's webhook settings: the allow-list, parsed, and whether a secret is set.

    Entries (``WEBHOOK_ALLOWED_HOSTS``, comma-separated): ``hooks.example.com``, ``*.example.com``
    (its subdomains), ``203.0.113.7``, ``203.0.113.0/24``, ``[2001:db8::1]``. Such an entry opens
    ports 80 and 443; ``host:8443`` opens that port too, ``host:*`` every port.
    """

    entries: tuple[_Entry, ...] = ()
    enabled: bool = False

    @classmethod
    def parse(cls, allowed_hosts: str, secret: str | None) -> WebhookPolicy:
        return cls(tuple(_parse_entry(raw) for raw in allowed_hosts.split(",") if raw.strip()), bool(secret))

    def host_allowed(self, host: str, port: int | None = None) -> bool:
        """``host`` is listed, and ``port`` (when given) is open for it."""
        address = _ip(host)
        return any(e.matches(host, address) and (port is None or e.opens(port)) for e in self.entries)

    def address_listed(self, address: IPAddress) -> bool:
        return any(e.network is not None and address in e.network for e in self.entries)

    def describe(self) -> str:
        return ", ".join(str(e) for e in self.entries) or "(empty)"


def _parse_entry(raw: str) -> _Entry:
    entry = raw.strip().lower()
    port: int | None = None
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":"):
            port = -1 if rest[1:] == "*" else int(rest[1:]) if rest[1:].isdigit() else None
        entry = host
    elif entry.count(":") == 1:  # name:port, a.b.c.d:port, cidr:port (a bare IPv6 has several colons)
        host, _, tail = entry.partition(":")
        if tail == "*" or tail.isdigit():
            entry, port = host, (-1 if tail == "*" else int(tail))
    entry = entry.rstrip(".")
    if entry.startswith("*."):
        return _Entry(suffix=entry[1:], port=port)
    try:
        return _Entry(network=ipaddress.ip_network(entry, strict=False), port=port)
    except ValueError:
        return _Entry(name=entry, port=port)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# IPv6 ranges that carry an IPv4 address inside (NAT64, 6to4, Teredo, IPv4-mapped and -compatible):
# a public-looking IPv6 address that reaches an internal IPv4 one.
_IPV4_IN_IPV6 = tuple(
    ipaddress.ip_network(n)
    for n in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::ffff:0:0/96", "::/96")
)


def _internal(address: IPAddress) -> str | None:
    """Why a delivery must not connect to ``address`` unless it is listed by IP or network; None if it may."""
    if not address.is_global:
        return "an internal address (loopback, private, link-local, shared or reserved)"
    if isinstance(address, ipaddress.IPv6Address) and any(address in n for n in _IPV4_IN_IPV6):
        inside = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        inside = inside or ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # NAT64, IPv4-compatible: the low 32 bits
        return f"an IPv6 address with an IPv4 address inside ({inside}: NAT64, 6to4, Teredo or IPv4-mapped)"
    return None


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the addresses a delivery may connect to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]  # checked addresses to connect to; empty when checked without resolving


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
    if not policy.host_allowed(host, port):
        raise ValueError(
            f"port {port} of host {host!r} is not allowed: only {' and '.join(map(str, STANDARD_PORTS))}, unless "
            f"WEBHOOK_ALLOWED_HOSTS names it ({host}:{port}); this deployment allows: {policy.describe()}"
        )
    literal = _ip(host)
    addresses = _addresses(host, port) if resolve else ((host,) if literal is not None else ())
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if (why := _internal(address)) is not None and not policy.address_listed(address):
            said = f"is {address}" if literal is not None else f"resolves to {address}"
            raise ValueError(
                f"host {host!r} {said}, {why}; allow it explicitly by IP or network in WEBHOOK_ALLOWED_HOSTS"
            )
    return Target(url, parts.scheme, host, port, addresses)


def redact(url: str) -> str:
    """``url`` for logs and errors: scheme, host, port and path; the query (tokens) and credentials are dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "(an invalid URL)"
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?..." if parts.query else "")


class RedactingTask(Task):
    """A task whose arguments show shortened where Celery shows them (the ``kwargsrepr`` of its
    messages, which events, Flower and worker logs print): a ``url`` / ``webhook_url`` redacted, an
    inline ``image`` (a data URL of up to MAX_IMAGE_BYTES) as its media type and length, the whole
    at most Celery's own ``kwargsrepr_maxsize`` (1024 characters), as Celery shows other tasks'."""

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        if isinstance(kwargs, dict) and options.get("kwargsrepr") is None:
            from celery.utils.saferepr import saferepr

            shown = {k: _shown(k, v) for k, v in kwargs.items()}
            options["kwargsrepr"] = saferepr(shown, self.app.amqp.kwargsrepr_maxsize)
        return super().apply_async(args, kwargs, *rest, **options)


def _shown(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if name in ("url", "webhook_url"):
        return redact(value)
    if name == "image" and value.startswith("data:"):
        return f"{value.split(',', 1)[0]},... ({len(value):,} characters)"
    return value


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
