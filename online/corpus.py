"""The corpus: the items the engine retrieves from, durable and shared by every scorer worker.

Items arrive through ``POST /v1/items`` (:func:`post_items`) and the ``items`` bus topic
(:func:`run_corpus`, the ``stratarank corpus`` command); both validate with
:mod:`strategy.items` (which documents the fields and how a partial update merges) and write with
:meth:`Corpus.upsert`.

Storage is one SQLite file in WAL mode (stdlib ``sqlite3``): readers never wait for the writer,
writers (workers, replicas and the bus consumer on one host) take turns under ``busy_timeout``;
with ``synchronous: full`` (the default) a committed write survives a power cut, so the bus
consumer commits its offsets only after :meth:`Corpus.upsert` returned. Each process and thread
opens its own connection (a connection never crosses a gunicorn fork).

Blocking: an item written with ``blocked: true``, or one that fails the scorer's risk rules
(``online.risk.RiskRules``: blocked creators, terms, patterns), stays in the corpus, marked
blocked with its reason (``blocked`` or ``risk:<rule>``); candidate reads (:meth:`Corpus.fresh`,
:meth:`Corpus.iter_batches`) leave it out, :meth:`Corpus.get` shows it. The rules are applied at
each write of an item (and by :meth:`Corpus.rescreen` when they change).

Expiry: an item past ``expires_at`` is left out of every read at once and deleted by
:meth:`Corpus.purge` (run every ``corpus.purge_interval_s`` by writers and by the consumer).
``corpus.default_ttl_s`` gives items written without an expiry one.

Configuration, the ``corpus:`` section of ``conf/service.yaml``::

    corpus: {path: var/corpus.db, synchronous: full, busy_timeout_s: 5, default_ttl_s: null,
             purge_interval_s: 60, consumer: corpus, topic: items, batch_size: 1000, poll_timeout_s: 0.2}
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from strategy.checks import as_dict, as_number, as_str, check_keys
from strategy.errors import Errors, FieldError, ValidationError, join_path
from strategy.items import CLEARABLE, ItemGenerator, ItemWrite, parse_item, parse_items

log = logging.getLogger("stratarank.corpus")

CORPUS_KEYS = ("path", "synchronous", "busy_timeout_s", "default_ttl_s", "purge_interval_s", "consumer", "topic",
               "batch_size", "poll_timeout_s")
SYNCHRONOUS = ("full", "normal")
SCHEMA_VERSION = 1
COLUMNS = ("item_id", "source", "creator_id", "topic", "text", "gen_model", "gen_prompt_id", "gen_prior",
           "created_at", "expires_at", "caller_blocked", "blocked_reason", "updated_at", "seq")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM items"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


@dataclass(frozen=True)
class CorpusConfig:
    path: str = "var/corpus.db"
    synchronous: str = "full"          # full: a committed write survives a power cut; normal: an app crash
    busy_timeout_s: float = 5.0        # how long a writer waits for another one
    default_ttl_s: float | None = None  # expiry of items written without one (None: they never expire)
    purge_interval_s: float = 60.0
    consumer: str = "corpus"           # the bus consumer name of `stratarank corpus`
    topic: str = "items"
    batch_size: int = 1000
    poll_timeout_s: float = 0.2

    def open(self, risk=None) -> "Corpus":
        return Corpus(self, risk)


def corpus_config_from_dict(errs: Errors, value, path: str = "corpus") -> CorpusConfig:
    """The ``corpus:`` section (absent or null: the defaults); problems go to ``errs`` by key path."""
    from .bus import CONSUMER_RE, TOPIC_RE

    d = CorpusConfig()
    if value is None:
        return d
    obj = as_dict(errs, value, path)
    if obj is None:
        return d
    check_keys(errs, obj, path, CORPUS_KEYS)
    p = lambda k: join_path(path, k)  # noqa: E731 - a local path helper
    kw: dict = {}
    if "path" in obj:
        kw["path"] = as_str(errs, obj["path"], p("path"), max_len=4096)
        if kw["path"] is not None and (not kw["path"].strip() or kw["path"] == ":memory:"):
            errs.add(p("path"), "a file path is required (the corpus is shared by processes)", "invalid")
            kw["path"] = None
    if "synchronous" in obj:
        kw["synchronous"] = as_str(errs, obj["synchronous"], p("synchronous"), choices=SYNCHRONOUS)
    for key, lo, hi, integer in (("busy_timeout_s", 0.01, 600, False), ("purge_interval_s", 0.01, 86400, False),
                                 ("batch_size", 1, 100_000, True), ("poll_timeout_s", 0.001, 60, False)):
        if key in obj:
            kw[key] = as_number(errs, obj[key], p(key), lo=lo, hi=hi, integer=integer)
    if obj.get("default_ttl_s") is not None:
        kw["default_ttl_s"] = as_number(errs, obj["default_ttl_s"], p("default_ttl_s"), lo=0, lo_open=True,
                                        hi=10 * 365 * 86400)
    if "consumer" in obj:
        kw["consumer"] = as_str(errs, obj["consumer"], p("consumer"), pattern=CONSUMER_RE)
    if "topic" in obj:
        kw["topic"] = as_str(errs, obj["topic"], p("topic"), pattern=TOPIC_RE)
    return replace(d, **{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class Item:
    """A stored item. ``blocked`` is true when the caller blocked it or a risk rule did
    (``blocked_reason``: ``blocked`` or ``risk:<rule>``); ``seq`` grows with every write of any item
    (what an index follows to pick up changes)."""

    item_id: str
    source: str
    creator_id: str | None = None
    topic: str | None = None
    text: str | None = None
    generator: ItemGenerator | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    blocked: bool = False
    blocked_reason: str | None = None
    updated_at: float = 0.0
    seq: int = 0
    caller_blocked: bool = field(default=False, repr=False)

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "source": self.source, "creator_id": self.creator_id, "topic": self.topic,
                "text": self.text, "generator": None if self.generator is None else self.generator.to_dict(),
                "created_at": self.created_at, "expires_at": self.expires_at, "blocked": self.blocked,
                "blocked_reason": self.blocked_reason, "updated_at": self.updated_at, "seq": self.seq}

    @classmethod
    def from_row(cls, row) -> "Item":
        (item_id, source, creator, topic, text, model, prompt, prior, created, expires, caller, reason, updated,
         seq) = row
        gen = None if model is None else ItemGenerator(model, float(prior), prompt)
        return cls(item_id, source, creator, topic, text, gen, created, expires, reason is not None, reason,
                   updated, seq, bool(caller))


@dataclass
class UpsertResult:
    """What one :meth:`Corpus.upsert` did: items ``created`` and ``updated``, the ``blocked`` ones
    as ``(item_id, reason)``, ``expired`` (written already past ``expires_at``: not stored, and a
    stored version is deleted), and the ``errors`` of writes skipped (``atomic=False`` only)."""

    created: int = 0
    updated: int = 0
    expired: int = 0
    blocked: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def written(self) -> int:
        return self.created + self.updated

    def to_dict(self) -> dict:
        return {"accepted": self.written + self.expired, "created": self.created, "updated": self.updated,
                "expired": self.expired, "blocked": [{"item_id": i, "reason": r} for i, r in self.blocked]}


class CorpusUnavailable(RuntimeError):
    """The corpus file cannot be opened or written (disk, permissions, a lock held too long)."""


class Corpus:
    """The SQLite corpus of ``config.path`` (created on first use). ``risk`` (a ``RiskRules``, or a
    function returning the current one, e.g. the scorer's after a reload) screens each write. Thread- and fork-safe:
    each process and thread has its own connection."""

    def __init__(self, config: CorpusConfig | None = None, risk=None, clock=time.time):
        self.config = config or CorpusConfig()
        self.risk = risk
        self.clock = clock
        self._local = threading.local()
        self._last_purge = 0.0
        self._all: list = []   # every connection this object opened (closed by close())
        self._lock = threading.Lock()

    # ------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise CorpusUnavailable(f"corpus {self.config.path}: {exc}") from exc
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._all.append((os.getpid(), conn))
        return conn

    def _connect(self) -> sqlite3.Connection:
        path = Path(self.config.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=self.config.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_s * 1000)}")
        # switching a new file to WAL and creating the schema meet other processes doing the same:
        # SQLite answers "locked" there without waiting (no busy handler), so retry up to busy_timeout
        deadline = time.monotonic() + self.config.busy_timeout_s
        while True:
            try:
                self._prepare(conn)
                return conn
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode WAL refused (got {mode}): a network file system?")
        conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"corpus schema version {version}, this code reads {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the connections this object opened in this process."""
        with self._lock:
            mine = [c for pid, c in self._all if pid == os.getpid()]
            self._all = [(pid, c) for pid, c in self._all if pid != os.getpid()]
        for conn in mine:
            conn.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ writes

    def upsert(self, writes: list[ItemWrite], *, atomic: bool = True, paths: list[str] | None = None,
               now: float | None = None) -> UpsertResult:
        """Write ``writes`` in one transaction, each merged into the stored item of its id as
        :mod:`strategy.items` says (later writes of one id in the batch apply after earlier ones).
        A merge can still be invalid (an ``llm`` item left without a generator, a human item
        keeping one, an expiry not after creation): with ``atomic`` nothing is written and a
        ValidationError names every such write (by ``paths[i]``, default ``items[i]``); without,
        those writes are skipped and listed in the result's ``errors``. Durable on return."""
        now = self.clock() if now is None else now
        paths = paths or [f"items[{i}]" for i in range(len(writes))]
        result = UpsertResult()
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
                for write, path in zip(writes, paths):
                    row = conn.execute(f"{_SELECT} WHERE item_id = ?", (write.item_id,)).fetchone()
                    old = None if row is None else Item.from_row(row)
                    item, problem = self._merge(old, write, now)
                    if problem is not None:
                        result.errors.append(FieldError(join_path(path, problem[0]), problem[1], problem[2]))
                        continue
                    expired = item.expires_at is not None and item.expires_at <= now
                    if expired:
                        result.expired += 1
                        if old is None:
                            continue
                        # kept, hidden, with a new change number until the purge: an index following
                        # changes_since then removes it (deleting the row here left it indexed)
                    seq += 1
                    item = replace(item, seq=seq)
                    conn.execute(_UPSERT, _row(item))
                    if not expired:
                        result.created += old is None
                        result.updated += old is not None
                    if item.blocked:
                        result.blocked.append((item.item_id, item.blocked_reason))
                if result.errors and atomic:
                    conn.execute("ROLLBACK")
                    raise ValidationError(result.errors)
                conn.execute("COMMIT")
            except ValidationError:
                raise
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise CorpusUnavailable(f"corpus {self.config.path}: {exc}") from exc
        self.maybe_purge(now)
        return result

    def _merge(self, old: Item | None, write: ItemWrite, now: float):
        """``(item, None)`` or ``(None, (field, message, code))``."""
        f = write.fields
        base = old if old is not None else Item(write.item_id, write.source, created_at=now)
        kw = {k: f[k] for k in ("creator_id", "topic", "text", "generator") if k in f}
        if "created_at" in f:
            kw["created_at"] = f["created_at"]
        created = kw.get("created_at", base.created_at)
        if "expires_at" in f:
            kw["expires_at"] = f["expires_at"]
        elif "ttl_s" in f:
            kw["expires_at"] = created + f["ttl_s"]
        elif old is None and self.config.default_ttl_s is not None:
            kw["expires_at"] = created + self.config.default_ttl_s
        caller = f.get("blocked", base.caller_blocked)
        item = replace(base, source=write.source, caller_blocked=caller, updated_at=now, **kw)
        if item.source == "llm" and item.generator is None:
            return None, ("generator", "required: llm items carry a generator {model, prior_score}", "required")
        if item.source == "human" and item.generator is not None:
            return None, ("generator", "the stored item has a generator; send generator: null to make it human",
                          "invalid")
        if item.expires_at is not None and item.expires_at <= item.created_at:
            return None, ("expires_at", f"{item.expires_at:g} is not after created_at ({item.created_at:g})",
                          "range")
        reason = "blocked" if caller else self._risk_reason(item)
        return replace(item, blocked=reason is not None, blocked_reason=reason), None

    def _risk_reason(self, item: Item) -> str | None:
        risk = self.risk() if callable(self.risk) else self.risk
        if risk is None:
            return None
        _, dropped = risk.screen([item])
        return dropped[0][1] if dropped else None

    def rescreen(self, risk=None, now: float | None = None) -> int:
        """Apply ``risk`` (default: :attr:`risk`) to every stored item again (after the rules
        changed); returns how many items changed their blocked state."""
        if risk is not None:
            self.risk = risk
        now = self.clock() if now is None else now
        changed = 0
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
            for row in conn.execute(f"{_SELECT} WHERE caller_blocked = 0").fetchall():
                item = Item.from_row(row)
                reason = self._risk_reason(item)
                if reason != item.blocked_reason:
                    seq += 1
                    conn.execute("UPDATE items SET blocked_reason = ?, updated_at = ?, seq = ? WHERE item_id = ?",
                                 (reason, now, seq, item.item_id))
                    changed += 1
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return changed

    def purge(self, now: float | None = None) -> int:
        """Delete expired items; returns how many."""
        now = self.clock() if now is None else now
        self._last_purge = time.monotonic()
        try:
            cur = self._conn().execute("DELETE FROM items WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        except sqlite3.Error as exc:
            raise CorpusUnavailable(f"corpus {self.config.path}: {exc}") from exc
        return cur.rowcount

    def maybe_purge(self, now: float | None = None) -> int:
        """:meth:`purge` when the last one is older than ``purge_interval_s`` (in this object)."""
        if time.monotonic() - self._last_purge < self.config.purge_interval_s:
            return 0
        return self.purge(now)

    # ------------------------------------------------------------ reads (expired items never show)

    def _query(self, sql: str, args=()) -> list:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise CorpusUnavailable(f"corpus {self.config.path}: {exc}") from exc

    def get(self, item_id: str, now: float | None = None) -> Item | None:
        """The item (blocked ones too), or None when unknown or expired."""
        rows = self._query(f"{_SELECT} WHERE item_id = ? AND {_LIVE}", (item_id, self._now(now)))
        return Item.from_row(rows[0]) if rows else None

    def get_many(self, item_ids, include_blocked: bool = True, now: float | None = None) -> dict[str, Item]:
        """``{item_id: Item}`` of the given ids that are stored and not expired."""
        ids = list(dict.fromkeys(item_ids))
        out: dict[str, Item] = {}
        now = self._now(now)
        for start in range(0, len(ids), 500):   # SQLite's host-parameter limit is 999 on old builds
            chunk = ids[start:start + 500]
            sql = f"{_SELECT} WHERE item_id IN ({', '.join('?' * len(chunk))}) AND {_LIVE}"
            if not include_blocked:
                sql += " AND blocked_reason IS NULL"
            for row in self._query(sql, (*chunk, now)):
                out[row[0]] = Item.from_row(row)
        return out

    def servable_ids(self, item_ids, now: float | None = None) -> set[str]:
        """The ids of ``item_ids`` stored, not blocked and not expired (ids only: cheaper than :meth:`get_many`)."""
        ids = list(dict.fromkeys(item_ids))
        out: set[str] = set()
        now = self._now(now)
        for start in range(0, len(ids), 500):   # SQLite's host-parameter limit is 999 on old builds
            chunk = ids[start:start + 500]
            sql = (f"SELECT item_id FROM items WHERE item_id IN ({', '.join('?' * len(chunk))}) AND {_LIVE} "
                   "AND blocked_reason IS NULL")
            out.update(row[0] for row in self._query(sql, (*chunk, now)))
        return out

    def fresh(self, since: float, source: str | None = None, limit: int = 1000, now: float | None = None) -> list[Item]:
        """Non-blocked items created after ``since`` (of ``source`` when given), newest first."""
        sql = f"{_SELECT} WHERE created_at > ? AND blocked_reason IS NULL AND {_LIVE}"
        args: list = [since, self._now(now)]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        sql += " ORDER BY created_at DESC, item_id LIMIT ?"
        return [Item.from_row(r) for r in self._query(sql, (*args, int(limit)))]

    def count(self, source: str | None = None, include_blocked: bool = True, now: float | None = None) -> int:
        """Items stored and not expired (of ``source`` when given)."""
        sql = f"SELECT COUNT(*) FROM items WHERE {_LIVE}"
        args: list = [self._now(now)]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        if not include_blocked:
            sql += " AND blocked_reason IS NULL"
        return self._query(sql, args)[0][0]

    def iter_batches(self, batch_size: int = 10_000, now: float | None = None):
        """Every non-blocked, non-expired item, in ``item_id`` order, as lists of at most
        ``batch_size`` :class:`Item` (keyset pagination: writes meanwhile do not break it)."""
        now, after = self._now(now), ""
        while True:
            rows = self._query(f"{_SELECT} WHERE item_id > ? AND blocked_reason IS NULL AND {_LIVE} "
                               "ORDER BY item_id LIMIT ?", (after, now, int(batch_size)))
            if not rows:
                return
            yield [Item.from_row(r) for r in rows]
            after = rows[-1][0]

    def changes_since(self, seq: int, limit: int = 10_000) -> list[Item]:
        """Items written after change number ``seq`` (blocked and expired ones too: an index
        removes those), oldest change first; follow with the last item's ``seq``."""
        return [Item.from_row(r) for r in self._query(f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?",
                                                      (int(seq), int(limit)))]

    def _now(self, now):
        return self.clock() if now is None else now


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS items (
        item_id TEXT PRIMARY KEY, source TEXT NOT NULL, creator_id TEXT, topic TEXT, text TEXT,
        gen_model TEXT, gen_prompt_id TEXT, gen_prior REAL,
        created_at REAL NOT NULL, expires_at REAL, caller_blocked INTEGER NOT NULL DEFAULT 0, blocked_reason TEXT,
        updated_at REAL NOT NULL, seq INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS items_fresh ON items (source, created_at)",
    "CREATE INDEX IF NOT EXISTS items_created ON items (created_at)",
    "CREATE INDEX IF NOT EXISTS items_expires ON items (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS items_seq ON items (seq)",
)
_UPSERT = (f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
           f"ON CONFLICT (item_id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in COLUMNS[1:])}")


def _row(item: Item) -> tuple:
    g = item.generator
    return (item.item_id, item.source, item.creator_id, item.topic, item.text, g and g.model, g and g.prompt_id,
            g and g.prior_score, item.created_at, item.expires_at, int(item.caller_blocked), item.blocked_reason,
            item.updated_at, item.seq)


# ---------------------------------------------------------------- HTTP (the routes live in online/app.py)


ITEM_PATH = "/v1/items/"
ITEM_ID_KEY = "stratarank.item_id"


def item_paths(wsgi_app):
    """WSGI middleware for ``GET /v1/items/<item_id>``: any id, "/" and newlines included. The
    router sees a WSGI ``PATH_INFO`` that the server already percent-decoded, so an id holding "/"
    (sent as ``%2F``) would be split, merged or redirected; this takes the id from the path as the
    client sent it (gunicorn's ``RAW_URI``, else ``REQUEST_URI``), decodes it once (UTF-8, strict),
    and hands the router (and the access log) the path as sent, its slashes encoded. The route reads the id from
    ``environ[ITEM_ID_KEY]`` (None when the bytes are not UTF-8: no stored id is)."""
    from urllib.parse import quote, unquote, urlsplit

    def app(environ, start_response):
        if environ.get("PATH_INFO", "").startswith(ITEM_PATH):
            raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
            path = urlsplit(raw).path if raw else quote(environ["PATH_INFO"].encode("latin-1"), safe="/")
            if path.startswith(ITEM_PATH):
                remainder = path[len(ITEM_PATH):]
                try:
                    item_id = unquote(remainder, errors="strict")
                except UnicodeDecodeError:
                    item_id = None
                environ[ITEM_ID_KEY] = item_id
                environ["PATH_INFO"] = ITEM_PATH + remainder.replace("/", "%2F")   # as sent, one segment
        return wsgi_app(environ, start_response)

    return app


def post_items(corpus: Corpus, body) -> dict:
    """``POST /v1/items``: validate the whole batch, then write it in one transaction (all or
    nothing); a ValidationError names every bad field."""
    return corpus.upsert(parse_items(body)).to_dict()


# ---------------------------------------------------------------- the bus consumer


@dataclass
class CorpusStats:
    records: int = 0    # consumed
    written: int = 0    # created or updated
    invalid: int = 0    # skipped: not a valid item write
    blocked: int = 0
    expired: int = 0    # arrived already expired
    purged: int = 0
    batches: int = 0
    commits: int = 0
    write_errors: int = 0   # corpus writes retried
    started: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        elapsed = max(time.time() - self.started, 1e-9)
        return {"records": self.records, "written": self.written, "invalid": self.invalid, "blocked": self.blocked,
                "expired": self.expired, "purged": self.purged, "batches": self.batches, "commits": self.commits,
                "write_errors": self.write_errors, "elapsed_s": round(elapsed, 3),
                "records_per_s": round(self.records / elapsed, 1)}


MAX_LOGGED_INVALID = 20   # per run: the first invalid records are logged, all are counted


def run_corpus(config: CorpusConfig, bus, corpus: Corpus, *, stop: threading.Event | None = None,
               max_idle_s: float | None = None, startup_grace_s: float = 15.0, on_progress=None,
               progress_interval_s: float = 10.0, stats: CorpusStats | None = None) -> CorpusStats:
    """Consume ``config.topic`` under ``config.consumer`` into ``corpus`` until ``stop`` is set
    (or, with ``max_idle_s``, that long without records; before the first, at least
    ``startup_grace_s``). Each record is one item write, validated like ``POST /v1/items``; an
    invalid one is counted, logged (the first few) and skipped, never fatal. A batch's offsets are
    committed only after its corpus transaction committed (durable), so a crash re-delivers at
    most the uncommitted tail, and writing an item twice leaves it as once (merges are idempotent)."""
    stop = stop or threading.Event()
    stats = CorpusStats() if stats is None else stats
    consumer = bus.consumer(config.consumer, [config.topic])
    last_data = last_progress = time.monotonic()
    try:
        while not stop.is_set():
            batch = consumer.poll_batch(config.batch_size, config.poll_timeout_s)
            now = time.monotonic()
            if batch.positions:
                errs = Errors(limit=10 ** 9)
                writes, paths = [], []
                for i, value in enumerate(batch.values):
                    path = f"{config.topic}[{stats.records + i}]"
                    before = len(errs.items)
                    write = parse_item(value, path, errs)
                    if write is not None:
                        writes.append(write)
                        paths.append(path)
                    elif len(errs.items) == before:   # pragma: no cover - parse_item always says why
                        errs.add(path, "invalid item", "invalid")
                invalid = len({_record_of(e.path) for e in errs.items})
                result = _write_with_retry(corpus, writes, paths, stats, stop)
                if result is None:
                    break   # stopped while the corpus was unwritable: nothing of this batch is committed
                consumer.commit(batch)
                stats.commits += 1
                stats.records += len(batch.values)
                stats.batches += 1
                stats.invalid += invalid + len(result.errors)
                stats.written += result.written
                stats.blocked += len(result.blocked)
                stats.expired += result.expired
                for err in [*errs.items, *result.errors]:
                    if stats.invalid <= MAX_LOGGED_INVALID:
                        log.warning("corpus: skipped an invalid item record: %s", err)
                last_data = now
            try:
                stats.purged += corpus.maybe_purge()
            except CorpusUnavailable as exc:
                log.warning("corpus: purge failed: %s", exc)
            if on_progress is not None and now - last_progress >= progress_interval_s:
                last_progress = now
                on_progress(stats)
            if max_idle_s is not None:
                idle = now - last_data
                if (stats.records and idle >= max_idle_s) or (not stats.records and idle >= max(max_idle_s,
                                                                                               startup_grace_s)):
                    break
    finally:
        consumer.close()
    return stats


def _record_of(path: str) -> str:
    """``items[12]`` of ``items[12].generator.model``."""
    end = path.find("]")
    return path[:end + 1] if end >= 0 else path


def _write_with_retry(corpus: Corpus, writes, paths, stats: CorpusStats, stop: threading.Event):
    backoff = 0.2
    while True:
        try:
            return corpus.upsert(writes, atomic=False, paths=paths) if writes else UpsertResult()
        except CorpusUnavailable as exc:
            stats.write_errors += 1
            log.warning("corpus: %s; retrying in %.1f s", exc, backoff)
            if stop.wait(backoff):
                return None
            backoff = min(backoff * 2, 5.0)


__all__ = ["CorpusConfig", "corpus_config_from_dict", "Item", "UpsertResult", "Corpus", "CorpusUnavailable",
           "post_items", "item_paths", "ITEM_ID_KEY", "run_corpus", "CorpusStats"]
