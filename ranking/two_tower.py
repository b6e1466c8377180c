"""TorchRec two-tower retrieval model: a user tower and an item tower whose L2-normalised vectors are
compared by inner product (= cosine), trained on served logs with in-batch negatives and the logQ
sampling-bias correction of Yi et al. 2019 ("Sampling-bias-corrected neural modeling for large corpus
item recommendations", RecSys). ``stratarank train-retrieval --config conf/train/two_tower_small.yaml``.

Config format::

    name: two_tower_small                # registry name
    data:                                # the rankers' loaders (ranking/train.py), split by time
      loader: table                      # table | sim (a file, or a world's folder: its impressions.parquet)
                                         # | served (the joiner's examples: from_hour / to_hour)
      path: runs/small
      time_column: ts
      valid_fraction: 0.2                # the last 20% of the rows in time are held out
    positive: click                      # or [click, like]: an impression with any of them is a positive
    model:
      embedding_dim: 32                  # every table
      buckets: {user_id: 20000, item_id: 50000, text: 20000, topic: 1024, creator: 10000, generator: 64}
      layers: [64]                       # hidden layers of each tower's MLP
      output_dim: 32                     # the vectors' dimension
      temperature: 0.05                  # logits = cosine / temperature
      item_id_dropout: 0.3               # share of training rows whose item id is dropped (cold-start)
      topic_dropout: 0.2                 # ... whose topic is dropped (the text must carry it: encode_text)
      max_recent: 20                     # recent items the user tower reads (most recent first)
      max_tokens: 32                     # text tokens the item tower reads
      logq: count                        # count | stream | none (the sampling-bias correction)
      logq_alpha: 0.05                   # stream: the gap estimate's learning rate
      logq_buckets: 1048576              # stream: rows of its hashed arrays
      item_bias: false                   # true: a learnt logit per item (its quality) beside the cosine
      prior_score: false                 # true: the item tower reads the generator's prior_score
      freshness_half_life_hours: null    # a number: a learnt freshness term w * 2^(-age / h), h learnt
                                         # from this start (the data needs an age_hours column)
      impression_loss: 0                 # weight of a pointwise loss on every impression (see below)
    training: {epochs: 8, batch_size: 256, lr: 0.003, embedding_lr: 0.05, weight_decay: 0.0, seed: 0, threads: 1}
    eval:
      k: [50, 100]                       # recall@K on the held-out split
      catalogue: frame                   # frame (every item of the data) | held_out (the items served in the
                                         # held-out rows: those alive then, in a world whose items expire)
    registry: registry

The towers (one weighted ``EmbeddingBagCollection``, sum pooling with per-id weights that add up to one
in a bag, i.e. a (weighted) mean):

- user tower: ``user_id``, ``recent_items`` (the item-id table, mean of the user's recent items) and
  ``user_topics`` (the topic table, weighted by the user's topic affinity) -> MLP -> ``output_dim``;
- item tower: ``item_id``, ``text`` (hashed tokens, mean), ``topic``, ``creator``, ``generator`` (the LLM's
  model name) and dense inputs: ``is_llm`` (source ``llm`` or a generator) and, with ``prior_score: true``,
  the generator's ``prior_score`` and whether there is one -> MLP -> ``output_dim`` (+ 1 with a bias).

Every value is hashed (``ranking.features.hash_token``, crc32: stable across processes) into its table's
``buckets`` rows; row 0 is never used, a missing value is an empty bag (zeros). The id tables (items,
users, creators) start at zero, so an id training never saw adds nothing: a brand-new item's vector
is its content's alone, exactly what the towers learnt from the rows whose item id was dropped
(``item_id_dropout``). Unless its hash collides with a trained id: size ``buckets.item_id`` a few times
the catalogue (the collision probability is about trained ids / buckets).

Topic affinity means the same in training and serving: the user's recent engagement spread over topics,
weights normalised to sum to one. Serving reads the near-line store's decayed ``topic_affinity``; training
derives it from the topics of the row's ``user_recent_items`` (each counted once per occurrence).

Sampling-bias correction (``model.logq``): a batch holds positives (user, item) drawn in proportion to
the items' positive counts, so popular items are the negatives of most rows; the softmax then learns
``log p(item | user) - log q(item)``. Subtracting ``log q(item)`` from each logit (positive and negatives)
makes it estimate the full softmax. ``count`` (the default) takes ``q`` as the item's share of the
training positives: exact for this trainer, which shuffles a fixed set of rows each epoch (each batch
slot is an independent draw with those probabilities). ``stream`` is the paper's streaming frequency
estimation (hashed arrays of each item's last step and an exponential moving average of the steps
between its occurrences, ``q = 1 / gap``): it needs no pass over the data and follows a changing
distribution, which a streaming trainer needs; ``none`` leaves the logits as they are (ablation).
Accidental hits (another row of the batch with the same item) are masked out of each row's negatives.

Item quality and freshness (``item_bias``, ``freshness_half_life_hours``): the logit of (user, item) at
time t is ``cos(u, v) / temperature + b(item) + w * 2^(-age(item, t) / h)`` (``w`` and ``h`` learnt; an
in-batch negative born after the row's time is masked: it was not there). Both extras survive
inner-product search exactly: ``2^(-(t - born) / h) = 2^(-(t - t0) / h) * 2^((born - t0) / h)`` splits
into a query-side factor of the time and an item-side factor of the birth, for any reference time
``t0``. Item vectors are then ``[v, b, 2^((born - t0) / h)]`` and queries ``[u / temperature, 1,
w * 2^(-(t - t0) / h)]`` (``TwoTowerEncoder.dim`` = ``output_dim`` + 2), so one inner product is the
model's whole logit; an index re-bases ``t0`` (re-encodes) before the item factors grow large
(:meth:`TwoTowerEncoder.rebase_due`). Without the extras vectors are the unit ``v`` and ``u``.

Exposure (``impression_loss``): the softmax over positives learns ``log p(item | user)``, which in
logged data is the item's exposure times its click rate; under a random or a generator's policy the
exposure is chance (how long an item was alive, how often it was drawn), not quality. A weight above 0
adds a logistic loss on every training impression, clicked or not: ``sigmoid(logit(user, item, t) +
position bias)`` against the click, which pins the logit to the click rate itself (the position biases
are training-only; the logged position is ``position``, 1-based).

Evaluation: each held-out positive is a query (the user as served then); recall@K is the share of them
whose item is among the K items of highest inner product over the catalogue of the frame (every distinct
item of train and held-out rows; exact search), next to popularity (the items by training positives);
ties count in expectation of a random order. Queries whose item had no training positive are reported
apart (``cold``): popularity cannot retrieve them.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from strategy.checks import NAME_RE, as_bool, as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, FieldError, ValidationError

from .features import hash_token, tokenize
from .train import DataConfig, _read_table, _resolve

TOP_KEYS = ("name", "data", "positive", "model", "training", "eval", "registry")
DATA_KEYS = ("loader", "path", "time_column", "valid_fraction", "from_hour", "to_hour")
LOADERS = ("table", "sim", "served")
LOGQ = ("count", "stream", "none")
MODEL_KEYS = ("embedding_dim", "buckets", "layers", "output_dim", "temperature", "item_id_dropout", "topic_dropout",
              "max_recent", "max_tokens", "logq", "logq_alpha", "logq_buckets", "item_bias", "prior_score",
              "freshness_half_life_hours", "impression_loss")
POSITION_COLUMN = "position"
MAX_POSITION = 64          # the impression loss's position biases: 1..64 (later positions share the last)
REBASE_HALF_LIVES = 4.0    # re-base an index's t0 once the newest item's factor could pass 2^4
TRAINING_KEYS = ("epochs", "batch_size", "lr", "embedding_lr", "weight_decay", "seed", "threads")
EVAL_KEYS = ("k", "catalogue")
CATALOGUES = ("frame", "held_out")
CONFIG_FILE = "config.json"

# one table per hashed value space: (table, its buckets field, the features that read it)
TABLES = (("item", "item_id", ("item_id", "recent_items")),
          ("user", "user_id", ("user_id",)),
          ("topic", "topic", ("topic", "user_topics")),
          ("text", "text", ("text",)),
          ("creator", "creator", ("creator",)),
          ("generator", "generator", ("generator",)))
ZERO_INIT = ("item", "user", "creator")   # id tables: an id training never saw adds nothing
KEYS = tuple(f for _, _, feats in TABLES for f in feats)
USER_FEATURES = ("user_id", "recent_items", "user_topics")
ITEM_FEATURES = ("item_id", "text", "topic", "creator", "generator")
# the frame's columns each item / user input comes from
ITEM_COLUMNS = {"item_id": "item_id", "source": "source", "creator_id": "creator_id", "topic": "topic",
                "text": "text", "generator": "generator", "prior_score": "prior_score"}
AGE_COLUMN = "age_hours"   # the item's age at the row's time: what freshness learns from
USER_COLUMNS = {"user_id": "user_id", "recent_items": "user_recent_items"}


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class HashBuckets:
    """Rows of each hashed table (plus row 0, never used: a missing value is an empty bag)."""

    user_id: int = 50_000
    item_id: int = 200_000
    text: int = 20_000
    topic: int = 1_024
    creator: int = 20_000
    generator: int = 64


@dataclass(frozen=True)
class TowerConfig:
    """Both towers' shape and the loss (see the module docstring)."""

    embedding_dim: int = 32
    buckets: HashBuckets = HashBuckets()
    layers: tuple[int, ...] = (64,)
    output_dim: int = 32
    temperature: float = 0.05
    item_id_dropout: float = 0.3
    topic_dropout: float = 0.2
    max_recent: int = 20
    max_tokens: int = 32
    logq: str = "count"
    logq_alpha: float = 0.05
    logq_buckets: int = 1 << 20
    item_bias: bool = False
    prior_score: bool = False
    freshness_half_life_hours: float | None = None
    impression_loss: float = 0.0

    @property
    def extras(self) -> int:
        """Columns the served vectors carry beside the ``output_dim`` of the towers (bias, freshness)."""
        return int(self.item_bias or self.freshness_half_life_hours is not None) + int(
            self.freshness_half_life_hours is not None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> "TowerConfig":
        kw = dict(data)
        kw["buckets"] = HashBuckets(**kw.get("buckets", {}))
        kw["layers"] = tuple(kw.get("layers", ()))
        return cls(**kw)


@dataclass(frozen=True)
class TwoTowerTraining:
    """Adagrad (``embedding_lr``) on the tables, Adam (``lr``) on the MLPs, as the rankers train."""

    epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    embedding_lr: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1


@dataclass(frozen=True)
class TwoTowerConfig:
    name: str
    data: DataConfig
    positive: tuple[str, ...]
    model: TowerConfig = TowerConfig()
    training: TwoTowerTraining = TwoTowerTraining()
    k: tuple[int, ...] = (50, 100)
    catalogue: str = "frame"       # eval: search every item of the frame, or those served in the held-out rows
    registry: str = "registry"
    source: str | None = None
    lines: dict = field(default_factory=dict, repr=False, compare=False)

    def error(self, path: str, message: str, code: str) -> FieldError:
        """A FieldError at ``path`` of this config's file (with its line when known)."""
        from strategy.errors import _line_for

        return FieldError(path, message, code, self.source, _line_for(path, self.lines) if self.lines else None)

    def to_dict(self) -> dict:
        return {"name": self.name, "data": asdict(self.data), "positive": list(self.positive),
                "model": self.model.to_dict(), "training": asdict(self.training),
                "eval": {"k": list(self.k), "catalogue": self.catalogue},
                "registry": self.registry, "source": self.source}


def _numbers(errs: Errors, obj: dict, path: str, ranges: dict) -> dict:
    """``{key: number}`` of the keys of ``obj`` that ``ranges`` names: ``{key: (lo, hi, integer, lo_open)}``."""
    out = {}
    for key, (lo, hi, integer, lo_open) in ranges.items():
        if obj.get(key) is not None:
            v = as_number(errs, obj[key], f"{path}.{key}", lo=lo, hi=hi, integer=integer, lo_open=lo_open)
            if v is not None:
                out[key] = v
    return out


def _layers(errs: Errors, value, path: str) -> tuple[int, ...]:
    items = as_list(errs, value, path, max_len=16) or []
    return tuple(as_number(errs, v, f"{path}[{i}]", lo=1, hi=8192, integer=True) for i, v in enumerate(items))


def _model_from(errs: Errors, value) -> TowerConfig:
    obj = as_dict(errs, value, "model") or {}
    check_keys(errs, obj, "model", MODEL_KEYS)
    kw = _numbers(errs, obj, "model", {
        "embedding_dim": (1, 1024, True, False), "output_dim": (1, 4096, True, False),
        "temperature": (0, 10, False, True), "item_id_dropout": (0, 0.95, False, False),
        "topic_dropout": (0, 0.95, False, False),
        "max_recent": (1, 1000, True, False), "max_tokens": (1, 1000, True, False),
        "logq_alpha": (0, 1, False, True), "logq_buckets": (1, 1 << 30, True, False),
        "impression_loss": (0, 1000, False, False)})
    if "layers" in obj:
        kw["layers"] = _layers(errs, obj["layers"], "model.layers")
    if "logq" in obj:
        kw["logq"] = as_str(errs, obj["logq"], "model.logq", choices=LOGQ)
    for key in ("item_bias", "prior_score"):
        if obj.get(key) is not None:
            kw[key] = as_bool(errs, obj[key], f"model.{key}")
    if obj.get("freshness_half_life_hours") is not None:
        kw["freshness_half_life_hours"] = as_number(errs, obj["freshness_half_life_hours"],
                                                    "model.freshness_half_life_hours", lo=0.01, hi=100_000,
                                                    lo_open=False)
    if "buckets" in obj:
        b = as_dict(errs, obj["buckets"], "model.buckets") or {}
        names = tuple(HashBuckets.__dataclass_fields__)
        check_keys(errs, b, "model.buckets", names)
        ranges = dict.fromkeys(names, (1, 1 << 28, True, False))
        kw["buckets"] = HashBuckets(**_numbers(errs, b, "model.buckets", ranges))
    return TowerConfig(**{k: v for k, v in kw.items() if v is not None})


def _data_from(errs: Errors, value, base: Path | None) -> DataConfig | None:
    d = as_dict(errs, value, "data")
    if d is None:
        return None
    before = len(errs.items)
    check_keys(errs, d, "data", DATA_KEYS, required=("path",))
    loader = as_str(errs, d.get("loader", "table"), "data.loader", choices=LOADERS)
    path = as_str(errs, d["path"], "data.path") if "path" in d else None
    tcol = as_str(errs, d["time_column"], "data.time_column") if d.get("time_column") is not None else "ts"
    vf = as_number(errs, d.get("valid_fraction", 0.2), "data.valid_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
    hours = {}
    for key in ("from_hour", "to_hour"):
        if d.get(key) is None:
            continue
        if loader != "served":
            errs.add(f"data.{key}", f"only for loader: served (this one is '{loader}')", "invalid")
        else:
            from .datasets import HOUR_RE

            hours[key] = as_str(errs, str(d[key]), f"data.{key}", pattern=HOUR_RE)
    if len(errs.items) != before:
        return None
    return DataConfig(loader, _resolve(path, base), tcol, float(vf), 0.0, **hours)


def two_tower_config_from_dict(data, source: str | None = None, lines: dict | None = None) -> TwoTowerConfig:
    """Validate a two-tower config mapping: every problem at once, each naming file:line, the field and
    (for a choice) the allowed values."""
    base = Path(source).resolve().parent if source and not source.startswith("<") else None
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", TOP_KEYS, required=("name", "data", "positive"))
    name = as_str(errs, obj["name"], "name", pattern=NAME_RE) if "name" in obj else None
    data_cfg = _data_from(errs, obj["data"], base) if "data" in obj else None
    positive = ()
    if "positive" in obj:
        value = obj["positive"]
        if isinstance(value, str):
            positive = (value,)
        else:
            items = as_list(errs, value, "positive", max_len=16)
            if items is not None and not items:
                errs.add("positive", "at least one label column is required", "required")
            positive = tuple(as_str(errs, v, f"positive[{i}]") for i, v in enumerate(items or ()))
            if len(set(positive)) != len(positive):
                errs.add("positive", "a label column is listed twice", "duplicate")
    model = _model_from(errs, obj.get("model") or {})
    t = as_dict(errs, obj.get("training") or {}, "training") or {}
    check_keys(errs, t, "training", TRAINING_KEYS)
    training = TwoTowerTraining(**_numbers(errs, t, "training", {
        "epochs": (1, 10_000, True, False), "batch_size": (2, 1 << 16, True, False), "lr": (0, 10, False, True),
        "embedding_lr": (0, 100, False, True), "weight_decay": (0, 10, False, False),
        "seed": (0, 2 ** 31, True, False), "threads": (1, 256, True, False)}))
    e = as_dict(errs, obj.get("eval") or {}, "eval") or {}
    check_keys(errs, e, "eval", EVAL_KEYS)
    k = (50, 100)
    if "k" in e:
        items = as_list(errs, e["k"], "eval.k", max_len=16) or []
        if not items:
            errs.add("eval.k", "at least one K is required", "required")
        k = tuple(sorted({v for v in (as_number(errs, v, f"eval.k[{i}]", lo=1, hi=1_000_000, integer=True)
                                     for i, v in enumerate(items)) if v is not None}))
    catalogue = as_str(errs, e.get("catalogue", "frame"), "eval.catalogue", choices=CATALOGUES) or "frame"
    registry = as_str(errs, obj.get("registry", "registry"), "registry") or "registry"
    errs.raise_if_any(source, lines)
    return TwoTowerConfig(name, data_cfg, positive, model, training, k, catalogue, registry, source,
                          dict(lines or {}))


def load_two_tower_config(path: str | Path) -> TwoTowerConfig:
    """Read (``yaml.safe_load``) and validate a two-tower config file."""
    data, lines = read_yaml(path)
    return two_tower_config_from_dict(data, source=str(path), lines=lines)


# ---------------------------------------------------------------- encoding: columns -> weighted jagged ids


class Jagged:
    """Hashed ids of N rows per feature key, with their pooling weights: a weighted KJT in numpy.

    ``values[k]`` int64 and ``weights[k]`` float32 (sum(lengths[k]),), ``lengths[k]`` int32 (N,), for
    every key of :data:`KEYS` (a key no input fills has zero lengths).
    """

    def __init__(self, n: int, parts: Mapping[str, tuple]):
        self.n = int(n)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(self.n, np.int32))
        self.values, self.weights, self.lengths = {}, {}, {}
        for key in KEYS:
            v, w, ln = parts.get(key, empty)
            self.values[key], self.weights[key], self.lengths[key] = v, w, ln
        self._offsets = None

    def __len__(self) -> int:
        return self.n

    def select(self, idx: np.ndarray) -> "Jagged":
        """Rows ``idx`` (int array) as a new Jagged."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._offsets is None:
            self._offsets = {k: np.concatenate([[0], np.cumsum(ln, dtype=np.int64)]) for k, ln in self.lengths.items()}
        parts = {}
        for k in KEYS:
            sel = self.lengths[k][idx]
            total = int(sel.sum())
            if total:
                starts = self._offsets[k][idx]
                pos = np.repeat(starts - np.concatenate([[0], np.cumsum(sel[:-1], dtype=np.int64)]), sel)
                pos = pos + np.arange(total)
                parts[k] = (self.values[k][pos], self.weights[k][pos], sel)
            else:
                parts[k] = (np.zeros(0, np.int64), np.zeros(0, np.float32), sel)
        return Jagged(len(idx), parts)

    def drop_rows(self, key: str, drop: np.ndarray) -> "Jagged":
        """The same rows with ``key``'s ids of rows where ``drop`` (bool (N,)) is set weighted 0 (pooled
        to zeros, as an empty bag; no gradient reaches them)."""
        row = np.repeat(np.arange(self.n), self.lengths[key])
        out = Jagged(self.n, {k: (self.values[k], self.weights[k], self.lengths[k]) for k in KEYS})
        out.weights[key] = np.where(drop[row], np.float32(0), self.weights[key]).astype(np.float32)
        return out

    def kjt(self):
        """The ``KeyedJaggedTensor`` (keys in :data:`KEYS` order, with weights)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(
            keys=list(KEYS), values=torch.from_numpy(np.concatenate([self.values[k] for k in KEYS])),
            weights=torch.from_numpy(np.concatenate([self.weights[k] for k in KEYS])),
            lengths=torch.from_numpy(np.concatenate([self.lengths[k] for k in KEYS])), stride=self.n)


