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
  model name) and an ``is_llm`` input (source ``llm`` or a generator) -> MLP -> ``output_dim``.

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

from strategy.checks import NAME_RE, as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, FieldError, ValidationError

from .features import hash_token, tokenize
from .train import DataConfig, _read_table, _resolve

TOP_KEYS = ("name", "data", "positive", "model", "training", "eval", "registry")
DATA_KEYS = ("loader", "path", "time_column", "valid_fraction", "from_hour", "to_hour")
LOADERS = ("table", "sim", "served")
LOGQ = ("count", "stream", "none")
MODEL_KEYS = ("embedding_dim", "buckets", "layers", "output_dim", "temperature", "item_id_dropout", "topic_dropout",
              "max_recent",
              "max_tokens", "logq", "logq_alpha", "logq_buckets")
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
                "text": "text", "generator": "generator"}
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
        "logq_alpha": (0, 1, False, True), "logq_buckets": (1, 1 << 30, True, False)})
    if "layers" in obj:
        kw["layers"] = _layers(errs, obj["layers"], "model.layers")
    if "logq" in obj:
        kw["logq"] = as_str(errs, obj["logq"], "model.logq", choices=LOGQ)
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


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or v is pd.NA or v == ""


def _hash_values(values: Sequence, buckets: int) -> np.ndarray:
    """The row (1..buckets) of each value as a string id; 0 for a missing one (None, NaN, '')."""
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


