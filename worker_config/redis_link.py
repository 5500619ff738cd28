"""How every process reaches Redis: one URL or a set of Redis Sentinels (``REDIS_URL``).

``REDIS_URL`` is either one server (``redis://``, ``rediss://`` for TLS, ``unix://``) or kombu's
Sentinel form: ``sentinel://[:PASSWORD@]host:26379[/db];sentinel://host2:26379;...``, with
``REDIS_SENTINEL_MASTER`` naming the master the sentinels watch and ``REDIS_SENTINEL_PASSWORD`` the
sentinels' own password where they require one. As in kombu and Celery, the password and database
in the first ``sentinel://`` part are the master's.

- ``transport_options(broker)``: what kombu's Sentinel transport and Celery's Sentinel result
  backend need (``master_name``, ``sentinel_kwargs``), merged into ``app_config`` by
  worker_config/celery_config.py; empty for a single server.
- ``redis_client(broker, ...)``: a redis-py client on the current master, for the code that talks
  to Redis itself (lease keeper, queue-depth metric, ``renderfarm doctor``). With Sentinel each new
  connection asks the sentinels where the master is, so a client survives a failover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import redis

__all__ = [
    "SCHEMES", "BrokerSettings", "check_url", "is_sentinel", "redacted", "redis_client", "sentinel_hosts",
    "ssl_options", "transport_options",
]  # fmt: skip

SCHEMES = ("redis", "rediss", "unix", "sentinel")


class BrokerSettings(Protocol):
    """What this module reads of ``worker_config.settings.BrokerSettings`` (which imports this module)."""

    @property
    def REDIS_URL(self) -> str: ...
    @property
    def REDIS_SENTINEL_MASTER(self) -> str | None: ...
    @property
    def REDIS_SENTINEL_PASSWORD(self) -> str | None: ...


def is_sentinel(url: str) -> bool:
    return url.strip().startswith("sentinel://")


def sentinel_hosts(url: str) -> list[tuple[str, int]]:
    """The (host, port) of each ``sentinel://`` part; ValueError naming what is wrong."""
    hosts = []
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(
                "with Sentinel every ';'-separated part is sentinel://[:PASSWORD@]host:port[/db]; "
                f"got a part {redacted(part)!r}"
            )
        hosts.append((parts.hostname, parts.port or 26379))
    return hosts


def check_url(url: str) -> None:
    """ValueError unless ``url`` is one Redis URL or a list of sentinel URLs."""
    if is_sentinel(url):
        sentinel_hosts(url)
        return
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or ";" in url or (parts.scheme != "unix" and not parts.hostname):
        raise ValueError(
            "use redis://[:PASSWORD@]host:port/db, rediss://... for TLS, unix:///path, or for Redis Sentinel "
            "sentinel://host:26379;sentinel://host2:26379;... with REDIS_SENTINEL_MASTER"
        )


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (each ``;``-separated part)."""
    shown = []
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.password:
            part = part.replace(f":{parts.password}@", ":***@", 1)
        shown.append(part)
    return ";".join(shown)


def ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options a ``rediss://`` URL's query carries, as ``broker_use_ssl`` takes them; None otherwise.

    kombu and Celery read them from the URL; Flower's own Redis client (its queue lengths) does not.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    import ssl

    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    options: dict[str, Any] = {"ssl_cert_reqs": reqs.get(query.get("ssl_cert_reqs", "required").lower(),
                                                         ssl.CERT_REQUIRED)}  # fmt: skip
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options


def transport_options(broker: BrokerSettings) -> dict[str, Any]:
    """kombu's and Celery's Sentinel options for ``broker`` (empty for one server)."""
    if not is_sentinel(broker.REDIS_URL):
        return {}
    options: dict[str, Any] = {"master_name": broker.REDIS_SENTINEL_MASTER}
    if broker.REDIS_SENTINEL_PASSWORD:
        options["sentinel_kwargs"] = {"password": broker.REDIS_SENTINEL_PASSWORD}
    return options


def redis_client(broker: BrokerSettings, *, timeout_s: float, connect_timeout_s: float) -> redis.Redis:
    """A client on Redis (the current master with Sentinel); connections open on first use."""
    import redis

    url = broker.REDIS_URL
    if not is_sentinel(url):
        return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s)
    from redis.sentinel import Sentinel

    first = urlsplit(url.split(";")[0].strip())
    master: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout_s}
    if first.path.strip("/"):
        master["db"] = int(first.path.strip("/"))
    if first.username:
        master["username"] = unquote(first.username)
    if first.password:
        master["password"] = unquote(first.password)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout_s}
    if broker.REDIS_SENTINEL_PASSWORD:
        sentinel_kwargs["password"] = broker.REDIS_SENTINEL_PASSWORD
    sentinels = Sentinel(sentinel_hosts(url), sentinel_kwargs=sentinel_kwargs, **master)
    return sentinels.master_for(str(broker.REDIS_SENTINEL_MASTER))