SMALL = 64   # inputs up to this many values are hashed one by one


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or v is pd.NA or v == ""


def _hash_values(values: Sequence, buckets: int) -> np.ndarray:
    """The row (1..buckets) of each value as a string id; 0 for a missing one (None, NaN, '')."""
    if len(values) <= SMALL:   # one request's few ids: a plain loop beats pandas' factorize
        return np.array([0 if _missing(v) else hash_token(str(v), buckets) for v in values], dtype=np.int64)
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    rows = np.array([0 if _missing(u) else hash_token(str(u), buckets) for u in uniques] + [0], dtype=np.int64)
    return rows[codes]


def _single(values: Sequence, buckets: int) -> tuple:
    h = _hash_values(values, buckets)
    keep = h > 0
    return h[keep], np.ones(int(keep.sum()), np.float32), keep.astype(np.int32)


def _as_list(v) -> list:
    if v is None or isinstance(v, (str, bytes, float, int, dict)):
        return []
    return [x for x in list(v) if not _missing(x)]


def _mean_bag(lists: Sequence, buckets: int, max_len: int) -> tuple:
    """Each row's first ``max_len`` ids, each weighted 1 / their count (a mean)."""
    rows = [_as_list(v)[:max_len] for v in lists]
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    flat = [x for r in rows for x in r]
    values = _hash_values(flat, buckets) if flat else np.zeros(0, np.int64)
    weights = np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
    return values, weights, lengths


