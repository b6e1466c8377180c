"""Feature spec (YAML) -> fitted :class:`FeatureEncoder` -> TorchRec ``KeyedJaggedTensor`` batches.

One code path for training and serving: ``FeatureEncoder.transform(rows)`` takes a pandas
DataFrame (a training log or the candidate rows of one online request) and returns a
:class:`FeatureBatch` (dense tensor + ``KeyedJaggedTensor``). Fitted state (vocabularies,
scaler mean/scale) is plain JSON, never pickle.

Feature spec format (``conf/features/*.yaml``)::

    name: sim
    features:
      - {name: user_id, type: id, column: user_id, dim: 16, max_vocab: 50000, min_count: 1}
      - {name: recent_items, type: id_list, column: user_recent_items, table: item_id, max_len: 20}
      - {name: text_tokens, type: text, column: text, buckets: 4096, max_len: 32, dim: 16}
      - {name: prior_score, type: dense, column: prior_score, log1p: false}

Feature types:

- ``id``: one id per row -> an embedding row; index 0 is the out-of-vocabulary bucket (unseen,
  rare (< ``min_count``) or missing ids). Vocabulary = the ``max_vocab`` most frequent ids. A
  vocabulary entry may be ``None``: a free row (a streaming trainer's table keeps spare rows for ids
  it admits later, see ``ranking/dynamic_ids.py``); no id maps to it.
- ``id_list``: a list of ids per row (truncated to ``max_len``); ``table: other`` shares the
  vocabulary and embedding table of the ``id`` feature ``other`` (a user's recent items use
  the item table), else it owns a table.
  ``lookup: [key_column, value_column]`` maps each listed id through a key -> value table learnt
  from the training rows (e.g. a user's recent *items* -> their *topics*: ``lookup: [item_id, topic]``
  with ``table: topic``); the table is part of the fitted state, so serving maps the same way
  (unknown keys -> the OOV row).
- ``text``: lower-cased word tokens hashed (crc32, stable across processes) into ``buckets``
  rows (+1: row 0 is padding/none), so an LLM item with no history still has content features.
- ``dense``: a number; optional ``log1p``; missing -> the training mean; standardised with
  scikit-learn's ``StandardScaler`` (its ``mean_``/``scale_`` stored as lists).

``fill`` (``id`` and ``dense``): the value used where the row has none. A column whose features all
have a ``fill`` may be absent from the rows being encoded (serving): every row then gets the fill.
That is how a training-only signal is served at a fixed value, e.g. the logged slate position::

      - {name: position, type: id, column: position, dim: 4, fill: 1}   # serving: as if at the top
"""
from __future__ import annotations

import json
import re
import threading
import zlib
from collections import OrderedDict
from itertools import repeat
from types import NoneType
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from strategy.checks import NAME_RE, as_bool, as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, FieldError, ValidationError, did_you_mean, join_path

FEATURE_TYPES = ("id", "id_list", "text", "dense")
SPARSE_TYPES = ("id", "id_list", "text")
FEATURE_KEYS = ("name", "type", "column", "dim", "max_vocab", "min_count", "table", "max_len", "buckets",
                "log1p", "fill", "lookup")
TOKEN_RE = re.compile(r"[a-z0-9]+")
STATE_VERSION = 1
TOKEN_CACHE_SIZE = 100_000   # texts whose hashed tokens an encoder keeps (LRU; LLM texts repeat across requests)
_INT64 = (-(1 << 63), 1 << 63)


