"""Embedding rows for ids that appear after training: admission, expiry and a fixed capacity per table.

A batch-trained encoder knows the ids of its training rows; every other id meets the out-of-vocabulary
row 0. A streaming trainer must give new ids (a fresh LLM item, a new user) rows of their own without
retraining and without letting a table grow without bound — what ByteDance's Monolith does with
frequency filtering and expirable embeddings:

- each id table gets a fixed ``capacity`` (rows beyond the trained vocabulary are free, ``None`` in the
  encoder's vocabulary: the served model's tables have that many rows from the start, so its memory is
  known);
- an unknown id is counted; once seen ``min_count`` times it is **admitted** into a free row (the row's
  embedding and optimizer state start fresh); until then it shares row 0;
- a row whose id was not seen for ``ttl_s`` seconds (of event time) is **evicted** (freed for the next
  admission); when no row is free, the least recently seen row is taken if it is at least
  ``min_idle_s`` old, else the new id waits (counted as ``full``).

Nothing is hashed, so two admitted ids never share a row; the sharing that remains is row 0, and it is
measured, not assumed harmless: per table, the share of lookups that hit row 0 and how many distinct ids
shared it (``stats``).

The streaming loop lives in ``online/stream_train.py``; torch is imported only by the functions
that touch a model's tables.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from strategy.checks import as_dict, as_number, check_keys
from strategy.errors import Errors, join_path

ID_KEYS = ("capacity", "min_count", "ttl_s", "min_idle_s")


@dataclass(frozen=True)
class IdTableConfig:
    """The growth rules of one id table (see the module docstring)."""

    capacity: int
    min_count: int = 2
    ttl_s: float = 86_400.0
    min_idle_s: float = 3_600.0


def id_tables_from_dict(errs: Errors, value, path: str, tables: dict[str, int]) -> dict[str, IdTableConfig]:
    """``{table: IdTableConfig}`` from ``{table: {capacity, min_count, ttl_s, min_idle_s}}``;
    ``tables`` maps each id table the encoder has to its trained vocabulary size (the capacity must
    hold it)."""
    obj = as_dict(errs, value if value is not None else {}, path) or {}
    out = {}
    for name, spec in obj.items():
        p = join_path(path, name)
        if name not in tables:
            errs.add(p, f"unknown id table '{name}' (the model's id tables: {', '.join(sorted(tables)) or 'none'})",
                     "unknown_table")
            continue
        spec = as_dict(errs, spec, p)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, p, ID_KEYS, required=("capacity",))
        kw = {}
        for key, lo, hi, integer in (("capacity", 1, 50_000_000, True), ("min_count", 1, 1_000_000, True),
                                     ("ttl_s", 1, 365 * 86_400, False), ("min_idle_s", 0, 365 * 86_400, False)):
            if key in spec:
                kw[key] = as_number(errs, spec[key], join_path(p, key), lo=lo, hi=hi, integer=integer)
        if kw.get("capacity") is not None and kw["capacity"] < tables[name]:
            errs.add(join_path(p, "capacity"), f"{kw['capacity']} is below the {tables[name]} ids the model "
                                               "already has", "range")
        if len(errs.items) == before:
            out[name] = IdTableConfig(**kw)
    return out


class _TableState:
    def __init__(self, capacity: int, used: int, now: float):
        self.last_seen = np.full(capacity, -np.inf)
        self.last_seen[:used] = now
        self.free = list(range(capacity, used, -1))   # 1-based rows, the lowest popped first
        self.candidates: OrderedDict = OrderedDict()  # unknown id -> times seen (bounded, least recent out)
        self.counts = {"admitted": 0, "evicted": 0, "full": 0, "lookups": 0, "oov_lookups": 0}
        self.oov_ids: set = set()                     # distinct ids that shared row 0 since the last stats


class DynamicIds:
    """Grows and shrinks the vocabularies of ``encoder``'s id tables online (see the module docstring).

    >>> ids = DynamicIds(encoder, {"item_id": IdTableConfig(200_000)}, now=ts)
    >>> changed = ids.observe(columns, now=ts)   # {table: rows admitted or evicted} -> reset them
    """

    def __init__(self, encoder, configs: dict[str, IdTableConfig], now: float):
        self.encoder, self.configs = encoder, dict(configs)
        self.state: dict[str, _TableState] = {}
        for table, cfg in self.configs.items():
            vocab = encoder.vocabs[table]
            if len(vocab) > cfg.capacity:
                raise ValueError(f"table {table}: capacity {cfg.capacity} is below its {len(vocab)} ids")
            used = len(vocab)
            vocab.extend([None] * (cfg.capacity - used))
            self.state[table] = _TableState(cfg.capacity, used, now)
            for row, key in enumerate(vocab[:used], start=1):
                if key is None:
                    self.state[table].free.append(row)
                    self.state[table].last_seen[row - 1] = -np.inf
        encoder._build_index()
        # which columns feed each table, and the lookups keyed by a table's ids (dropped with the id)
        self.columns: dict[str, list] = {t: [] for t in self.configs}
        for f in encoder.spec.sparse:
            if f.table_name in self.configs and f.type in ("id", "id_list") and not f.lookup:
                self.columns[f.table_name].append((f.column, f.type == "id_list", f.max_len))
        owner_column = {f.table_name: f.column for f in encoder.spec.sparse if f.type == "id"}
        self.keyed_maps = {t: [f.name for f in encoder.spec.sparse if f.lookup and f.lookup[0] == owner_column.get(t)]
                           for t in self.configs}

    def observe(self, columns: dict, now: float) -> dict[str, list[int]]:
        """Count the ids of a batch (``{column: list of values}``, the trainer's rows before encoding),
        refresh the rows of known ids, admit the ids seen ``min_count`` times and evict rows unseen
        for ``ttl_s``. Returns, per table, the rows whose id changed: their embeddings (and optimizer
        state) must start fresh."""
        changed: dict[str, list[int]] = {}
        for table, cfg in self.configs.items():
            st, rows = self.state[table], self.encoder._row_table(table)
            ids = []
            for column, is_list, max_len in self.columns[table]:
                for v in columns.get(column) or ():
                    if v is None:
                        continue
                    if is_list:
                        ids.extend(x for x in list(v)[:max_len] if isinstance(x, str))
                    elif isinstance(v, str):
                        ids.append(v)
            st.counts["lookups"] += len(ids)
            fresh = []
            for key in ids:
                row = rows.get(key)
                if row is not None:
                    st.last_seen[row - 1] = now
                    continue
                st.counts["oov_lookups"] += 1
                st.oov_ids.add(key)
                seen = st.candidates.pop(key, 0) + 1
                if seen >= cfg.min_count:
                    fresh.append(key)
                else:
                    st.candidates[key] = seen
                    if len(st.candidates) > cfg.capacity:
                        st.candidates.popitem(last=False)
            out = self._expire(table, now)
            for key in dict.fromkeys(fresh):
                row = self._free_row(table, now)
                if row is None:
                    st.counts["full"] += 1
                    st.candidates[key] = cfg.min_count - 1   # admitted at its next sighting, if room
                    continue
                old = self.encoder.set_row(table, row, key)
                if old is not None:
                    self._forget(table, old)
                    st.counts["evicted"] += 1
                st.last_seen[row - 1] = now
                st.counts["admitted"] += 1
                out.append(row)
            if out:
                changed[table] = sorted(set(out))
        return changed

    def _expire(self, table: str, now: float) -> list[int]:
        st, cfg = self.state[table], self.configs[table]
        stale = np.flatnonzero(st.last_seen < now - cfg.ttl_s)
        out = []
        for idx in stale:
            row = int(idx) + 1
            if self.encoder.vocabs[table][idx] is None:
                continue
            self._forget(table, self.encoder.set_row(table, row, None))
            st.last_seen[idx] = -np.inf
            st.free.append(row)
            st.counts["evicted"] += 1
            out.append(row)
        return out

    def _free_row(self, table: str, now: float) -> int | None:
        st, cfg = self.state[table], self.configs[table]
        while st.free:
            row = st.free.pop()
            if self.encoder.vocabs[table][row - 1] is None:
                return row
        idx = int(np.argmin(st.last_seen))   # the least recently seen id, if idle long enough
        if st.last_seen[idx] <= now - cfg.min_idle_s:
            return idx + 1
        return None

    def _forget(self, table: str, key: str | None) -> None:
        if key is None:
            return
        for name in self.keyed_maps[table]:
            self.encoder.maps.get(name, {}).pop(key, None)

    def stats(self, reset: bool = True) -> dict:
        """Per table: capacity, rows in use, admitted / evicted / full counts, and how much row 0 was
        shared — the share of lookups that hit it and the distinct ids that did (since the last call)."""
        out = {}
        for table, st in self.state.items():
            used = sum(k is not None for k in self.encoder.vocabs[table])
            c = st.counts
            out[table] = {"capacity": self.configs[table].capacity, "used": used, **c,
                          "oov_share": c["oov_lookups"] / c["lookups"] if c["lookups"] else 0.0,
                          "oov_distinct_ids": len(st.oov_ids)}
            if reset:
                st.counts = dict.fromkeys(c, 0)
                st.oov_ids = set()
        return out

    def state_dict(self) -> dict:
        """What a checkpoint needs besides the encoder's vocabularies (plain lists: weights_only-safe)."""
        return {t: {"last_seen": st.last_seen.tolist(), "candidates": list(st.candidates.items())}
                for t, st in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for table, s in state.items():
            st = self.state[table]
            st.last_seen = np.asarray(s["last_seen"], dtype=np.float64)
            st.candidates = OrderedDict((k, int(v)) for k, v in s["candidates"])
            st.free = [row for row in range(len(st.last_seen), 0, -1) if self.encoder.vocabs[table][row - 1] is None]


def table_key(table: str) -> str:
    """The state-dict key of id table ``table``'s weights in a ``MultiTaskRanker``."""
    return f"ebc.embedding_bags.t_{table}.weight"


def load_grown(module, state: dict) -> None:
    """Load a trained ``state`` into ``module`` whose id tables may have more rows (spare capacity):
    the trained rows are copied, the spare rows start at zero (an id nobody has learnt contributes
    nothing until it is trained)."""
    import torch

    own = module.state_dict()
    merged = {}
    for key, value in state.items():
        target = own[key]
        if target.shape == value.shape:
            merged[key] = value
        elif target.dim() == 2 and value.dim() == 2 and target.shape[1] == value.shape[1] \
                and target.shape[0] > value.shape[0]:
            grown = torch.zeros_like(target)
            grown[: value.shape[0]] = value
            merged[key] = grown
        else:
            raise ValueError(f"{key}: trained shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    module.load_state_dict(merged)


def text_bucket_collisions(encoder, texts) -> dict:
    """For each hashed text feature: distinct tokens in ``texts``, buckets they fill, and the share of
    tokens that share a bucket with another token (the hashing trick's collisions, measured)."""
    from .features import hash_token, tokenize

    out = {}
    for f in encoder.spec.sparse:
        if f.type != "text":
            continue
        tokens = {t for text in texts for t in tokenize(text)}
        buckets: dict[int, int] = {}
        for t in tokens:
            b = hash_token(t, f.buckets)
            buckets[b] = buckets.get(b, 0) + 1
        shared = sum(n for n in buckets.values() if n > 1)
        out[f.name] = {"tokens": len(tokens), "buckets": f.buckets, "buckets_used": len(buckets),
                       "colliding_token_share": shared / len(tokens) if tokens else 0.0}
    return out