def _weighted_bag(dicts: Sequence, buckets: int) -> tuple:
    """Each row's ``{key: weight}`` with positive finite weights, normalised to sum to one."""
    keys, weights, lengths = [], [], np.zeros(len(dicts), np.int32)
    for r, d in enumerate(dicts):
        if not isinstance(d, Mapping):
            continue
        items = [(k, float(w)) for k, w in d.items() if not _missing(k) and isinstance(w, (int, float))
                 and not isinstance(w, bool) and math.isfinite(w) and w > 0]
        total = sum(w for _, w in items)
        keys += [k for k, _ in items]
        weights += [w / total for _, w in items]
        lengths[r] = len(items)
    values = _hash_values(keys, buckets) if keys else np.zeros(0, np.int64)
    return values, np.array(weights, dtype=np.float32), lengths


def _text_bag(texts: Sequence, buckets: int, max_tokens: int) -> tuple:
    """Each row's first ``max_tokens`` hashed tokens (``ranking.features.tokenize``), a mean."""
    codes, uniques = pd.factorize(pd.Series(texts, dtype=object), use_na_sentinel=True)
    tokens = [np.array([hash_token(t, buckets) for t in tokenize(u)[:max_tokens]], dtype=np.int64) for u in uniques]
    tokens.append(np.zeros(0, np.int64))
    per_row = [tokens[c] for c in codes]
    lengths = np.array([len(t) for t in per_row], dtype=np.int32)
    values = np.concatenate(per_row) if per_row else np.zeros(0, np.int64)
    weights = np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
    return values, weights, lengths