@dataclass(frozen=True)
class FeatureConfig:
    """One feature of a spec (see the module docstring for the meaning of each field)."""

    name: str
    type: str
    column: str
    dim: int = 16
    max_vocab: int = 100_000
    min_count: int = 1
    table: str | None = None
    max_len: int = 32
    buckets: int = 4096
    log1p: bool = False
    fill: float | int | str | None = None
    lookup: tuple[str, str] | None = None

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class FeatureSpec:
    """A validated feature spec; ``source``/``lines`` let data errors point at the YAML line."""

    name: str
    features: tuple[FeatureConfig, ...]
    source: str | None = None
    lines: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def sparse(self) -> tuple[FeatureConfig, ...]:
        return tuple(f for f in self.features if f.type in SPARSE_TYPES)

    @property
    def dense(self) -> tuple[FeatureConfig, ...]:
        return tuple(f for f in self.features if f.type == "dense")

    @property
    def columns(self) -> list[str]:
        return sorted({f.column for f in self.features})

    @property
    def fit_columns(self) -> list[str]:
        """Columns fitting needs: the features' columns and the lookups' key/value columns."""
        return sorted({f.column for f in self.features} | {c for f in self.features if f.lookup for c in f.lookup})

    def to_dict(self) -> dict:
        feats = []
        for f in self.features:
            d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(f).items() if v is not None}
            feats.append(d)  # plain JSON types: from_state(state_dict()) works without a JSON round trip
        return {"name": self.name, "features": feats}

    def error(self, index: int, key: str, message: str, code: str) -> FieldError:
        path = f"features[{index}].{key}"
        line = self.lines.get(path) or self.lines.get(f"features[{index}]")
        return FieldError(path, message, code, self.source, line)


def feature_spec_from_dict(data, source: str | None = None, lines: dict | None = None) -> FeatureSpec:
    """Validate a spec mapping; raises :class:`ValidationError` listing every problem."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", ("name", "features"), required=("features",))
    name = as_str(errs, obj.get("name", "features"), "name", pattern=NAME_RE) or "features"
    items = as_list(errs, obj.get("features", []), "features", max_len=1000) or []
    feats: list[FeatureConfig] = []
    seen: dict[str, FeatureConfig] = {}
    for i, spec in enumerate(items):
        path = f"features[{i}]"
        spec = as_dict(errs, spec, path)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, path, FEATURE_KEYS, required=("name", "type"))
        fname = as_str(errs, spec.get("name"), join_path(path, "name"), pattern=NAME_RE) if "name" in spec else None
        ftype = as_str(errs, spec.get("type"), join_path(path, "type"), choices=FEATURE_TYPES) if "type" in spec else None
        column = as_str(errs, spec.get("column", fname or ""), join_path(path, "column"), max_len=256)
        if fname in seen:
            errs.add(join_path(path, "name"), f"duplicate feature name '{fname}'", "duplicate")
        kw = {}
        for key, lo, hi in (("dim", 1, 1024), ("max_vocab", 1, 50_000_000), ("min_count", 1, 1_000_000),
                            ("max_len", 1, 10_000), ("buckets", 1, 50_000_000)):
            if key in spec:
                v = as_number(errs, spec[key], join_path(path, key), lo=lo, hi=hi, integer=True)
                if v is not None:
                    kw[key] = v
        if "log1p" in spec and as_bool(errs, spec["log1p"], join_path(path, "log1p")) is not None:
            kw["log1p"] = spec["log1p"]
        if spec.get("fill") is not None:
            if ftype == "id" and isinstance(spec["fill"], str) and spec["fill"]:
                kw["fill"] = spec["fill"]
            elif ftype not in ("id", "dense", None):
                errs.add(join_path(path, "fill"), "only id and dense features take a fill value", "invalid")
            else:
                v = as_number(errs, spec["fill"], join_path(path, "fill"))
                if v is not None:
                    kw["fill"] = float(v) if ftype == "dense" or not float(v).is_integer() else int(v)
        if spec.get("table") is not None:
            table = as_str(errs, spec["table"], join_path(path, "table"))
            if table is not None:
                if ftype != "id_list":
                    errs.add(join_path(path, "table"), "only id_list features share a table", "invalid")
                else:
                    owners = {n: f for n, f in seen.items() if f.type == "id"}
                    if table not in owners:
                        errs.add(join_path(path, "table"),
                                 f"unknown id feature '{table}'{did_you_mean(table, owners)} "
                                 "(a shared table must be an earlier 'id' feature)", "unknown_table")
                    else:
                        kw["table"] = table
        if spec.get("lookup") is not None:
            lk = as_list(errs, spec["lookup"], join_path(path, "lookup"), max_len=2)
            if lk is not None:
                if ftype != "id_list":
                    errs.add(join_path(path, "lookup"), "only id_list features take a lookup", "invalid")
                elif len(lk) != 2 or not all(isinstance(c, str) and c for c in lk):
                    errs.add(join_path(path, "lookup"), "expected [key_column, value_column]", "type")
                elif "table" not in kw:
                    errs.add(join_path(path, "table"), "a lookup feature must share the table of its values' id "
                             "feature (e.g. table: topic)", "required")
                else:
                    kw["lookup"] = (lk[0], lk[1])
        if len(errs.items) == before and fname and ftype and column:
            f = FeatureConfig(fname, ftype, column, **kw)
            seen[fname] = f
            feats.append(f)
    if not items:
        errs.add("features", "at least one feature is required", "required")
    errs.raise_if_any(source, lines)
    return FeatureSpec(name, tuple(feats), source, dict(lines or {}))


def load_feature_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a feature spec YAML file (errors carry file:line)."""
    data, lines = read_yaml(path)
    return feature_spec_from_dict(data, source=str(path), lines=lines)