def item_parts(cfg: TowerConfig, cols: Mapping[str, Sequence], n: int) -> tuple[dict, np.ndarray]:
    """The item tower's features of ``n`` items from columns (``item_id``, ``source``, ``creator_id``,
    ``topic``, ``text``, ``generator``; an absent column is missing for every item) -> (Jagged parts,
    is_llm float32 (n,))."""
    b = cfg.buckets
    none = [None] * n
    generators = [generator_name(g) for g in cols.get("generator", none)]
    source = cols.get("source", none)
    is_llm = np.array([s == "llm" or g is not None for s, g in zip(source, generators)], dtype=np.float32)
    parts = {"item_id": _single(cols.get("item_id", none), b.item_id),
             "text": _text_bag(cols.get("text", none), b.text, cfg.max_tokens),
             "topic": _single(cols.get("topic", none), b.topic),
             "creator": _single(cols.get("creator_id", none), b.creator),
             "generator": _single(generators, b.generator)}
    return parts, is_llm


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

    ``forward(kjt, is_llm)`` -> (user vectors (N, output_dim), item vectors (N, output_dim)), both rows
    L2-normalised; ``users(kjt)`` / ``items(kjt, is_llm)`` compute one side.
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
        self.item_tower = tower(len(ITEM_FEATURES) * d + 1)

    def _users(self, pooled: dict) -> torch.Tensor:
        x = torch.cat([pooled[f] for f in USER_FEATURES], dim=1)
        return nn.functional.normalize(self.user_tower(x), dim=1)

    def _items(self, pooled: dict, is_llm: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pooled[f] for f in ITEM_FEATURES] + [is_llm.reshape(-1, 1)], dim=1)
        return nn.functional.normalize(self.item_tower(x), dim=1)

    def users(self, kjt) -> torch.Tensor:
        return self._users(self.ebc(kjt).to_dict())

    def items(self, kjt, is_llm: torch.Tensor) -> torch.Tensor:
        return self._items(self.ebc(kjt).to_dict(), is_llm)

    def forward(self, kjt, is_llm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.ebc(kjt).to_dict()
        return self._users(pooled), self._items(pooled, is_llm)


# ---------------------------------------------------------------- loss and the sampling-bias correction


def in_batch_softmax_loss(users: torch.Tensor, items: torch.Tensor, item_keys: torch.Tensor,
                          log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean in-batch softmax cross-entropy of B positive pairs (row i's positive is item i).

    ``users``, ``items``: (B, D); ``item_keys`` (B,) int ids of the items (rows with the same item are
    accidental hits: masked out of each other's negatives); ``log_q`` (B,) log sampling probability of
    each item, subtracted from its column's logits (Yi et al. 2019: ``s(x, y) / T - log q(y)``).
    """
    logits = users @ items.T / temperature - log_q[None, :]
    same = item_keys[:, None] == item_keys[None, :]
    same.fill_diagonal_(False)
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


# ---------------------------------------------------------------- data


@dataclass
class TwoTowerData:
    """The encoded rows of one training run (see :func:`prepare_two_tower`)."""

    train: Jagged              # training positives, both towers' features
    train_is_llm: np.ndarray   # (N,)
    train_item: np.ndarray     # (N,) catalogue index of each positive's item
    train_item_ids: np.ndarray  # (N,) its item id (the streaming estimator hashes it)
    queries: Jagged            # held-out positives, user features
    query_item: np.ndarray     # (Q,) catalogue index of each query's item
    catalogue: pd.DataFrame    # every distinct item of the frame, its last row's content
    items: Jagged              # the catalogue's item features
    items_is_llm: np.ndarray
    train_counts: np.ndarray   # (C,) training positives per catalogue item
    held_items: np.ndarray     # (C,) bool: the item was served in a held-out row
    description: dict


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

    iparts, is_llm = item_parts(m, _columns(pos, ITEM_COLUMNS), len(pos))
    train_item = index.get_indexer(pos["item_id"])
    cparts, c_llm = item_parts(m, _columns(catalogue, ITEM_COLUMNS), len(catalogue))
    counts = np.bincount(train_item, minlength=len(catalogue))
    query_item = index.get_indexer(queries["item_id"])
    desc = {"train_positives": len(pos), "held_out_positives": len(queries), "catalogue": len(catalogue),
            "users": int(frame["user_id"].nunique())}
    log(f"two-tower data: {len(pos):,} training positives of {len(train):,} rows, {len(queries):,} held-out "
        f"positives of {len(held):,}, catalogue {len(catalogue):,} items")
    return TwoTowerData(Jagged(len(pos), {**users_of(pos), **iparts}), is_llm, train_item,
                        pos["item_id"].astype(str).to_numpy(), Jagged(len(queries), users_of(queries)), query_item,
                        catalogue, Jagged(len(catalogue), cparts), c_llm, counts,
                        catalogue["item_id"].isin(set(held["item_id"])).to_numpy(), desc)


# ---------------------------------------------------------------- evaluation


def recall_from_scores(scores: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(len(ks), Q) hits of each query's ``target`` column among the top K of its row of ``scores`` (Q, C);
    ties count in expectation over a random order: ``clip((K - greater) / equal, 0, 1)``."""
    t = scores[np.arange(len(scores)), target][:, None]
    greater = (scores > t).sum(1)
    equal = (scores == t).sum(1)
    return np.stack([np.clip((k - greater) / equal, 0.0, 1.0) for k in ks])


@torch.inference_mode()
def encode_jagged_items(model: TwoTowerModel, items: Jagged, is_llm: np.ndarray, batch: int = 16_384) -> np.ndarray:
    out = [model.items(items.select(np.arange(s, min(len(items), s + batch))).kjt(),
                       torch.from_numpy(is_llm[s:s + batch])).numpy() for s in range(0, len(items), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.config.output_dim), np.float32)


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
    item_vecs = encode_jagged_items(model, data.items.select(cols), data.items_is_llm[cols])
    user_vecs = encode_jagged_users(model, data.queries)
    chunk = max(1, 20_000_000 // max(len(item_vecs), 1))   # about 80 MB of scores at a time
    hits = np.concatenate([recall_from_scores(user_vecs[s:s + chunk] @ item_vecs.T, target[s:s + chunk], ks)
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
            users, items = model(batch.kjt(), torch.from_numpy(data.train_is_llm[idx]))
            loss = in_batch_softmax_loss(users, items, torch.from_numpy(data.train_item[idx]),
                                         torch.from_numpy(log_q.astype(np.float32)), m.temperature)
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
        log(f"epoch {epoch}: in-batch softmax loss {history[-1]['train_loss']:.4f}, {n / max(seconds, 1e-9):,.0f} "
            f"positives/s")
    train_seconds = sum(h["seconds"] for h in history)
    held_out = evaluate_two_tower(model, data, cfg.k, cfg.catalogue)
    metrics = {"held_out": held_out, "history": history, "train_seconds": round(train_seconds, 2),
               "wall_seconds": round(time.perf_counter() - t0, 2)}
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
    """A registered two-tower model serving vectors (float32, rows L2-normalised: inner product = cosine).

    ``dim``: the vectors' dimension; ``version``: e.g. ``"two_tower_small@v1"``.
    """

    def __init__(self, model: TwoTowerModel, name: str, version: str, path: Path | None = None):
        self.model = model.eval()
        self.config: TowerConfig = model.config
        self.dim = self.config.output_dim
        self.name, self.version, self.path = name, f"{name}@{version}", path

    def encode_items(self, items: Sequence[Mapping]) -> np.ndarray:
        """(n, dim) item-tower vectors of ``items``: mappings with ``item_id``, ``source`` (``"llm"`` or
        another), ``creator_id``, ``topic``, ``text``, ``generator`` (None, a model name, or a dict with
        ``model``); any key may be missing or None (an unknown or missing id: the content's vector)."""
        cols = {key: [it.get(key) for it in items] for key in ITEM_COLUMNS}
        parts, is_llm = item_parts(self.config, cols, len(items))
        return encode_jagged_items(self.model, Jagged(len(items), parts), is_llm)

    def encode_users(self, users: Sequence[Mapping]) -> np.ndarray:
        """(n, dim) user-tower vectors of ``users``: mappings with ``user_id``, ``recent_items`` (item ids,
        most recent first) and ``topic_affinity`` (topic -> weight, e.g. the near-line store's; normalised
        here, non-positive weights ignored); any key may be missing or None."""
        cols = {key: [u.get(key) for u in users] for key in ("user_id", "recent_items", "topic_affinity")}
        return encode_jagged_users(self.model, Jagged(len(users), user_parts(self.config, cols, len(users))))

    def encode_text(self, text: str) -> np.ndarray:
        """(dim,) the item-tower vector of an item with only ``text`` (retrieval by text)."""
        return self.encode_items([{"text": text}])[0]


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
