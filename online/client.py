"""A small typed Python client of the scorer's HTTP API (``/v1/rank``, ``/v1/feed``, ``/v1/retrieve``,
``/v1/events``, ``/v1/items``, ``/readyz``).

One :class:`Client` holds one keep-alive connection, so it is not shared between threads: give each
thread its own (they are cheap). Calls time out after ``timeout_s``; a dropped connection, a 429 or a
502/503/504 is retried up to ``retries`` times, after the server's ``Retry-After`` (capped at
``max_wait_s``) or an exponential backoff. Retrying a ``/v1/rank`` or ``/v1/events`` call is safe:
the joiner drops an impression logged twice under one ``request_id`` and an event posted twice under
one ``event_id`` (both counted); an item write applied twice leaves the item as once.

    from online.client import Client

    with Client("http://127.0.0.1:8000", api_key="k1") as scorer:
        slate = scorer.rank("u1", [{"item_id": "i1", "source": "human"}, ...], slate_size=10)
        scorer.events([{"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1", "ts": ...}])
        scorer.items([{"item_id": "i9", "source": "llm", "text": "...", "generator": {"model": "m", "prior_score": 0.7}}])
        scorer.item("i9")   # the stored item, or None
        feed = scorer.feed("u1", slate_size=10)          # retrieved from the corpus, then ranked
        memory = scorer.retrieve(text="crispy garlic noodles", k=20)["items"]

A 4xx or a 5xx that is not retried (or still fails) raises :class:`ApiError` with the body's
``{"error": {"code", "message", "path"}}``; :meth:`Client.call` returns ``(status, body)`` without
raising, for callers that handle statuses themselves.
"""
from __future__ import annotations

import http.client
import json
import time
from typing import Any, TypedDict
from urllib.parse import quote, urlsplit

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class RankedItem(TypedDict, total=False):
    item_id: str
    rank: int
    score: float
    source: str
    propensity: float
    predictions: dict[str, float]
    reasons: list[str]


class RankResponse(TypedDict):
    """The body of a 200 from ``/v1/rank`` (``online/openapi.py``'s ``RANK_RESPONSE``)."""

    request_id: str
    strategy: str
    model_version: str
    experiments: list[dict]     # {layer, experiment, variant}
    items: list[RankedItem]
    dropped: list[dict]         # {item_id, reason}
    degraded: bool


class FeedResponse(RankResponse):
    """The body of a 200 from ``/v1/feed``: a rank response whose items carry ``retrieved_by`` (the
    sources that found each), plus ``retrieval`` ({candidates, found, credited, unavailable, timings_ms,
    model_version})."""

    retrieval: dict


class ItemsResponse(TypedDict):
    """The body of a 200 from ``POST /v1/items``."""

    accepted: int
    created: int
    updated: int
    expired: int               # written already past expires_at: not stored
    blocked: list[dict]        # {item_id, reason}: kept in the corpus, out of candidate reads


class StoredItem(TypedDict, total=False):
    """The body of a 200 from ``GET /v1/items/<item_id>`` (``online/openapi.py``'s ``STORED_ITEM``)."""

    item_id: str
    source: str
    creator_id: str | None
    topic: str | None
    text: str | None
    generator: dict | None     # {model, prompt_id, prior_score}
    created_at: float
    expires_at: float | None
    updated_at: float
    blocked: bool
    blocked_reason: str | None  # blocked | risk:<rule>
    seq: int


def _given(**fields) -> dict:
    """The optional body fields that were given (None means absent)."""
    return {key: value for key, value in fields.items() if value is not None}


class ApiError(Exception):
    """A scorer answer that is not a success: ``status`` and the body's error ``code``, ``message``, ``path``."""

    def __init__(self, status: int, body: dict):
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        self.status, self.body = status, body
        self.code = str(error.get("code", "http_error"))
        self.message = str(error.get("message", ""))
        self.path = str(error.get("path", ""))
        super().__init__(f"HTTP {status} {self.code}: {self.message}" + (f" (at {self.path})" if self.path else ""))