# ---------------------------------------------------------------- batches


class FeatureBatch:
    """Encoded rows: ``dense`` (N, D) float32 and per-key jagged ids, viewable as a KJT.

    ``select(indices)`` gathers rows (for mini-batches); ``kjt`` builds the
    ``KeyedJaggedTensor`` (keys in spec order, values int64, lengths int32).
    """

    def __init__(self, dense, keys, values, lengths):
        import torch

        self.dense = dense if isinstance(dense, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(dense))
        self.keys = list(keys)
        self.values = [np.asarray(v, dtype=np.int64) for v in values]
        self.lengths = [np.asarray(ln, dtype=np.int32) for ln in lengths]
        self._offsets = None

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @property
    def kjt(self):
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        values = np.concatenate(self.values) if self.values else np.zeros(0, np.int64)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
            stride=len(self))

    def select(self, idx) -> "FeatureBatch":
        """Rows ``idx`` (an int array or a slice) as a new batch."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx, dtype=np.int64)
        if self._offsets is None:
            self._offsets = [np.concatenate([[0], np.cumsum(ln, dtype=np.int64)]) for ln in self.lengths]
        values, lengths = [], []
        for v, ln, off in zip(self.values, self.lengths, self._offsets):
            sel = ln[idx]
            starts = off[idx]
            total = int(sel.sum())
            if total:
                rep = np.repeat(starts - np.concatenate([[0], np.cumsum(sel[:-1], dtype=np.int64)]), sel)
                values.append(v[rep + np.arange(total)])
            else:
                values.append(np.zeros(0, np.int64))
            lengths.append(sel)
        import torch

        return FeatureBatch(self.dense[torch.from_numpy(idx)], self.keys, values, lengths)


# ---------------------------------------------------------------- encoder


def _as_str_ids(values) -> np.ndarray:
    """Ids as strings (ints and strings alike: 12 and '12' are the same id)."""
    s = pd.Series(values, copy=False)
    if s.dtype.kind in "iu":
        return s.astype(str).to_numpy(dtype=object)
    if s.dtype.kind == "f":
        out = np.empty(len(s), dtype=object)
        ok = s.notna().to_numpy()
        vals = s.to_numpy()
        out[ok] = [str(int(v)) if float(v).is_integer() else str(v) for v in vals[ok]]
        out[~ok] = None
        return out
    if s.dtype != object and pd.api.types.is_string_dtype(s.dtype):       # pandas str / arrow strings
        return s.to_numpy(dtype=object, na_value=None)
    arr = s.to_numpy(dtype=object)
    kind = pd.api.types.infer_dtype(arr, skipna=True)
    if kind in ("string", "empty"):                                        # already str (or missing)
        if kind == "empty" or pd.isna(arr).any():
            arr = arr.copy()
            arr[pd.isna(arr)] = None
        return arr
    return np.array([None if v is None or (isinstance(v, float) and v != v) else str(v) for v in arr],
                    dtype=object)


def _flatten_lists(column: pd.Series, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of lists (lists, arrays, or None) -> flat values + per-row lengths (truncated)."""
    flat: list = []
    lengths = np.zeros(len(column), dtype=np.int32)
    for i, v in enumerate(column.to_numpy(dtype=object)):
        if v is None or (isinstance(v, float) and v != v):
            continue
        if isinstance(v, str):
            v = [t for t in v.split(",") if t]
        items = list(v)[:max_len]
        lengths[i] = len(items)
        flat.extend(items)
    return np.asarray(flat, dtype=object), lengths