def generator_name(value) -> str | None:
    """The generating model's name: ``None``, a name, or a dict with ``model`` (the /v1/rank candidate shape)."""
    if isinstance(value, Mapping):
        value = value.get("model")
    return None if _missing(value) or not isinstance(value, str) else value


def dense_width(cfg: TowerConfig) -> int:
    """Dense inputs of the item tower: ``is_llm``, then ``prior_score`` and ``has_prior`` when configured."""
    return 3 if cfg.prior_score else 1


def _prior(value) -> float:
    """A generator's prior score in [0, 1] (a number, or a dict with ``prior_score``), else NaN."""
    if isinstance(value, Mapping):
        value = value.get("prior_score")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return min(1.0, max(0.0, float(value)))


def item_parts(cfg: TowerConfig, cols: Mapping[str, Sequence], n: int) -> tuple[dict, np.ndarray]:
    """The item tower's features of ``n`` items from columns (``item_id``, ``source``, ``creator_id``,
    ``topic``, ``text``, ``generator``, ``prior_score``; an absent column is missing for every item) ->
    (Jagged parts, dense float32 (n, :func:`dense_width`))."""
    b = cfg.buckets
    none = [None] * n
    raw = cols.get("generator", none)
    generators = [generator_name(g) for g in raw]
    source = cols.get("source", none)
    is_llm = np.array([s == "llm" or g is not None for s, g in zip(source, generators)], dtype=np.float32)
    dense = is_llm[:, None]
    if cfg.prior_score:
        given = cols.get("prior_score", none)
        prior = np.array([_prior(p) for p in given], dtype=np.float32)
        from_generator = np.isnan(prior)
        prior[from_generator] = [_prior(g) for g, f in zip(raw, from_generator) if f]
        has = ~np.isnan(prior)
        dense = np.stack([is_llm, np.where(has, prior, 0.0), has], axis=1).astype(np.float32)
    parts = {"item_id": _single(cols.get("item_id", none), b.item_id),
             "text": _text_bag(cols.get("text", none), b.text, cfg.max_tokens),
             "topic": _single(cols.get("topic", none), b.topic),
             "creator": _single(cols.get("creator_id", none), b.creator),
             "generator": _single(generators, b.generator)}
    return parts, np.ascontiguousarray(dense, dtype=np.float32)


def user_parts(cfg: TowerConfig, cols: Mapping[str, Sequence], n: int) -> dict:
    """The user tower's features of ``n`` users from columns ``user_id``, ``recent_items`` (lists, most
    recent first) and ``topic_affinity`` (dicts topic -> weight)."""
    b = cfg.buckets
    none = [None] * n
    return {"user_id": _single(cols.get("user_id", none), b.user_id),
            "recent_items": _mean_bag(cols.get("recent_items", none), b.item_id, cfg.max_recent),
            "user_topics": _weighted_bag(cols.get("topic_affinity", none), b.topic)}


def topic_affinity_from_recent(recent: Sequence, item_topic: Mapping[str, str], max_recent: int) -> list[dict]:
    """Training's topic affinity of each row: the topics of its first ``max_recent`` recent items (items of
    unknown topic skipped), each occurrence counting one, normalised to sum to one."""
    out = []
    for v in recent:
        counts: dict = {}
        for item in _as_list(v)[:max_recent]:
            t = item_topic.get(item)
            if t is not None:
                counts[t] = counts.get(t, 0) + 1
        total = sum(counts.values())
        out.append({t: c / total for t, c in counts.items()})
    return out


# ---------------------------------------------------------------- the model


def embedding_bag_configs(cfg: TowerConfig) -> list:
    """One ``torchrec.EmbeddingBagConfig`` per table of :data:`TABLES` (sum pooling of weighted ids)."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    return [EmbeddingBagConfig(num_embeddings=getattr(cfg.buckets, bucket) + 1, embedding_dim=cfg.embedding_dim,
                               name=f"t_{table}", feature_names=list(features), pooling=PoolingType.SUM)
            for table, bucket, features in TABLES]


class TwoTowerModel(nn.Module):
    """A weighted ``EmbeddingBagCollection`` (the item-id table shared by ``item_id`` and ``recent_items``,
    the topic table by ``topic`` and ``user_topics``) and two MLP towers.

    ``forward(kjt, dense)`` -> (user vectors (N, output_dim), item vectors (N, output_dim), item biases
    (N,)): vectors L2-normalised, biases 0 without ``item_bias``; ``users(kjt)`` / ``items(kjt, dense)``
    compute one side. With ``freshness_half_life_hours``, :meth:`freshness` is the learnt age term.
    """

    def __init__(self, cfg: TowerConfig, device=None):
        super().__init__()
        from torchrec import EmbeddingBagCollection

        from .models import mlp

        self.config = cfg
        self.ebc = EmbeddingBagCollection(tables=embedding_bag_configs(cfg), is_weighted=True, device=device)
        with torch.no_grad():
            for table, bag in self.ebc.embedding_bags.items():
                bag.sparse = True   # Adagrad then updates only the rows a batch touched, not whole tables
                if table.removeprefix("t_") in ZERO_INIT:
                    bag.weight.zero_()
                else:
                    bag.weight.normal_(0.0, 0.1)
        d, layers = cfg.embedding_dim, list(cfg.layers)

        def tower(in_dim: int) -> nn.Sequential:
            return nn.Sequential(mlp(in_dim, layers), nn.Linear(layers[-1] if layers else in_dim, cfg.output_dim))

        self.user_tower = tower(len(USER_FEATURES) * d)
        self.item_tower = tower(len(ITEM_FEATURES) * d + dense_width(cfg))
        if cfg.item_bias:   # one more output: the item's logit beside the cosine
            last = self.item_tower[-1]
            self.item_tower[-1] = nn.Linear(last.in_features, cfg.output_dim + 1)
        if cfg.impression_loss > 0:
            self.position_bias = nn.Parameter(torch.full((MAX_POSITION + 1,), -2.0))
        if cfg.freshness_half_life_hours is not None:
            self.fresh_weight = nn.Parameter(torch.tensor(0.5))
            self.log_half_life = nn.Parameter(torch.tensor(math.log(cfg.freshness_half_life_hours)))

    def _users(self, pooled: dict) -> torch.Tensor:
        x = torch.cat([pooled[f] for f in USER_FEATURES], dim=1)
        return nn.functional.normalize(self.user_tower(x), dim=1)

    def _items(self, pooled: dict, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([pooled[f] for f in ITEM_FEATURES] + [dense.reshape(len(dense), -1)], dim=1)
        out = self.item_tower(x)
        d = self.config.output_dim
        bias = out[:, d] if self.config.item_bias else out.new_zeros(len(out))
        return nn.functional.normalize(out[:, :d], dim=1), bias

    def users(self, kjt) -> torch.Tensor:
        return self._users(self.ebc(kjt).to_dict())

    def items(self, kjt, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._items(self.ebc(kjt).to_dict(), dense)

    def forward(self, kjt, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.ebc(kjt).to_dict()
        return (self._users(pooled), *self._items(pooled, dense))

    @property
    def half_life_hours(self) -> float | None:
        return None if self.config.freshness_half_life_hours is None else float(self.log_half_life.detach().exp())

    def freshness(self, age_hours: torch.Tensor) -> torch.Tensor:
        """``w * 2^(-max(age, 0) / h)``, the learnt logit of an item's age (hours)."""
        return self.fresh_weight * torch.exp2(-age_hours.clamp(min=0.0) / self.log_half_life.exp())


