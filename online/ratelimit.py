"""Per-client token buckets: ``rate`` tokens per second up to ``burst``; one token per request.

Two stores of bucket state, one interface (``take(client) -> seconds to wait``):

- :class:`TokenBuckets` (``rate_limit.storage: memory://``, the default) keeps the buckets in
  this process. Each gunicorn worker and each replica has its own, so a client may get up to
  ``rate x workers x replicas``: fine for one process, stated at start-up for more.
- :class:`RedisTokenBuckets` (``redis://HOST:PORT/DB``) keeps them in Redis, updated by one
  atomic Lua script on Redis's own clock, so the limit holds across workers and replicas. When
  Redis cannot be reached (50 ms timeout) the request is limited by this process's buckets
  instead (``on_error`` counts it in /metrics), never refused for the outage, never unlimited.

Buckets are keyed by what :func:`client_key` picks: the authenticated API key when keys are on,
else the remote address (or a header a trusted proxy sets, ``rate_limit.client_header``).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from strategy.errors import FieldError, ValidationError

STORAGE_SCHEMES = ("memory", "redis")

# KEYS[1] bucket; ARGV rate, burst. Returns the milliseconds to wait (0: a token was taken).
# Idle buckets expire once they would have refilled, so Redis holds only active clients.
TAKE_LUA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, last = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, last = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return math.ceil(wait * 1000)
"""


class TokenBuckets:
    """Buckets in this process's memory, at most ``max_clients`` of them: past that, the least
    recently seen client's bucket is forgotten (it starts full again), one at a time."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic, max_clients: int = 100_000):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0.0 when the request may proceed, else the seconds until a token is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)   # most recently seen last
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


class RedisTokenBuckets:
    """Buckets shared by every process that points at the same Redis (see the module docstring)."""

    def __init__(self, url: str, rate: float, burst: float, prefix: str = "stratarank:ratelimit:",
                 timeout_s: float = 0.05, on_error=None):
        import redis

        self.rate, self.burst, self.prefix = float(rate), float(burst), prefix
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._take = self.client.register_script(TAKE_LUA)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self.local = TokenBuckets(rate, burst)  # while Redis is unreachable
        self.on_error = on_error                # called once per check that fell back (a metric)

    def take(self, client: str) -> float:
        key = self.prefix + hashlib.sha256(client.encode()).hexdigest()[:32]  # no API key stored in Redis
        try:
            return int(self._take(keys=[key], args=[repr(self.rate), repr(self.burst)])) / 1000.0
        except self._errors:
            if self.on_error is not None:
                self.on_error()
            return self.local.take(client)


def open_limiter(storage: str, rate: float, burst: float, on_error=None):
    """The buckets ``storage`` names (``memory://`` or ``redis://HOST:PORT/DB``)."""
    check_storage_url(storage)
    if storage.startswith("redis://"):
        return RedisTokenBuckets(storage, rate, burst, on_error=on_error)
    return TokenBuckets(rate, burst)


def check_storage_url(url: str, path: str = "rate_limit.storage") -> None:
    """Raise a :class:`ValidationError` naming ``path`` unless ``url`` is memory:// or redis://HOST[:PORT][/DB]."""
    scheme = url.partition("://")[0] if "://" in url else ""
    problem = None
    if scheme not in STORAGE_SCHEMES:
        problem = f"expected memory:// or redis://HOST:PORT/DB, got {url!r}"
    elif scheme == "memory" and url != "memory://":
        problem = f"memory:// takes no path, got {url!r}"
    elif scheme == "redis":
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            problem = f"bad port in {url!r}"
        else:
            if not parts.hostname or not (parts.path.strip("/") or "0").isdigit():
                problem = f"expected redis://HOST:PORT/DB, got {url!r}"
    if problem:
        raise ValidationError([FieldError(path, problem, "choice")])


def client_key(headers, remote_addr: str | None, api_keys_on: bool, client_header: str | None) -> str:
    """Whose bucket a request takes from: ``key:<API key>`` when keys are on (the key was checked
    before), else ``hdr:<value>`` of the trusted ``client_header`` when it is set and present, else
    ``ip:<remote address>``. A client can never pick its own bucket by sending a header."""
    if api_keys_on:
        return "key:" + headers.get("X-API-Key", "")
    if client_header:
        value = headers.get(client_header)
        if value:
            return "hdr:" + value.split(",")[0].strip()[:256]
    return "ip:" + (remote_addr or "-")