_STR = frozenset((str,))
_STR_OR_NONE = frozenset((str, NoneType))
_INT_OR_FLOAT = frozenset((int, float))
_NO_TOKENS = np.zeros(0, np.int64)
_NO_TOKENS.flags.writeable = False


def _floats_fast(col, n: int):
    """A plain list of ints/floats (no bools, ints within int64) -> float64, as pandas reads it; an
    absent column -> all NaN; anything else -> None (use pandas)."""
    if col is None:
        return np.full(n, np.nan)
    types = set(map(type, col))
    if not types <= _INT_OR_FLOAT:
        return None
    if int in types:
        ints = [v for v in col if type(v) is int]
        if min(ints) < _INT64[0] or max(ints) >= _INT64[1]:
            return None
    return np.array(col, dtype=np.float64)


def tokenize(text) -> list[str]:
    """Lower-cased alphanumeric word tokens (the same at training and serving time)."""
    if not isinstance(text, str):
        return []
    return TOKEN_RE.findall(text.lower())


def hash_token(token: str, buckets: int) -> int:
    """A stable hash (crc32) of a token into rows 1..buckets (0 is reserved)."""
    return zlib.crc32(token.encode("utf-8")) % buckets + 1


class FeatureEncoder:
    """Fits vocabularies and scalers on training rows; encodes any rows the same way.

    >>> enc = FeatureEncoder(spec).fit(train_df)
    >>> batch = enc.transform(request_rows)      # FeatureBatch: .dense (N, D), .kjt
    >>> enc.save("encoder.json"); FeatureEncoder.load("encoder.json")
    """

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.vocabs: dict[str, list[str]] = {}       # table name -> ids (row = position + 1)
        self.scaler: dict[str, list[float]] = {}     # {"mean": [...], "scale": [...]}
        self.maps: dict[str, dict[str, str]] = {}    # lookup feature -> {key id: value id}
        self._index: dict[str, pd.Index] = {}
        self._rows: dict[str, dict[str, int]] = {}   # table -> {id: embedding row} (serving fast path)
        self._token_caches: dict[tuple[int, int], OrderedDict] = {}   # (buckets, max_len) -> {text: rows}, LRU
        self._token_lock = threading.Lock()
        self._fills: dict[str, str] = {}              # id feature -> its fill as an id string
        self.fitted = False

    # ---- schema checks
    def fillable_columns(self) -> set[str]:
        """Columns whose every feature has a ``fill``: they may be absent from rows to encode."""
        cols: dict[str, bool] = {}
        for f in self.spec.features:
            cols[f.column] = cols.get(f.column, True) and f.fill is not None and f.type in ("id", "dense")
        return {c for c, ok in cols.items() if ok}

    def check_columns(self, frame: pd.DataFrame, what: str = "data", optional: set | frozenset = frozenset()) -> None:
        """Every feature's column (but those in ``optional``) must exist in ``frame``; errors name the
        spec line."""
        errors = []
        cols = list(frame.columns)
        for i, f in enumerate(self.spec.features):
            if f.column not in frame.columns and f.column not in optional:
                errors.append(self.spec.error(
                    i, "column", f"feature '{f.name}' reads column '{f.column}', which is not in the {what}"
                    f"{did_you_mean(f.column, cols)} (columns: {', '.join(map(str, cols[:40]))})",
                    "unknown_column"))
        if errors:
            raise ValidationError(errors)

    # ---- fit
    def fit(self, frame: pd.DataFrame) -> "FeatureEncoder":
        from sklearn.preprocessing import StandardScaler

        self.check_columns(frame)
        missing = [c for c in self.spec.fit_columns if c not in frame.columns]
        if missing:
            raise ValidationError([FieldError("lookup", f"lookup column '{c}' is not in the data", "unknown_column",
                                              self.spec.source) for c in missing])
        counts: dict[str, pd.Series] = {}
        for f in self.spec.sparse:
            if f.lookup:
                key, value = (_as_str_ids(frame[c]) for c in f.lookup)
                pairs = pd.DataFrame({"k": key, "v": value}).dropna().drop_duplicates("k", keep="last")
                self.maps[f.name] = dict(zip(pairs["k"], pairs["v"]))
                continue   # its values count in their own id feature's vocabulary
            if f.type == "text":
                continue
            if f.type == "id":
                ids = pd.Series(_as_str_ids(frame[f.column])).dropna()
            else:
                flat, _ = _flatten_lists(frame[f.column], f.max_len)
                ids = pd.Series(_as_str_ids(flat)).dropna()
            vc = ids.value_counts()
            t = f.table_name
            counts[t] = vc if t not in counts else counts[t].add(vc, fill_value=0)
        owners = {f.table_name: f for f in self.spec.sparse if f.type == "id" or (f.type == "id_list" and not f.table)}
        for t, vc in counts.items():
            owner = owners[t]
            vc = vc[vc >= owner.min_count]
            # most frequent first; ties broken by id so the vocabulary is deterministic
            order = sorted(zip(vc.index, vc.to_numpy()), key=lambda kv: (-kv[1], kv[0]))[: owner.max_vocab]
            self.vocabs[t] = [k for k, _ in order]
        if self.spec.dense:
            x = self._dense_raw(frame)
            means = np.nanmean(x, axis=0) if len(x) else np.zeros(x.shape[1])
            means = np.where(np.isfinite(means), means, 0.0)
            x = np.where(np.isnan(x), means, x)
            scaler = StandardScaler().fit(x)
            self.scaler = {"mean": [float(v) for v in scaler.mean_], "scale": [float(v) for v in scaler.scale_],
                           "fill": [float(v) for v in means]}
        self._build_index()
        self.fitted = True
        return self

    def _build_index(self) -> None:
        # a free row (None) gets a placeholder no real id can equal, keeping every row at its position
        self._index = {}   # built on first use (``_lookup``)
        self._rows = {}

    @staticmethod
    def _dense_column(f: FeatureConfig, v: np.ndarray) -> np.ndarray:
        """One dense feature's raw float64 values -> log1p / fill applied (before standardising)."""
        if f.log1p:
            v = np.log1p(np.clip(v, 0, None))
        if f.fill is not None:
            v = np.where(np.isnan(v), f.fill, v)
        return v

    def _dense_raw(self, frame: pd.DataFrame) -> np.ndarray:
        cols = []
        for f in self.spec.dense:
            v = pd.to_numeric(frame[f.column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            cols.append(self._dense_column(f, v))
        return np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))

    def _dense_scaled(self, x: np.ndarray) -> np.ndarray:
        """Raw dense values (N, D) -> missing filled with the training mean, standardised, float32."""
        mean = np.asarray(self.scaler["mean"])
        x = np.where(np.isnan(x), np.asarray(self.scaler["fill"]), x)
        x = (x - mean) / np.asarray(self.scaler["scale"])
        return x.astype(np.float32)

    # ---- transform
    def num_embeddings(self, f: FeatureConfig) -> int:
        if f.type == "text":
            return f.buckets + 1
        return len(self.vocabs.get(f.table_name, ())) + 1

    @property
    def dense_dim(self) -> int:
        return len(self.spec.dense)

    @property
    def sparse_keys(self) -> list[str]:
        return [f.name for f in self.spec.sparse]

    def _lookup(self, table: str, ids) -> np.ndarray:
        index = self._index.get(table)
        if index is None:   # dropped by set_row: rebuilt on the next frame transform
            v = self.vocabs.get(table, ())
            index = self._index[table] = pd.Index([f"\x00free{i}" if k is None else k for i, k in enumerate(v)])
        idx = index.get_indexer(_as_str_ids(ids)) if len(ids) else np.zeros(0, np.int64)
        return (np.asarray(idx, dtype=np.int64) + 1)  # -1 (unknown/missing) -> 0, the OOV row

    def _token_cache(self, f: FeatureConfig) -> OrderedDict:
        key = (f.buckets, f.max_len)
        cache = self._token_caches.get(key)
        if cache is None:
            with self._token_lock:
                cache = self._token_caches.setdefault(key, OrderedDict())
        return cache

    def _tokens(self, text, f: FeatureConfig, cache: OrderedDict | None = None) -> np.ndarray:
        """The sorted, de-duplicated hashed token rows of one text (at most ``max_len``), cached (LRU).

        Lock-free: each OrderedDict call is atomic under the GIL; a concurrent eviction at worst
        makes a text computed twice."""
        cache = self._token_cache(f) if cache is None else cache
        hit = cache.get(text)
        if hit is not None:
            try:
                cache.move_to_end(text)
            except KeyError:   # evicted by another thread meanwhile
                pass
            return hit
        hit = np.array(sorted({hash_token(t, f.buckets) for t in tokenize(text)})[: f.max_len], dtype=np.int64)
        hit.flags.writeable = False   # shared by every batch that reads it
        cache[text] = hit
        while len(cache) > TOKEN_CACHE_SIZE:
            try:
                cache.popitem(last=False)
            except KeyError:
                break
        return hit

    def _text(self, column: pd.Series, f: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
        codes, uniques = pd.factorize(column, use_na_sentinel=True)
        cache = self._token_cache(f)
        per_unique = [self._tokens(text, f, cache) for text in uniques]
        ulen = np.array([len(h) for h in per_unique] + [0], dtype=np.int32)
        lengths = ulen[codes]                           # code -1 (missing) -> the trailing 0
        uoff = np.concatenate([[0], np.cumsum(ulen[:-1], dtype=np.int64)])
        flat = np.concatenate(per_unique) if per_unique else np.zeros(0, np.int64)
        total = int(lengths.sum())
        if not total:
            return np.zeros(0, np.int64), lengths
        starts = uoff[np.where(codes < 0, len(per_unique), codes)]
        rep = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]), lengths)
        return flat[rep + np.arange(total)], lengths

    def transform(self, frame: pd.DataFrame, allow_missing: bool = False) -> FeatureBatch:
        """Encode rows (a training frame or one request's candidates) into a :class:`FeatureBatch`.

        A spec column absent from ``frame`` is a :class:`ValidationError` naming it, unless
        ``allow_missing`` (serving): then it counts as missing in every row (OOV id, empty list,
        no tokens, the training mean) — exactly how a missing value in a present column encodes.
        """
        if not self.fitted:
            raise RuntimeError("FeatureEncoder.transform called before fit/load")
        if allow_missing:
            absent = [c for c in self.spec.columns if c not in frame.columns]
            if absent:
                frame = frame.assign(**{c: pd.Series([None] * len(frame), index=frame.index, dtype=object)
                                        for c in absent})
        fillable = self.fillable_columns()
        self.check_columns(frame, "rows", optional=fillable)
        absent = [c for c in fillable if c not in frame.columns]
        if absent:   # filled below, as a missing value in every row
            frame = frame.assign(**{c: pd.Series([None] * len(frame), index=frame.index, dtype=object)
                                    for c in absent})
        n = len(frame)
        keys, values, lengths = [], [], []
        for f in self.spec.sparse:
            v, ln = self._sparse(f, frame[f.column], n)
            keys.append(f.name)
            values.append(v)
            lengths.append(ln)
        if self.spec.dense:
            dense = self._dense_scaled(self._dense_raw(frame))
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        return FeatureBatch(dense, keys, values, lengths)

    def _sparse(self, f: FeatureConfig, column: pd.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One sparse feature of a frame column -> (int64 rows, int32 lengths)."""
        if f.type == "id":
            ids = column.to_numpy()
            if f.fill is not None:
                ids = _as_str_ids(ids)
                ids[pd.isna(ids)] = _as_str_ids([f.fill])[0]
            return self._lookup(f.table_name, ids), np.ones(n, dtype=np.int32)
        if f.type == "id_list":
            flat, ln = _flatten_lists(column, f.max_len)
            if f.lookup:
                flat = pd.Series(_as_str_ids(flat), dtype=object).map(self.maps.get(f.name, {})).to_numpy(object)
            return self._lookup(f.table_name, flat), ln
        return self._text(column, f)

    # ---- serving fast path: plain Python columns, no pandas on the common inputs
    def transform_columns(self, columns, n: int) -> FeatureBatch:
        """Encode one request's rows given as plain columns (``{column: list of n values}``).

        The serving-time twin of ``transform(pd.DataFrame(columns), allow_missing=True)``: the same
        tensors, bit for bit (tests/unit/test_serve_fastpath.py), without building a DataFrame. A
        spec column absent from ``columns`` is missing in every row. Columns of the common serving
        shapes (ids as strings or None, lists of string ids, texts, ints and floats) are encoded in
        plain Python/numpy; any other column goes through the pandas path of ``transform``.
        """
        if not self.fitted:
            raise RuntimeError("FeatureEncoder.transform_columns called before fit/load")
        for c in self.spec.columns:
            if columns.get(c) is not None and len(columns[c]) != n:
                raise ValueError(f"column '{c}' has {len(columns[c])} values, expected {n}")
        keys, values, lengths = [], [], []
        for f in self.spec.sparse:
            col = columns.get(f.column)
            got = self._sparse_fast(f, col, n)
            if got is None:   # an unusual column: the frame path, on a frame of that column alone
                got = self._sparse(f, pd.DataFrame({f.column: col})[f.column], n)
            keys.append(f.name)
            values.append(got[0])
            lengths.append(got[1])
        if self.spec.dense:
            cols = []
            for f in self.spec.dense:
                col = columns.get(f.column)
                v = _floats_fast(col, n)
                if v is None:
                    v = pd.to_numeric(pd.DataFrame({f.column: col})[f.column], errors="coerce").to_numpy(
                        dtype=np.float64, na_value=np.nan)
                cols.append(self._dense_column(f, v))
            dense = self._dense_scaled(np.stack(cols, axis=1))
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        return FeatureBatch(dense, keys, values, lengths)

    def set_row(self, table: str, row: int, key: str | None) -> str | None:
        """Give embedding ``row`` (1-based; row 0 stays the OOV row) of ``table`` to id ``key``, or free
        it (``None``); returns the id that held it. For a streaming trainer's growing vocabulary."""
        vocab = self.vocabs[table]
        old = vocab[row - 1]
        rows = self._row_table(table)
        if old is not None:
            rows.pop(old, None)
        vocab[row - 1] = key
        if key is not None:
            rows[key] = row
        self._index.pop(table, None)
        return old

    def prepare_serving(self) -> "FeatureEncoder":
        """Build the id -> row tables of ``transform_columns`` now (at model load) rather than on
        the first request."""
        for f in self.spec.sparse:
            if f.type != "text":
                self._row_table(f.table_name)
        return self

    def _row_table(self, table: str) -> dict:
        rows = self._rows.get(table)
        if rows is None:   # built once per encoder (a plain assignment: safe under threads)
            rows = {k: i + 1 for i, k in enumerate(self.vocabs.get(table, ())) if k is not None}
            self._rows[table] = rows
        return rows

    def _sparse_fast(self, f: FeatureConfig, col, n: int):
        """``_sparse`` for a plain list column of the common shapes, else None (use the frame path)."""
        if col is None:   # absent column: missing in every row
            col = (None,) * n
        if f.type == "id":
            types = set(map(type, col))
            if not types <= _STR_OR_NONE:
                return None
            if f.fill is not None and NoneType in types:
                fill = self._fills.get(f.name)
                if fill is None:
                    fill = self._fills[f.name] = _as_str_ids([f.fill])[0]
                col = [fill if v is None else v for v in col]
            get = self._row_table(f.table_name).get
            return (np.fromiter(map(get, col, repeat(0, n)), dtype=np.int64, count=n),
                    np.ones(n, dtype=np.int32))
        if f.type == "id_list":
            rows = self._row_table(f.table_name)
            mapping = self.maps.get(f.name, {}) if f.lookup else None

            def encode(v):
                if type(v) is str:
                    items = [t for t in v.split(",") if t][: f.max_len]
                elif type(v) in (list, tuple):
                    items = v[: f.max_len]
                    if not set(map(type, items)) <= _STR:
                        return None
                else:
                    return None
                if mapping is not None:
                    items = [mapping.get(t) for t in items]
                return np.fromiter(map(rows.get, items, repeat(0)), dtype=np.int64, count=len(items))

            try:   # one user history shared by every row? (list.count compares by identity first: C speed)
                same = n > 0 and col.count(col[0]) == n
            except (TypeError, ValueError):   # values that do not compare to a bool (arrays)
                same = False
            if same:
                if col[0] is None:
                    return np.zeros(0, np.int64), np.zeros(n, dtype=np.int32)
                enc = encode(col[0])
                if enc is None:
                    return None
                return np.tile(enc, n), np.full(n, len(enc), dtype=np.int32)
            lengths = np.zeros(n, dtype=np.int32)
            parts, seen = [], {}
            for i, v in enumerate(col):
                if v is None:
                    continue
                enc = seen.get(id(v))
                if enc is None:
                    enc = encode(v)
                    if enc is None:
                        return None
                    seen[id(v)] = enc
                lengths[i] = len(enc)
                parts.append(enc)
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            return flat, lengths
        # text
        if not set(map(type, col)) <= _STR_OR_NONE:
            return None
        cache = self._token_cache(f)
        get, to_end, tokens = cache.get, cache.move_to_end, self._tokens
        parts = []
        for v in col:
            if v is None:
                parts.append(_NO_TOKENS)
                continue
            hit = get(v)
            if hit is None:
                hit = tokens(v, f, cache)
            else:
                try:
                    to_end(v)
                except KeyError:   # evicted by another thread meanwhile
                    pass
            parts.append(hit)
        lengths = np.fromiter(map(len, parts), dtype=np.int32, count=n)
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return flat, lengths

    def fit_transform(self, frame: pd.DataFrame) -> FeatureBatch:
        return self.fit(frame).transform(frame)

    # ---- tables for the model
    def embedding_bag_configs(self) -> list:
        """One ``torchrec.EmbeddingBagConfig`` per table (shared tables list all their features)."""
        from torchrec import EmbeddingBagConfig
        from torchrec.modules.embedding_configs import PoolingType

        tables: dict[str, dict] = {}
        for f in self.spec.sparse:
            t = f.table_name
            if t not in tables:
                owner = f if not f.table else next(g for g in self.spec.sparse if g.name == t)
                tables[t] = {"num_embeddings": self.num_embeddings(owner), "embedding_dim": owner.dim,
                             "features": []}
            tables[t]["features"].append(f.name)
        return [EmbeddingBagConfig(num_embeddings=v["num_embeddings"], embedding_dim=v["embedding_dim"],
                                   name=f"t_{t}", feature_names=v["features"], pooling=PoolingType.MEAN)
                for t, v in tables.items()]

    # ---- state (JSON)
    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "spec": self.spec.to_dict(), "vocabs": self.vocabs,
                 "scaler": self.scaler}
        if self.maps:
            state["maps"] = self.maps
        return state

    @classmethod
    def from_state(cls, state: dict) -> "FeatureEncoder":
        enc = cls(feature_spec_from_dict(state["spec"], source="<encoder state>"))
        enc.vocabs = {k: list(v) for k, v in state["vocabs"].items()}
        enc.scaler = {k: list(v) for k, v in state.get("scaler", {}).items()}
        enc.maps = {k: dict(v) for k, v in state.get("maps", {}).items()}
        enc._build_index()
        enc.fitted = True
        return enc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FeatureEncoder":
        return cls.from_state(json.loads(Path(path).read_text(encoding="utf-8")))