# ---------------------------------------------------------------- loss and the sampling-bias correction


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_keys: torch.Tensor,
                          log_q: torch.Tensor, temperature: float, extra: torch.Tensor | None = None,
                          absent: torch.Tensor | None = None) -> torch.Tensor:
    """Mean in-batch softmax cross-entropy of B positive pairs (row i's positive is item i).

    ``users``, ``items``: (B, D); ``item_keys`` (B,) int ids of the items (rows with the same item are
    accidental hits: masked out of each other's negatives); ``log_q`` (B,) log sampling probability of
    each item, subtracted from its column's logits (Yi et al. 2019: ``s(x, y) / T - log q(y)``);
    ``extra`` (B, B) logits added (item bias, freshness at each row's time); ``absent`` (B, B) bool:
    items that did not exist at the row's time, masked out.
    """
    logits = users @ items.T / temperature - log_q[None, :]
    if extra is not None:
        logits = logits + extra
    same = item_keys[:, None] == item_keys[None, :]
    same.fill_diagonal_(False)
    if absent is not None:
        same |= absent & ~torch.eye(len(same), dtype=torch.bool)
    logits = logits.masked_fill(same, float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(len(users)))


class StreamingFrequency:
    """Yi et al. 2019's streaming frequency estimation (their Algorithm 2): per hashed item, the step it
    was last seen (``last``) and an exponential moving average of the steps between its occurrences
    (``gap``, learning rate ``alpha``); ``q = 1 / gap`` estimates how often it appears per step (batch).

    Within a batch an item seen k times is updated k times in order (one real gap, then k - 1 gaps of
    0), so ``q`` counts its multiplicity; an item's first sighting sets ``gap`` to the steps since the
    start, as if last seen at step -1.
    """

    def __init__(self, buckets: int, alpha: float):
        self.buckets, self.alpha = int(buckets), float(alpha)
        self.last = np.full(self.buckets, -1.0)
        self.gap = np.zeros(self.buckets)

    def update(self, item_ids: Sequence, step: int) -> np.ndarray:
        """Record the batch of step ``step`` and return the log ``q`` of each of its items (B,)."""
        rows = _hash_values(list(item_ids), self.buckets) - 1
        uniq, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
        a = self.alpha
        seen = self.last[uniq] >= 0
        g = step - np.where(seen, self.last[uniq], -1.0)
        first = np.where(seen, (1 - a) * self.gap[uniq] + a * g, g)
        self.gap[uniq] = first * (1 - a) ** (counts - 1)
        self.last[uniq] = step
        return -np.log(np.maximum(self.gap[uniq], 1e-6))[inverse]


def impression_loss(model: TwoTowerModel, imp: "Impressions", idx: np.ndarray) -> torch.Tensor:
    """Mean logistic loss of impressions ``idx``: the served logit plus the position's bias, against
    the click (see ``impression_loss`` in the module docstring)."""
    users, items, bias = model(imp.rows.select(idx).kjt(), torch.from_numpy(imp.dense[idx]))
    logit = (users * items).sum(1) / model.config.temperature + bias + model.position_bias[imp.position[idx]]
    if imp.ts is not None:
        logit = logit + model.freshness(torch.from_numpy((imp.ts[idx] - imp.born[idx]) / 3600.0).float())
    return nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(imp.label[idx]))


# ---------------------------------------------------------------- data


@dataclass
class TwoTowerData:
    """The encoded rows of one training run (see :func:`prepare_two_tower`)."""

    train: Jagged              # training positives, both towers' features
    train_dense: np.ndarray    # (N, dense_width) the item tower's dense inputs
    train_item: np.ndarray     # (N,) catalogue index of each positive's item
    train_item_ids: np.ndarray  # (N,) its item id (the streaming estimator hashes it)
    queries: Jagged            # held-out positives, user features
    query_item: np.ndarray     # (Q,) catalogue index of each query's item
    catalogue: pd.DataFrame    # every distinct item of the frame, its last row's content
    items: Jagged              # the catalogue's item features
    items_dense: np.ndarray
    train_counts: np.ndarray   # (C,) training positives per catalogue item
    held_items: np.ndarray     # (C,) bool: the item was served in a held-out row
    description: dict
    train_ts: np.ndarray | None = None      # (N,) each positive's time; with the birth times below when
    train_born: np.ndarray | None = None    # (N,) the model learns freshness (from the age_hours column)
    query_ts: np.ndarray | None = None      # (Q,)
    items_born: np.ndarray | None = None    # (C,)
    impressions: "Impressions | None" = None   # every training row, for the impression loss


@dataclass
class Impressions:
    """Every training row (clicked or not) encoded for the impression loss."""

    rows: Jagged               # both towers' features
    dense: np.ndarray          # (M, dense_width)
    label: np.ndarray          # (M,) float32: 1 for a positive
    position: np.ndarray       # (M,) int64 in 1..MAX_POSITION
    ts: np.ndarray | None      # (M,) with freshness
    born: np.ndarray | None    # (M,)