class Client:
    """Keep-alive JSON client of one scorer (``base_url``: ``http://HOST:PORT``); see the module docstring."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.05, max_wait_s: float = 5.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url: expected http://HOST:PORT or https://HOST:PORT, got '{base_url}'")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_wait_s < 0:
            raise ValueError("timeout_s must be > 0; retries, backoff_s and max_wait_s >= 0")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.api_key, self.timeout_s = api_key, float(timeout_s)
        self.retries, self.backoff_s, self.max_wait_s = int(retries), float(backoff_s), float(max_wait_s)
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = kind(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def _wait_s(self, attempt: int, retry_after: str | None) -> float:
        try:
            wait = float(retry_after) if retry_after is not None else self.backoff_s * 2 ** attempt
        except ValueError:   # an HTTP date or junk: back off as without one
            wait = self.backoff_s * 2 ** attempt
        return min(max(wait, 0.0), self.max_wait_s)

    def call(self, method: str, path: str, body: Any = None,
             retry_statuses: frozenset = RETRY_STATUSES) -> tuple[int, dict]:
        """``(status, JSON body)`` of one call, retried as the module docstring says (on
        ``retry_statuses``); a connection that still fails after the retries raises its
        ``OSError`` / ``HTTPException``."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key is not None:
            headers["X-API-Key"] = self.api_key
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                conn = self._connection()
                conn.request(method, self.prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if last:
                    raise
                time.sleep(self._wait_s(attempt, None))
                continue
            if resp.status in retry_statuses and not last:
                time.sleep(self._wait_s(attempt, resp.getheader("Retry-After")))
                continue
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError:
                answer = {"error": {"code": "not_json", "message": raw[:200].decode("utf-8", "replace"), "path": ""}}
            return resp.status, answer if isinstance(answer, dict) else {"value": answer}
        raise AssertionError("unreachable")   # the last attempt returns or raises

    def _ok(self, method: str, path: str, body: Any, expect: tuple[int, ...]) -> dict:
        status, answer = self.call(method, path, body, RETRY_STATUSES.difference(expect))
        if status not in expect:
            raise ApiError(status, answer)
        return answer

    def rank(self, user_id: str, candidates: list[dict], *, context: dict | None = None,
             slate_size: int | None = None, strategy: str | None = None,
             request_id: str | None = None) -> RankResponse:
        """``POST /v1/rank``: the ranked slate of ``candidates`` for ``user_id``."""
        body = {"user_id": user_id, "candidates": candidates,
                **_given(context=context, slate_size=slate_size, strategy=strategy, request_id=request_id)}
        return self._ok("POST", "/v1/rank", body, (200,))

    def feed(self, user_id: str, *, context: dict | None = None, slate_size: int | None = None,
             strategy: str | None = None, request_id: str | None = None) -> FeedResponse:
        """``POST /v1/feed``: ``user_id``'s slate, its candidates retrieved from the corpus."""
        body = {"user_id": user_id,
                **_given(context=context, slate_size=slate_size, strategy=strategy, request_id=request_id)}
        return self._ok("POST", "/v1/feed", body, (200,))

    def retrieve(self, *, user_id: str | None = None, text: str | None = None, item_id: str | None = None,
                 k: int = 20) -> dict:
        """``POST /v1/retrieve``: ``{"model_version", "items"}``, the ``k`` corpus items nearest exactly one
        of a user, a text or an item, each a stored item plus ``score`` and ``engagement`` (counter totals)."""
        body = {**_given(user_id=user_id, text=text, item_id=item_id), "k": k}
        return self._ok("POST", "/v1/retrieve", body, (200,))

    def events(self, events: list[dict]) -> int:
        """``POST /v1/events``: the number of events accepted."""
        if not events:
            return 0
        return int(self._ok("POST", "/v1/events", {"events": events}, (202,))["accepted"])

    def items(self, items: list[dict]) -> ItemsResponse:
        """``POST /v1/items``: add or update corpus items, written all or nothing (see strategy/items.py
        for the fields and how a write of a known ``item_id`` merges)."""
        return self._ok("POST", "/v1/items", {"items": items}, (200,))

    def item(self, item_id: str) -> StoredItem | None:
        """``GET /v1/items/<item_id>``: the stored item (blocked ones too), or None when the corpus
        does not hold it (unknown or expired)."""
        status, answer = self.call("GET", "/v1/items/" + quote(item_id, safe=""))
        if status == 404 and isinstance(answer.get("error"), dict) and answer["error"].get("code") == "unknown_item":
            return None
        if status != 200:
            raise ApiError(status, answer)
        return answer

    def ready(self) -> dict:
        """``GET /readyz`` (a 503 while the model is not ready is returned, not raised)."""
        return self._ok("GET", "/readyz", None, (200, 503))
