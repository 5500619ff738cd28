"""How every process reaches Redis: one URL or a set of Redis Sentinels (``REDIS_URL``).

``REDIS_URL`` is either one server (``redis://``, ``rediss://`` for TLS, ``unix://``) or kombu's
Sentinel form: ``sentinel://[:PASSWORD@]host:26379[/db];sentinel://host2:26379;...``, with
``REDIS_SENTINEL_MASTER`` naming the master the sentinels watch and ``REDIS_SENTINEL_PASSWORD`` the
sentinels' own password where they require one. As in kombu and Celery, the password and database
in the first ``sentinel://`` part are the master's.

- ``transport_options(broker)``: what kombu's Sentinel transport and Celery's Sentinel result
  backend need (``master_name``, ``sentinel_kwargs``), merged into ``app_config`` by
  worker_config/celery_config.py; empty for a single server.
- ``backend_url(url)``: the ``result_backend`` setting: Celery's Redis backend class that does not
  retry a refused password as an outage (``worker_config.redis_backend``), with the URL.
- ``redis_client(broker, ...)``: a redis-py client on the current master, for the code that talks
  to Redis itself (lease keeper, queue-depth metric, ``renderfarm doctor``). With Sentinel each new
  connection asks the sentinels where the master is, so a client survives a failover.

When Redis cannot be used, two causes are a wrong ``REDIS_URL``, not an outage, and are named as
such (``diagnose``, ``explain``): Redis refused the password (missing, wrong, or given to a Redis
that has none: ``auth_error`` finds redis-py's ``AuthenticationError`` behind whatever wrapped it;
``RedisAuthError`` is what the farm raises for it, never retried), and a plain ``redis://`` to a
server that speaks TLS (it resets the connection or answers with TLS bytes; ``speaks_tls``
confirms it with a handshake and the fix shows the ``rediss://`` form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import redis

__all__ = [
    "SCHEMES", "BrokerSettings", "Fault", "RedisAuthError", "auth_error", "auth_message", "backend_url", "check_url",
    "diagnose", "explain", "first_contact", "is_sentinel", "redacted", "redis_client", "rediss_form", "sentinel_hosts",
    "speaks_tls", "ssl_options", "transport_options",
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


def backend_url(url: str) -> str:
    """The ``result_backend`` setting for REDIS_URL ``url``: Celery's form ``module:Class+URL`` naming
    ``worker_config.redis_backend``'s class for it (Celery's own, failing fast on a refused password)."""
    return f"worker_config.redis_backend:{'SentinelBackend' if is_sentinel(url) else 'RedisBackend'}+{url}"


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


# --- what a failure to use Redis says about REDIS_URL ---------------------------------------------


class RedisAuthError(RuntimeError):
    """Redis refused REDIS_URL's credentials (a password missing, wrong, or not expected).

    Not a connection error on purpose: nothing that retries an outage (kombu, Celery's result
    backend, ``worker_config.redis_backend``) retries it; the message names the password and the fix.
    """


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during (Celery and kombu wrap redis-py's errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# A Redis error reply that means the credentials were refused, as redis-py leaves it when it does not
# map it to AuthenticationError itself (older servers, other clients' wrapping).
_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password pair",
                 "HELLO must be called with the client already authenticated",
                 "called without any password configured", "no password is set")  # fmt: skip


def auth_error(exc: BaseException) -> BaseException | None:
    """The authentication failure behind ``exc``, if there is one (redis-py's ``AuthenticationError``,
    an error reply saying NOAUTH/WRONGPASS, or the farm's ``RedisAuthError``)."""
    import redis

    for cause in _chain(exc):
        if isinstance(cause, redis.AuthenticationError | RedisAuthError):
            return cause
        if isinstance(cause, redis.RedisError) and any(reply in str(cause) for reply in _AUTH_REPLIES):
            return cause
    return None


def _has_password(url: str) -> bool:
    first = url.split(";")[0].strip()
    try:
        return bool(urlsplit(first).password)
    except ValueError:
        return False


def _refusal(url: str, exc: BaseException) -> tuple[str, str]:
    """(what Redis refused, the fix) for an authentication failure at ``url``."""
    said = str(exc).strip().rstrip(".")
    if is_sentinel(url) and "No master found" in said:  # the sentinels refused theirs, not the master's
        return ("the Redis Sentinels named in REDIS_URL refused their password: REDIS_SENTINEL_PASSWORD is missing "
                "or wrong", "set REDIS_SENTINEL_PASSWORD to the sentinels' requirepass (sentinel.conf)")  # fmt: skip
    where = f"Redis at REDIS_URL ({redacted(url)})"
    if "without any password configured" in said or "no password is set" in said:
        return (f"{where} has no password set but REDIS_URL gives one ({said})",
                "remove the password from REDIS_URL, or set one on the server (requirepass)")  # fmt: skip
    fix = "put the password in REDIS_URL: redis://:PASSWORD@host:6379/0 (rediss://... with TLS)"
    if _has_password(url):
        return f"{where} refused the password in REDIS_URL: the password (or user) is wrong", fix
    return f"{where} requires a password and REDIS_URL has none", fix


def auth_message(url: str, exc: BaseException) -> str:
    """One line: Redis refused REDIS_URL's credentials, which way (missing, wrong, unexpected), and the fix."""
    what, fix = _refusal(url, exc)
    return f"{what}; {fix}"


def rediss_form(url: str) -> str:
    """``url`` as the ``rediss://`` URL it should probably be (password shown as PASSWORD)."""
    parts = urlsplit(url)
    auth = ""
    if parts.username or parts.password:
        auth = f"{parts.username or ''}{':PASSWORD' if parts.password else ''}@"
    host = parts.hostname or "host"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"rediss://{auth}{host}{port}{parts.path or '/0'}?ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.crt"


def speaks_tls(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether the server at ``host:port`` answers a TLS handshake (certificates are not checked:
    this only asks which protocol it speaks). A TLS alert in answer counts: that is TLS too."""
    import socket
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except ssl.SSLError as exc:
        return "alert" in str(exc).lower()  # e.g. a server that wants a client certificate
    except OSError:
        return False


def _tls_refusal(exc: BaseException) -> bool:
    """Whether a plain connection was reset, or answered with bytes that open a TLS record."""
    import redis

    for cause in _chain(exc):
        if isinstance(cause, ConnectionResetError) or "Connection reset by peer" in str(cause):
            return True
        if isinstance(cause, redis.exceptions.InvalidResponse | redis.exceptions.ResponseError):
            # redis-py shows what it could not parse as a bytes repr: a TLS alert or handshake record.
            if any(record in str(cause) for record in ("\\x15\\x03", "\\x16\\x03")):
                return True
    return False


class Fault(NamedTuple):
    """What is wrong with REDIS_URL, the fix, and whether it is certain (a retry cannot help)."""

    what: str
    fix: str
    certain: bool


def diagnose(url: str, exc: BaseException, probe_s: float = 3.0) -> Fault | None:
    """What a failure to use Redis at ``url`` says about ``url`` itself, or None when it looks like an
    outage (refused, timed out: waited out elsewhere, never a setting to change).

    Refused credentials are certain. So is a plain ``redis://`` connection reset (or answered in
    TLS) by a server that completes a TLS handshake (asked once, within ``probe_s``); a reset from
    one that does not is named as the probable cause, with the same fix.
    """
    if (refused := auth_error(exc)) is not None:
        return Fault(*_refusal(url, refused), certain=True)
    parts = urlsplit(url.split(";")[0].strip())
    if parts.scheme == "redis" and parts.hostname and _tls_refusal(exc):
        fix = f"use rediss:// with the CA that signed the server's certificate: {rediss_form(url)}"
        if speaks_tls(parts.hostname, parts.port or 6379, probe_s):
            what = (f"Redis at REDIS_URL ({redacted(url)}) speaks TLS (it answered a TLS handshake) and REDIS_URL "
                    "is a plain redis:// URL: the server resets plain connections")  # fmt: skip
            return Fault(what, fix, certain=True)
        return Fault(f"Redis at REDIS_URL ({redacted(url)}) reset a plain redis:// connection: the server probably "
                     f"speaks TLS ({type(exc).__name__}: {exc})", fix, False)  # fmt: skip
    return None


def explain(url: str, exc: BaseException) -> str:
    """One line for a failure to use Redis: the diagnosis where it names REDIS_URL's fault, else the error."""
    if (fault := diagnose(url, exc)) is not None:
        return f"{fault.what}; {fault.fix}"
    return f"{type(exc).__name__}: {exc}"


def first_contact(broker: BrokerSettings, timeout_s: float = 3.0) -> Fault | None:
    """Ask Redis once (PING): the fault in REDIS_URL if it answers with one, None if it answers or
    looks merely away (an outage, which a worker waits out as Celery retries)."""
    client = redis_client(broker, timeout_s=timeout_s, connect_timeout_s=timeout_s)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - diagnosed, not raised
        return diagnose(broker.REDIS_URL, exc, timeout_s)
    finally:
        client.close()
    return None