def load_two_tower_frames(cfg: TwoTowerConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train rows, held-out rows, description): the config's data, sorted by time; the last
    ``valid_fraction`` of the rows in time (cut at a quantile of the time column, so rows of one time
    stay together) is held out."""
    d = cfg.data
    if d.loader == "served":
        from .datasets import read_served

        frame = read_served(d.path, list(cfg.positive), (d.from_hour, d.to_hour))
    else:
        frame = _read_table(d.path)
    required = [("user_id", "data"), ("item_id", "data"), (d.time_column, "data.time_column")]
    errors = [cfg.error(path, f"column '{col}' is not in the data ({d.path})", "unknown_column")
              for col, path in required if col not in frame.columns]
    for i, col in enumerate(cfg.positive):
        if col not in frame.columns:
            path = "positive" if len(cfg.positive) == 1 else f"positive[{i}]"
            labels = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
            errors.append(cfg.error(path, f"label column '{col}' is not in the data ({d.path}; numeric columns: "
                                    f"{', '.join(labels)})", "unknown_column"))
    if errors:
        raise ValidationError(errors)
    ts = pd.to_numeric(frame[d.time_column], errors="coerce")
    bad = ts.isna().to_numpy() | frame["user_id"].isna().to_numpy() | frame["item_id"].isna().to_numpy()
    frame = frame.assign(**{d.time_column: ts}).loc[~bad]
    frame = frame.sort_values(d.time_column, kind="mergesort").reset_index(drop=True)
    cut = frame[d.time_column].quantile(1.0 - d.valid_fraction)
    held = (frame[d.time_column] >= cut).to_numpy()
    absent = [c for c in (*ITEM_COLUMNS.values(), *USER_COLUMNS.values()) if c not in frame.columns]
    desc = {"loader": d.loader, "path": d.path, "rows": len(frame), "train_rows": int((~held).sum()),
            "held_out_rows": int(held.sum()), "held_out_from": float(cut), "absent_columns": absent,
            "dropped_rows": int(bad.sum())}
    return frame.loc[~held].reset_index(drop=True), frame.loc[held].reset_index(drop=True), desc


def positive_mask(frame: pd.DataFrame, positive: Sequence[str]) -> np.ndarray:
    """Rows with any positive label above 0 (missing and non-numeric labels count as 0)."""
    mask = np.zeros(len(frame), dtype=bool)
    for col in positive:
        mask |= pd.to_numeric(frame[col], errors="coerce").fillna(0).to_numpy() > 0
    return mask


def _columns(frame: pd.DataFrame, mapping: Mapping[str, str]) -> dict:
    return {key: frame[col].tolist() for key, col in mapping.items() if col in frame.columns}


def prepare_two_tower(cfg: TwoTowerConfig, train: pd.DataFrame, held: pd.DataFrame, log=print) -> TwoTowerData:
    """Encode the training positives (both towers), the held-out positives (user tower) and the
    catalogue (item tower); derive each row's topic affinity from its recent items' topics."""
    m = cfg.model
    frame = pd.concat([train, held], ignore_index=True)
    catalogue = frame.drop_duplicates("item_id", keep="last").reset_index(drop=True)
    catalogue = catalogue[[c for c in ITEM_COLUMNS.values() if c in catalogue.columns]]
    index = pd.Index(catalogue["item_id"])
    item_topic = dict(zip(catalogue["item_id"], catalogue["topic"])) if "topic" in catalogue else {}
    pos = train.loc[positive_mask(train, cfg.positive)].reset_index(drop=True)
    queries = held.loc[positive_mask(held, cfg.positive)].reset_index(drop=True)
    if not len(pos) or not len(queries):
        raise ValidationError([cfg.error("positive", f"no positive ({' or '.join(cfg.positive)} > 0) in the "
                                         f"{'training' if not len(pos) else 'held-out'} rows", "empty")])

    def users_of(rows: pd.DataFrame) -> dict:
        cols = _columns(rows, USER_COLUMNS)
        cols["topic_affinity"] = topic_affinity_from_recent(cols.get("recent_items", [None] * len(rows)),
                                                            item_topic, m.max_recent)
        return user_parts(m, cols, len(rows))

    iparts, dense = item_parts(m, _columns(pos, ITEM_COLUMNS), len(pos))
    train_item = index.get_indexer(pos["item_id"])
    cparts, c_dense = item_parts(m, _columns(catalogue, ITEM_COLUMNS), len(catalogue))
    counts = np.bincount(train_item, minlength=len(catalogue))
    query_item = index.get_indexer(queries["item_id"])
    desc = {"train_positives": len(pos), "held_out_positives": len(queries), "catalogue": len(catalogue),
            "users": int(frame["user_id"].nunique())}
    log(f"two-tower data: {len(pos):,} training positives of {len(train):,} rows, {len(queries):,} held-out "
        f"positives of {len(held):,}, catalogue {len(catalogue):,} items")
    times = {}
    if m.freshness_half_life_hours is not None:
        tcol = cfg.data.time_column
        if AGE_COLUMN not in frame.columns:
            raise ValidationError([cfg.error("model.freshness_half_life_hours", f"learning freshness needs an "
                                             f"'{AGE_COLUMN}' column (the item's age at the row's time, hours) "
                                             f"in the data ({cfg.data.path})", "unknown_column")])
        born = (pd.to_numeric(frame[tcol], errors="coerce")
                - pd.to_numeric(frame[AGE_COLUMN], errors="coerce") * 3600.0).to_numpy(np.float64)
        born = np.where(np.isfinite(born), born, pd.to_numeric(frame[tcol]).to_numpy(np.float64))  # unknown: age 0
        first_born = pd.Series(born).groupby(frame["item_id"].to_numpy()).min()   # an item's birth, once
        times = {"train_ts": pos[tcol].to_numpy(np.float64), "query_ts": queries[tcol].to_numpy(np.float64),
                 "train_born": first_born.reindex(pos["item_id"]).to_numpy(np.float64),
                 "items_born": first_born.reindex(catalogue["item_id"]).to_numpy(np.float64)}
    impressions = None
    if m.impression_loss > 0:
        allparts, all_dense = item_parts(m, _columns(train, ITEM_COLUMNS), len(train))
        position = (pd.to_numeric(train[POSITION_COLUMN], errors="coerce").fillna(1).to_numpy()
                    if POSITION_COLUMN in train.columns else np.ones(len(train)))
        impressions = Impressions(
            Jagged(len(train), {**users_of(train), **allparts}), all_dense,
            positive_mask(train, cfg.positive).astype(np.float32),
            np.clip(position, 1, MAX_POSITION).astype(np.int64),
            train[cfg.data.time_column].to_numpy(np.float64) if times else None,
            first_born.reindex(train["item_id"]).to_numpy(np.float64) if times else None)
        log(f"two-tower data: the impression loss reads all {len(train):,} training rows")
    return TwoTowerData(Jagged(len(pos), {**users_of(pos), **iparts}), dense, train_item,
                        pos["item_id"].astype(str).to_numpy(), Jagged(len(queries), users_of(queries)), query_item,
                        catalogue, Jagged(len(catalogue), cparts), c_dense, counts,
                        catalogue["item_id"].isin(set(held["item_id"])).to_numpy(), desc, **times,
                        impressions=impressions)


# ---------------------------------------------------------------- evaluation


def recall_from_scores(scores: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(len(ks), Q) hits of each query's ``target`` column among the top K of its row of ``scores`` (Q, C);
    ties count in expectation over a random order: ``clip((K - greater) / equal, 0, 1)``."""
    t = scores[np.arange(len(scores)), target][:, None]
    greater = (scores > t).sum(1)
    equal = (scores == t).sum(1)
    return np.stack([np.clip((k - greater) / equal, 0.0, 1.0) for k in ks])


@torch.inference_mode()
def encode_jagged_items(model: TwoTowerModel, items: Jagged, dense: np.ndarray,
                        batch: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors (n, output_dim), biases (n,)) of the item tower."""
    vecs, biases = [np.zeros((0, model.config.output_dim), np.float32)], [np.zeros(0, np.float32)]
    for s in range(0, len(items), batch):
        v, b = model.items(items.select(np.arange(s, min(len(items), s + batch))).kjt(),
                           torch.from_numpy(dense[s:s + batch]))
        vecs.append(v.numpy())
        biases.append(b.numpy())
    return np.concatenate(vecs), np.concatenate(biases)


def served_items(model: TwoTowerModel, vectors: np.ndarray, bias: np.ndarray, born: np.ndarray | None,
                 reference_ts: float | None) -> np.ndarray:
    """The vectors an index holds: ``[v, b, 2^((born - t0) / h)]`` (see the module docstring), or ``v``
    without the extras. ``born``: epoch seconds (NaN: no freshness term); ``reference_ts``: ``t0``."""
    cfg = model.config
    if not cfg.extras:
        return vectors
    cols = [vectors, bias[:, None]]
    if cfg.freshness_half_life_hours is not None:
        if reference_ts is None:
            raise ValueError("this model scores freshness: pass reference_ts (the index's t0, epoch seconds)")
        rel = (np.asarray(born, dtype=np.float64) - reference_ts) / 3600.0 / model.half_life_hours
        cols.append(np.nan_to_num(np.exp2(np.minimum(rel, 64.0)), nan=0.0)[:, None])
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


def served_queries(model: TwoTowerModel, vectors: np.ndarray, now, reference_ts: float | None) -> np.ndarray:
    """The queries of user (or item, for item-to-item) vectors ``(n, output_dim)`` at ``now`` (scalar or
    (n,)): ``[u / temperature, 1, w * 2^(-(now - t0) / h)]``, so that the inner product with
    :func:`served_items` is the model's logit; ``u`` as it is without the extras."""
    cfg = model.config
    if not cfg.extras:
        return vectors
    n = len(vectors)
    cols = [vectors / cfg.temperature, np.ones((n, 1), np.float32)]
    if cfg.freshness_half_life_hours is not None:
        if reference_ts is None or now is None:
            raise ValueError("this model scores freshness: pass now and reference_ts (epoch seconds)")
        rel = (np.broadcast_to(np.asarray(now, dtype=np.float64), (n,)) - reference_ts) / 3600.0
        cols.append((float(model.fresh_weight.detach()) * np.exp2(-rel / model.half_life_hours))[:, None])
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


@torch.inference_mode()
def encode_jagged_users(model: TwoTowerModel, users: Jagged, batch: int = 16_384) -> np.ndarray:
    out = [model.users(users.select(np.arange(s, min(len(users), s + batch))).kjt()).numpy()
           for s in range(0, len(users), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.config.output_dim), np.float32)


def evaluate_two_tower(model: TwoTowerModel, data: TwoTowerData, ks: Sequence[int], catalogue: str = "frame") -> dict:
    """Held-out recall@K of the towers (exact inner-product search) and of popularity (items ranked by
    training positives) over the catalogue: every item of the frame (``frame``) or only those served in
    the held-out rows (``held_out``: the items alive then, what a live index holds in a world whose items
    expire); overall and on the ``cold`` queries (items without a training positive)."""
    model.eval()
    keep = data.held_items if catalogue == "held_out" else np.ones(len(data.items), dtype=bool)
    cols = np.flatnonzero(keep)
    target = np.cumsum(keep)[data.query_item] - 1          # each query's item among the searched columns
    fresh = model.config.freshness_half_life_hours is not None
    t0 = float(data.query_ts.max()) if fresh and len(data.query_ts) else None
    born = data.items_born[cols] if fresh else None
    item_vecs = served_items(model, *encode_jagged_items(model, data.items.select(cols), data.items_dense[cols]),
                             born, t0)
    user_vecs = served_queries(model, encode_jagged_users(model, data.queries), data.query_ts if fresh else None, t0)

    def scores(s: int, e: int) -> np.ndarray:
        out = user_vecs[s:e] @ item_vecs.T
        if fresh:   # an item born after the query's time was not there to retrieve
            out[born[None, :] > data.query_ts[s:e, None]] = -np.inf
        return out

    chunk = max(1, 20_000_000 // max(len(item_vecs), 1))   # about 80 MB of scores at a time
    hits = np.concatenate([recall_from_scores(scores(s, s + chunk), target[s:s + chunk], ks)
                           for s in range(0, len(user_vecs), chunk)], axis=1)
    # popularity ranks the catalogue the same way for every query: a hit depends on the target's count only
    order = np.sort(data.train_counts[cols].astype(np.float64))
    t = data.train_counts[data.query_item].astype(np.float64)
    greater = len(order) - np.searchsorted(order, t, side="right")
    equal = np.searchsorted(order, t, side="right") - np.searchsorted(order, t, side="left")
    pop = np.stack([np.clip((k - greater) / equal, 0.0, 1.0) for k in ks])
    cold = data.train_counts[data.query_item] == 0

    def table(h: np.ndarray, rows: np.ndarray) -> dict:
        return {f"recall@{k}": float(h[j, rows].mean()) if rows.any() else None for j, k in enumerate(ks)}

    every = np.ones(len(cold), dtype=bool)
    return {"queries": int(len(cold)), "catalogue": int(len(cols)), "catalogue_kind": catalogue,
            "two_tower": table(hits, every), "popularity": table(pop, every),
            "cold": {"queries": int(cold.sum()), "two_tower": table(hits, cold), "popularity": table(pop, cold)}}


def format_recall_table(held_out: dict) -> str:
    """The held-out recall table: one line per K, the two-tower model next to popularity (and the cold queries)."""
    cold = held_out["cold"]
    what = "the items of the held-out rows" if held_out.get("catalogue_kind") == "held_out" else "the frame's items"
    lines = [f"held-out recall: {held_out['queries']:,} positives, exact search over {held_out['catalogue']:,} items "
             f"({what}); {cold['queries']:,} of the positives are of items without a training positive ('cold')",
             f"{'K':>7}  {'two_tower':>9}  {'popularity':>10}  {'cold two_tower':>14}  {'cold popularity':>15}"]

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    for key in held_out["two_tower"]:
        lines.append(f"{key.removeprefix('recall@'):>7}  {fmt(held_out['two_tower'][key]):>9}  "
                     f"{fmt(held_out['popularity'][key]):>10}  {fmt(cold['two_tower'][key]):>14}  "
                     f"{fmt(cold['popularity'][key]):>15}")
    return "\n".join(lines)


# ---------------------------------------------------------------- training


@dataclass
class TrainedTwoTower:
    """A trained model with its config, metrics (held-out recall, training history) and data description."""

    config: TwoTowerConfig
    model: TwoTowerModel
    metrics: dict
    description: dict


def train_two_tower(cfg: TwoTowerConfig, log=print, progress: bool = True) -> TrainedTwoTower:
    """Load and encode the data, train with in-batch negatives (logQ-corrected, item ids dropped at
    ``item_id_dropout``), then evaluate on the held-out split."""
    from tqdm import tqdm

    from .train import make_optimizer, seed_everything

    t0 = time.perf_counter()
    tc, m = cfg.training, cfg.model
    torch.set_num_threads(tc.threads)
    train, held, desc = load_two_tower_frames(cfg)
    if desc["dropped_rows"]:
        log(f"two-tower data: dropped {desc['dropped_rows']:,} rows without a {cfg.data.time_column}, user_id or item_id")
    if desc["absent_columns"]:
        log(f"two-tower data: no column {', '.join(desc['absent_columns'])}: those inputs are missing for every row")
    data = prepare_two_tower(cfg, train, held, log)
    desc.update(data.description)
    seed_everything(tc.seed)
    model = TwoTowerModel(m)
    optimizer = make_optimizer(model, tc)
    counts = data.train_counts
    log_q_count = np.log(np.maximum(counts, 1) / counts.sum())
    stream = StreamingFrequency(m.logq_buckets, m.logq_alpha) if m.logq == "stream" else None
    n, bs = len(data.train), tc.batch_size
    history, step = [], 0
    for epoch in range(1, tc.epochs + 1):
        model.train()
        rng = np.random.default_rng([tc.seed, epoch])
        perm = rng.permutation(n)
        batches = [perm[s:s + bs] for s in range(0, n - 1, bs) if len(perm[s:s + bs]) > 1]
        imp = data.impressions
        if imp is not None:   # the impressions in as many batches, alongside
            imp_batches = np.array_split(rng.permutation(len(imp.label)), len(batches))
        bar = tqdm(batches, desc=f"epoch {epoch}/{tc.epochs}", unit="batch", disable=not progress, file=sys.stderr,
                   mininterval=0.5, leave=False)
        total, te = 0.0, time.perf_counter()
        for b, idx in enumerate(bar, 1):
            batch = data.train.select(idx)
            for key, share in (("item_id", m.item_id_dropout), ("topic", m.topic_dropout)):
                if share > 0:
                    batch = batch.drop_rows(key, rng.random(len(idx)) < share)
            if stream is not None:
                log_q = stream.update(data.train_item_ids[idx], step)
            elif m.logq == "count":
                log_q = log_q_count[data.train_item[idx]]
            else:
                log_q = np.zeros(len(idx))
            users, items, bias = model(batch.kjt(), torch.from_numpy(data.train_dense[idx]))
            extra, absent = bias[None, :], None
            if m.freshness_half_life_hours is not None:   # each item's age at each row's time
                age = torch.from_numpy((data.train_ts[idx, None] - data.train_born[None, idx]) / 3600.0)
                extra = extra + model.freshness(age.float())
                absent = age < 0
            loss = in_batch_softmax_loss(users, items, torch.from_numpy(data.train_item[idx]),
                                         torch.from_numpy(log_q.astype(np.float32)), m.temperature,
                                         extra if m.extras else None, absent)
            if imp is not None:
                loss = loss + m.impression_loss * impression_loss(model, imp, imp_batches[b - 1])
            optimizer.zero_grad(set_to_none=True)
            with torch.sparse.check_sparse_tensor_invariants(enable=False):   # the tables' sparse gradients
                loss.backward()
                optimizer.step()
            total += float(loss.detach())
            step += 1
            if b % 20 == 0:
                bar.set_postfix(loss=f"{total / b:.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - te
        history.append({"epoch": epoch, "train_loss": total / max(1, len(batches)), "seconds": round(seconds, 3)})
        what = "in-batch softmax + impression loss" if data.impressions is not None else "in-batch softmax loss"
        log(f"epoch {epoch}: {what} {history[-1]['train_loss']:.4f}, {n / max(seconds, 1e-9):,.0f} "
            f"positives/s")
    train_seconds = sum(h["seconds"] for h in history)
    held_out = evaluate_two_tower(model, data, cfg.k, cfg.catalogue)
    metrics = {"held_out": held_out, "history": history, "train_seconds": round(train_seconds, 2),
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    if m.freshness_half_life_hours is not None:
        metrics["freshness"] = {"weight": round(float(model.fresh_weight.detach()), 4),
                                "half_life_hours": round(model.half_life_hours, 3)}
        log(f"freshness learnt: logit {metrics['freshness']['weight']:+.3f} for a new item, halving every "
            f"{metrics['freshness']['half_life_hours']:.1f} h")
    return TrainedTwoTower(cfg, model, metrics, desc)


# ---------------------------------------------------------------- registry


def register_two_tower(registry_dir: str | Path, name: str, trained: TrainedTwoTower,
                       make_current: bool = True) -> Path:
    """Publish ``trained`` as the next version of ``name`` (``kind: two_tower``): ``weights.pt`` (its
    state_dict), ``config.json`` (the validated config), ``metrics.json`` and ``manifest.json``."""
    from .artifacts import _clean
    from .registry import publish_version, write_json

    cfg = trained.config

    def write(folder: Path) -> dict:
        state = {k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()}
        torch.save(state, folder / "weights.pt")
        write_json(folder / CONFIG_FILE, cfg.to_dict())
        write_json(folder / "metrics.json", _clean(trained.metrics))
        return {"format": 1, "kind": "two_tower",
                "model": {"class": "ranking.two_tower.TwoTowerModel",
                          "config": {"arch": "two_tower", **cfg.model.to_dict()},
                          "user_features": list(USER_FEATURES), "item_features": list(ITEM_FEATURES)},
                "dim": cfg.model.output_dim, "positive": list(cfg.positive), "data": _clean(trained.description),
                "train_config": cfg.source, "files": ["weights.pt", CONFIG_FILE, "metrics.json", "manifest.json"]}

    return publish_version(registry_dir, name, write, make_current)


class TwoTowerEncoder:
    """A registered two-tower model serving vectors (float32): an index holds :meth:`encode_items`, a
    search sends :meth:`encode_users` (or :meth:`item_queries`), and their inner product is the model's
    score: the cosine for a plain model, the whole logit (cosine / temperature + item bias + freshness)
    for one with ``item_bias`` or ``freshness_half_life_hours`` (see the module docstring).

    ``dim``: the vectors' dimension (``output_dim`` + the extras); ``version``: e.g. ``"two_tower_small@v1"``;
    ``needs_time``: vectors depend on the index's reference time ``t0`` (``reference_ts``).
    """

    def __init__(self, model: TwoTowerModel, name: str, version: str, path: Path | None = None):
        self.model = model.eval()
        self.config: TowerConfig = model.config
        self.dim = self.config.output_dim + self.config.extras
        self.needs_time = self.config.freshness_half_life_hours is not None
        self.name, self.version, self.path = name, f"{name}@{version}", path

    def encode_items(self, items: Sequence[Mapping], reference_ts: float | None = None) -> np.ndarray:
        """(n, dim) index vectors of ``items``: mappings with ``item_id``, ``source`` (``"llm"`` or another),
        ``creator_id``, ``topic``, ``text``, ``generator`` (None, a model name, or a dict with ``model``
        and ``prior_score``), ``prior_score`` and ``created_at`` (epoch seconds: the freshness term; an
        item without one gets none); any key may be missing or None (an unknown or missing id: the
        content's vector). ``reference_ts``: the index's ``t0``, required when ``needs_time``."""
        cols = {key: [it.get(key) for it in items] for key in ITEM_COLUMNS}
        parts, dense = item_parts(self.config, cols, len(items))
        vectors, bias = encode_jagged_items(self.model, Jagged(len(items), parts), dense)
        born = None
        if self.needs_time:
            born = np.array([_epoch(it.get("created_at")) for it in items], dtype=np.float64)
        return served_items(self.model, vectors, bias, born, reference_ts)

    def encode_users(self, users: Sequence[Mapping], now: float | None = None,
                     reference_ts: float | None = None) -> np.ndarray:
        """(n, dim) queries of ``users`` at ``now``: mappings with ``user_id``, ``recent_items`` (item ids,
        most recent first) and ``topic_affinity`` (topic -> weight, e.g. the near-line store's; normalised
        here, non-positive weights ignored); any key may be missing or None. ``now`` and ``reference_ts``
        (epoch seconds) are required when ``needs_time``."""
        cols = {key: [u.get(key) for u in users] for key in ("user_id", "recent_items", "topic_affinity")}
        u = encode_jagged_users(self.model, Jagged(len(users), user_parts(self.config, cols, len(users))))
        return served_queries(self.model, u, now, reference_ts)

    def item_queries(self, vectors: np.ndarray, now: float | None = None,
                     reference_ts: float | None = None) -> np.ndarray:
        """Queries from index vectors ``(n, dim)`` (items like these, for item-to-item and text search):
        their unit part is searched as a user's would be."""
        return served_queries(self.model, np.asarray(vectors, np.float32)[:, : self.config.output_dim], now,
                              reference_ts)

    def encode_text(self, text: str, now: float | None = None, reference_ts: float | None = None) -> np.ndarray:
        """(dim,) the query of an item with only ``text`` (retrieval by text)."""
        return self.item_queries(self.encode_items([{"text": text}], reference_ts), now, reference_ts)[0]

    def rebase_due(self, reference_ts: float, now: float) -> bool:
        """Whether an index built at ``reference_ts`` should be re-encoded at a later ``t0``: a new item's
        freshness factor ``2^((born - t0) / h)`` grows with the time since ``t0``; past 2^4 the vectors'
        scales spread too far for a graph index."""
        return self.needs_time and (now - reference_ts) / 3600.0 > REBASE_HALF_LIVES * self.model.half_life_hours


def _epoch(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def load_two_tower(registry_dir: str | Path, ref: str) -> TwoTowerEncoder:
    """The two-tower version ``ref`` (``name`` (current), ``name@v3`` or a version folder) of
    ``registry_dir``; weights load with ``torch.load(..., weights_only=True)``."""
    import json

    from .registry import resolve

    vdir = resolve(registry_dir, ref)
    manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("kind") != "two_tower":
        raise ValidationError([FieldError("model", f"{manifest.get('name')}@{manifest.get('version')} is a "
                                          f"{manifest.get('kind', 'torchrec')} model, not a two_tower one", "kind")])
    config = json.loads((vdir / CONFIG_FILE).read_text(encoding="utf-8"))
    model = TwoTowerModel(TowerConfig.from_dict(config["model"]))
    model.load_state_dict(torch.load(vdir / "weights.pt", map_location="cpu", weights_only=True))
    return TwoTowerEncoder(model, manifest["name"], manifest["version"], vdir)
