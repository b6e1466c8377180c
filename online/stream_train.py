"""The streaming trainer: the ``joined`` topic -> incremental updates of a TorchRec ranker -> a new
registry version every ``publish_interval_s``, which scorers following the registry serve without a
restart (``stratarank train-stream --config conf/train/stream.yaml``).

It starts from a registered TorchRec model (``start_from``), gives its id tables a fixed capacity
(``ids``; every id table by default: new ids are admitted after ``min_count`` sightings and evicted
after ``ttl_s`` unseen, see ``ranking/dynamic_ids.py``), and trains dense layers and embedding rows on
the joiner's examples in mini-batches, with the optimizers of batch training (Adagrad on the tables,
Adam on the rest).

Every ``publish_interval_s`` it publishes a full version under ``name`` (made ``current``; the registry
keeps the last ``keep_versions``; ``stratarank models rollback`` points back), once a guard agrees: on
a held-back slice of the stream (``guard.holdout_share`` of the examples, chosen by a hash of their id,
never trained on), the candidate's weights and loss must be finite and its loss at most
``1 + guard.max_loss_increase`` times the loss of the version serving now (compared once the slice
holds ``guard.min_holdout`` examples). A refused update keeps the previous version serving. After
non-finite weights, or ``guard.patience`` refusals for a worse loss in a row, the trainer also goes
back to the serving version's weights (the examples trained since are counted as ``discarded``).

Exactly once: a checkpoint (model, optimizers, id tables, recent example ids, counters, the examples
consumed but not applied yet, positions) is written atomically at every publish and every
``checkpoint_interval_s``, and only then are the positions committed to the bus. A trainer killed at
any point resumes from its checkpoint; the records the bus delivers again are recognised by their
offsets (before the checkpoint's positions) or their ``example_id`` (the joiner may publish a flush
twice) and skipped, counted: no example is applied twice, none is skipped uncounted.

Freshness: each version's metrics say how old the feedback it has trained on was when it was published
(``stream.freshness_s``: from the publish time of an example's last joined event to the version).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from strategy.checks import NAME_RE, as_dict, as_number, as_str, check_keys
from strategy.errors import Errors, FieldError, ValidationError, join_path

from .bus import CONSUMER_RE, TOPIC_RE, EventBus
from .nearline import BusConfig, NearlineConfig

log = logging.getLogger("stratarank.stream_train")

TOP_KEYS = ("name", "start_from", "registry", "bus", "topic", "consumer", "publish_interval_s",
            "checkpoint_interval_s", "checkpoint", "keep_versions", "training", "ids", "guard")
TRAINING_KEYS = ("batch_size", "lr", "embedding_lr", "weight_decay", "threads", "max_wait_s", "seed")
GUARD_KEYS = ("holdout_share", "holdout_size", "max_loss_increase", "min_holdout", "patience")
CHECKPOINT_FORMAT = 1
COUNTERS = ("records", "applied", "held_out", "replayed", "duplicates", "invalid", "other_ranks",
            "nonfinite_batches", "steps", "published", "refused", "discarded")


@dataclass(frozen=True)
class StreamTraining:
    batch_size: int = 256
    lr: float = 5e-4            # Adam, dense layers
    embedding_lr: float = 0.02  # Adagrad, embedding rows
    weight_decay: float = 0.0
    threads: int = 1
    max_wait_s: float = 1.0     # a partial batch is applied after waiting this long
    seed: int = 0


@dataclass(frozen=True)
class GuardConfig:
    holdout_share: float = 0.05
    holdout_size: int = 5_000     # the most recent held-back examples the guard scores (twice per publish)
    max_loss_increase: float = 0.05
    min_holdout: int = 1000       # below this, only finiteness is checked (a loss on fewer rows is noise)
    patience: int = 3             # refusals for a worse loss in a row before going back to the serving weights


@dataclass(frozen=True)
class StreamConfig:
    name: str
    start_from: str
    registry: str = "registry"
    bus: BusConfig = field(default_factory=BusConfig)
    topic: str = "joined"
    consumer: str = "trainer"
    publish_interval_s: float = 60.0
    checkpoint_interval_s: float = 30.0
    checkpoint: str = "var/stream/trainer.pt"
    keep_versions: int = 10
    training: StreamTraining = field(default_factory=StreamTraining)
    ids: dict = field(default_factory=dict)      # raw section: resolved against the model's tables at start
    guard: GuardConfig = field(default_factory=GuardConfig)
    source: str | None = None
    lines: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data, source: str | None = None, lines: dict | None = None) -> "StreamConfig":
        """Validate a stream config mapping; every problem at once, by key path (file:line with ``lines``)."""
        errs = Errors()
        obj = as_dict(errs, data if data is not None else {}, "")
        if obj is None:
            errs.raise_if_any(source, lines)
        check_keys(errs, obj, "", TOP_KEYS, required=("name", "start_from"))
        kw: dict = {"source": source, "lines": dict(lines or {})}
        if "name" in obj:
            kw["name"] = as_str(errs, obj["name"], "name", pattern=NAME_RE)
        if "start_from" in obj:
            kw["start_from"] = as_str(errs, obj["start_from"], "start_from", max_len=4096)
        for key in ("registry", "checkpoint"):
            if key in obj:
                kw[key] = as_str(errs, obj[key], key, max_len=4096)
        if "topic" in obj:
            kw["topic"] = as_str(errs, obj["topic"], "topic", pattern=TOPIC_RE)
        if "consumer" in obj:
            kw["consumer"] = as_str(errs, obj["consumer"], "consumer", pattern=CONSUMER_RE)
        for key, lo, hi, integer in (("publish_interval_s", 1, 86_400, False), ("checkpoint_interval_s", 0.1, 86_400, False),
                                     ("keep_versions", 1, 10_000, True)):
            if key in obj:
                kw[key] = as_number(errs, obj[key], key, lo=lo, hi=hi, integer=integer)
        try:
            kw["bus"] = NearlineConfig.from_dict({"bus": obj.get("bus", {})}).bus
        except ValidationError as exc:
            errs.items.extend(exc.errors)
        kw["training"] = _section(errs, obj.get("training"), "training", StreamTraining, TRAINING_KEYS, {
            "batch_size": (1, 1 << 20, True), "lr": (0, 10, False), "embedding_lr": (0, 100, False),
            "weight_decay": (0, 10, False), "threads": (1, 64, True), "max_wait_s": (0.001, 3600, False),
            "seed": (0, 2 ** 31, True)}, open_lo=("lr", "embedding_lr"))
        kw["guard"] = _section(errs, obj.get("guard"), "guard", GuardConfig, GUARD_KEYS, {
            "holdout_share": (0, 0.5, False), "holdout_size": (1, 10_000_000, True),
            "max_loss_increase": (0, 100, False), "min_holdout": (1, 10_000_000, True), "patience": (1, 1000, True)},
            open_lo=("holdout_share",))
        if obj.get("ids") is not None:
            kw["ids"] = as_dict(errs, obj["ids"], "ids") or {}
        errs.raise_if_any(source, lines)
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def load(cls, path) -> "StreamConfig":
        from strategy.config import read_yaml

        data, lines = read_yaml(path)
        return cls.from_dict(data, source=str(path), lines=lines)

    def error(self, path: str, message: str, code: str) -> ValidationError:
        from strategy.errors import _line_for

        return ValidationError([FieldError(path, message, code, self.source,
                                           _line_for(path, self.lines) if self.lines else None)])


def _section(errs: Errors, value, path: str, cls, keys, ranges: dict, open_lo=()):
    obj = as_dict(errs, value if value is not None else {}, path) or {}
    check_keys(errs, obj, path, keys)
    kw = {}
    for key, (lo, hi, integer) in ranges.items():
        if key in obj:
            v = as_number(errs, obj[key], join_path(path, key), lo=lo, hi=hi, integer=integer, lo_open=key in open_lo)
            if v is not None:
                kw[key] = v
    return cls(**kw)


# ---------------------------------------------------------------- the trainer


def _held_out(example_id: str, share: float) -> bool:
    """The guard's slice: a stable share of example ids (crc32, the same in every process)."""
    return zlib.crc32(example_id.encode("utf-8")) < share * 2 ** 32


class StreamTrainer:
    """The state of one streaming trainer and its steps (``run_stream_trainer`` drives it)."""

    world = 1   # ranks (a DistributedStreamTrainer has more)

    def __init__(self, config: StreamConfig, log_fn=log.info, rank: int = 0):
        import torch

        from ranking.dynamic_ids import DynamicIds, id_tables_from_dict
        from ranking.models import ModelConfig, MultiTaskLoss, MultiTaskRanker, ObjectiveConfig
        from ranking.train import TrainingConfig, make_optimizer

        self.config, self.log = config, log_fn
        tc = config.training
        torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        ckpt = self._read_checkpoint()
        if ckpt is not None:
            from ranking.features import FeatureEncoder

            self.encoder = FeatureEncoder.from_state(ckpt["encoder"])
            self.model_config = ModelConfig.from_dict(ckpt["model_config"])
            self.objectives = tuple(ObjectiveConfig(**o) for o in ckpt["objectives"])
            self.start = ckpt["start"]
            trained = None
        else:
            from ranking.artifacts import load_model

            loaded = load_model(config.registry, config.start_from)
            if loaded.leaves is not None:
                raise config.error("start_from", f"{loaded.name}@{loaded.version} reads GBDT leaves, which the "
                                   "streaming trainer cannot refit online; start from a model without leaves",
                                   "invalid")
            self.encoder, self.model_config, self.objectives = loaded.encoder, loaded.manifest["model"]["config"], \
                loaded.objective_configs
            self.model_config = ModelConfig.from_dict(self.model_config)
            self.start = {"model": f"{loaded.name}@{loaded.version}", "version": loaded.version}
            trained = loaded.module.state_dict()
        from ranking.dynamic_ids import IdTableConfig

        if ckpt is not None:   # the tables were sized when the trainer first started
            ids = {t: IdTableConfig(**c) for t, c in ckpt["id_tables"].items()}
        else:
            tables = {f.table_name: sum(k is not None for k in self.encoder.vocabs.get(f.table_name, ()))
                      for f in self.encoder.spec.sparse if f.type == "id"}
            errs = Errors()
            ids = id_tables_from_dict(errs, config.ids, "ids", tables)
            if errs:
                errs.raise_if_any(config.source, config.lines)
            for t, n in tables.items():   # every id table grows within a bound, unless configured otherwise
                ids.setdefault(t, IdTableConfig(capacity=max(2 * n, n + 100)))
        self.ids = DynamicIds(self.encoder, ids, now=time.time())
        self.module = MultiTaskRanker(self.encoder.embedding_bag_configs(), self.encoder.dense_dim, self.objectives,
                                      self.model_config)
        self.reference = MultiTaskRanker(self.encoder.embedding_bag_configs(), self.encoder.dense_dim,
                                         self.objectives, self.model_config)   # the version serving now
        self.loss_fn = MultiTaskLoss(self.objectives)
        self.optimizer = make_optimizer(self.module, TrainingConfig(lr=tc.lr, embedding_lr=tc.embedding_lr,
                                                                    weight_decay=tc.weight_decay))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.positions: dict[str, int] = {}       # "topic:partition" -> next offset of the applied records
        self.replay_until: dict[str, int] = {}
        self.seen: dict[str, float] = {}           # example_id -> served ts (dedupe of a re-published flush)
        self.seen_order: deque = deque()
        self.holdout: deque = deque(maxlen=config.guard.holdout_size)
        self.buffer: list[dict] = []
        self.fresh: list[float] = []               # last_event_at of the examples since the last publish
        self.published = self.start["version"] if ckpt is None else ckpt["published"]
        if ckpt is None:
            from ranking.dynamic_ids import load_grown

            load_grown(self.module, trained)
            self.reference.load_state_dict(self.module.state_dict())
        else:
            self._restore(ckpt, rank)
        self.refused_in_row = 0
        self.applied_at_publish = self.counters["applied"]   # when the serving version was published
        self.module.train()
        self.reference.eval()
        self._label_columns = [o.name for o in self.objectives]
        self._columns = sorted(set(self.encoder.spec.columns))
        self._lookups = [(f.name, f.lookup, next(g.table_name for g in self.encoder.spec.sparse
                                                 if g.type == "id" and g.column == f.lookup[0]))
                         for f in self.encoder.spec.sparse if f.lookup
                         and any(g.type == "id" and g.column == f.lookup[0] for g in self.encoder.spec.sparse)]

    # ---- records

    def add(self, topic: str, partition: int, offset: int, next_offset: int, value: dict) -> None:
        """Take one ``joined`` record: skip it when already applied (replay / duplicate), hold it back
        for the guard, or buffer it for the next step."""
        key = f"{topic}:{partition}"
        self.counters["records"] += 1
        self.positions[key] = max(self.positions.get(key, 0), next_offset)
        if offset < self.replay_until.get(key, -1):
            self.counters["replayed"] += 1
            return
        xid = value.get("example_id")
        if not isinstance(xid, str) or not self._valid(value):
            self.counters["invalid"] += 1
            return
        if xid in self.seen:
            self.counters["duplicates"] += 1
            return
        ts = value.get("ts")
        self.seen[xid] = ts
        self.seen_order.append((ts, xid))
        if _held_out(xid, self.config.guard.holdout_share):
            self.holdout.append(value)
            self.counters["held_out"] += 1
            return
        self.buffer.append(value)

    def _valid(self, value: dict) -> bool:
        ts = value.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            return False
        for o in self.objectives:
            y = value.get(o.name)
            if isinstance(y, bool) or not isinstance(y, (int, float)) or not math.isfinite(y):
                return False
            if (o.type == "binary" and y not in (0, 1)) or (o.transform == "log1p" and y < 0):
                return False
        return True

    def _expire_seen(self, now: float) -> None:
        cutoff = now - max(self.config.publish_interval_s * 10, 3600.0)
        while self.seen_order and self.seen_order[0][0] < cutoff:
            _, xid = self.seen_order.popleft()
            self.seen.pop(xid, None)

    # ---- training

    def _encode(self, rows: list[dict]):
        from ranking.models import transform_labels

        columns = {c: [r.get(c) for r in rows] for c in self._columns}
        batch = self.encoder.transform_columns(columns, len(rows))
        y = np.array([[r[name] for name in self._label_columns] for r in rows], dtype=np.float64)
        return columns, batch, transform_labels(y, self.objectives)

    def step(self) -> None:
        """Apply the buffered examples (one optimizer step per ``batch_size`` of them)."""
        import torch

        bs = self.config.training.batch_size
        while self.buffer:
            rows, self.buffer = self.buffer[:bs], self.buffer[bs:]
            self._apply(rows)

    def _apply(self, rows: list[dict]) -> None:
        """One optimizer step on ``rows`` (skipped, counted, when the loss is not finite)."""
        import torch

        now = max(r["ts"] for r in rows)
        self._admit({c: [r.get(c) for r in rows] for c in self._columns}, now)
        _, batch, y = self._encode(rows)
        out = self.training_module(batch.dense, batch.kjt)
        loss, _ = self.loss_fn(out, torch.from_numpy(y))
        self.optimizer.zero_grad(set_to_none=True)
        if not self._finite_loss(loss):
            self.counters["nonfinite_batches"] += 1
            self.counters["discarded"] += len(rows)
            return
        loss.backward()
        self.optimizer.step()
        self.counters["steps"] += 1
        self.counters["applied"] += len(rows)
        self.fresh += [r["last_event_at"] for r in rows if isinstance(r.get("last_event_at"), (int, float))]
        self._expire_seen(now)

    @property
    def training_module(self):
        """The module the steps run on (a DistributedModelParallel in a multi-rank trainer)."""
        return self.module

    @staticmethod
    def _finite_loss(loss) -> bool:
        import torch

        return bool(torch.isfinite(loss))

    def _admit(self, columns: dict, now: float) -> None:
        """New ids get rows (fresh: zero weights, zero Adagrad state); lookups learn new items' values."""
        import torch

        from ranking.dynamic_ids import table_key

        changed = self.ids.observe(columns, now)
        if changed:
            self._zero_rows(changed)
        for name, (key_col, value_col), table in self._lookups:
            known = self.encoder._row_table(table)
            mapping = self.encoder.maps.setdefault(name, {})
            for k, v in zip(columns.get(key_col) or (), columns.get(value_col) or ()):
                if isinstance(k, str) and isinstance(v, str) and k in known:
                    mapping[k] = v

    def _zero_rows(self, changed: dict[str, list[int]]) -> None:
        """Rows whose id changed start fresh: zero weights, zero Adagrad state."""
        import torch

        from ranking.dynamic_ids import table_key

        params = dict(self.module.named_parameters())
        adagrad = self.optimizer.optimizers[0]
        with torch.no_grad():
            for table, rows in changed.items():
                p = params[table_key(table)]
                idx = torch.tensor(rows, dtype=torch.long)
                p[idx] = 0.0
                state = adagrad.state.get(p)
                if state and "sum" in state:
                    state["sum"][idx] = 0.0

    # ---- the guard and publishing

    def holdout_loss(self, module) -> float:
        """Mean multi-task loss of ``module`` on the held-back examples (NaN with none)."""
        import torch

        rows = list(self.holdout)
        if not rows:
            return float("nan")
        module.eval()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(rows), 4096):
                part = rows[start:start + 4096]
                _, batch, y = self._encode(part)
                loss, _ = self.loss_fn(module(batch.dense, batch.kjt), torch.from_numpy(y))
                total += float(loss) * len(part)
        if module is self.module:
            module.train()
        return total / len(rows)

    @staticmethod
    def finite(module) -> bool:
        import torch

        return all(bool(torch.isfinite(p).all()) for p in module.parameters())

    def publish(self) -> dict:
        """Check the guard; publish a version (and prune old ones), or refuse it (going back to the
        serving weights when the guard says so)."""
        result = self.judge(self.module)
        if result.get("back"):
            self.module.load_state_dict(self.reference.state_dict())
            self._reset_optimizer()
        return result

    def judge(self, module) -> dict:
        """The guard on ``module`` (a plain model with the candidate weights); publishes it when it
        passes. ``back`` in the result: the training weights must go back to ``self.reference``."""
        from ranking.artifacts import save_model
        from ranking.registry import prune_versions

        g = self.config.guard
        candidate = self.holdout_loss(module) if len(self.holdout) else float("nan")
        serving = self.holdout_loss(self.reference) if len(self.holdout) >= g.min_holdout else float("nan")
        why = None
        if not self.finite(module) or (len(self.holdout) and not math.isfinite(candidate)):
            why = "non-finite weights or loss"
        elif math.isfinite(serving) and candidate > serving * (1.0 + g.max_loss_increase):
            why = f"holdout loss {candidate:.5f} > {serving:.5f} x (1 + {g.max_loss_increase:g})"
        if why is not None:
            self.counters["refused"] += 1
            self.refused_in_row += 1
            back = why.startswith("non-finite") or self.refused_in_row >= g.patience
            if back:
                self.counters["discarded"] += self.counters["applied"] - self.applied_at_publish
                self.fresh = []
                self.refused_in_row = 0
                self.applied_at_publish = self.counters["applied"]
            self.log(f"update refused ({why}); {self.config.name}@{self.published} keeps serving"
                     + ("; back to its weights" if back else ""))
            return {"published": None, "refused": why, "back": back}
        now = time.time()
        lags = np.array([now - t for t in self.fresh]) if self.fresh else np.zeros(0)
        freshness = {"examples": int(len(lags))}
        if len(lags):
            freshness.update(p50=float(np.percentile(lags, 50)), p99=float(np.percentile(lags, 99)),
                             max=float(lags.max()))
        metrics = {"valid": self._holdout_metrics(module), "stream": {"holdout_loss": candidate, "serving_loss": serving,
                                                                 "freshness_s": freshness, **self.counters,
                                                                 "ids": self.ids.stats()}}
        path = save_model(self.config.registry, self.config.name, module.state_dict(), self.encoder,
                          self.model_config, self.objectives, metrics,
                          data={"loader": "stream", "start_from": self.start["model"], "topic": self.config.topic},
                          train_config=self.config.source)
        self.published = path.name
        self.refused_in_row = 0
        self.applied_at_publish = self.counters["applied"]
        self.reference.load_state_dict(module.state_dict())
        self.fresh = []
        self.counters["published"] += 1
        pruned = prune_versions(self.config.registry, self.config.name, self.config.keep_versions)
        self.log(f"published {self.config.name}@{path.name} (holdout loss {candidate:.5f}, serving {serving:.5f}; "
                 f"{freshness['examples']} new examples, freshness p99 {freshness.get('p99', float('nan')):.1f} s"
                 + (f"; pruned {', '.join(pruned)}" if pruned else "") + ")")
        return {"published": path.name, "freshness_s": freshness}

    def _holdout_metrics(self, module) -> dict:
        import torch

        from ranking.metrics import auc
        from ranking.models import to_natural

        rows = list(self.holdout)
        out = {}
        if not rows:
            return out
        module.eval()
        with torch.no_grad():
            _, batch, y = self._encode(rows)
            p = to_natural(module(batch.dense, batch.kjt), self.objectives).double().numpy()
        if module is self.module:
            module.train()
        raw = np.array([[r[name] for name in self._label_columns] for r in rows], dtype=np.float64)
        for k, o in enumerate(self.objectives):
            if o.type == "binary" and 0 < raw[:, k].sum() < len(rows):
                out[o.name] = {"auc": float(auc(raw[:, k], p[:, k]))}
        return out

    def _reset_optimizer(self) -> None:
        from ranking.train import TrainingConfig, make_optimizer

        tc = self.config.training
        self.optimizer = make_optimizer(self.module, TrainingConfig(lr=tc.lr, embedding_lr=tc.embedding_lr,
                                                                    weight_decay=tc.weight_decay))

    # ---- checkpoints

    def _read_checkpoint(self) -> dict | None:
        import torch

        path = Path(self.config.checkpoint)
        if not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file: say which and what to do
            raise self.config.error("checkpoint", f"cannot read the trainer checkpoint {path}: {exc} (delete it "
                                    "to start again from start_from)", "io") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise self.config.error("checkpoint", f"{path} is not a format-{CHECKPOINT_FORMAT} trainer checkpoint",
                                    "invalid")
        return ckpt

    def rank_state(self) -> dict:
        """This trainer's own part of a checkpoint (a multi-rank trainer has one per rank)."""
        return {"positions": dict(self.positions), "seen": [[xid, ts] for ts, xid in self.seen_order],
                "counters": dict(self.counters), "fresh": list(self.fresh), "buffer": list(self.buffer)}

    def checkpoint(self) -> dict[tuple[str, int], int]:
        """Write the checkpoint (atomically); returns the positions to commit (examples consumed but
        not applied yet are in the checkpoint too)."""
        self._write_checkpoint(self.module.state_dict(), [o.state_dict() for o in self.optimizer.optimizers],
                               [self.rank_state()])
        return self.commit_positions()

    def commit_positions(self) -> dict[tuple[str, int], int]:
        return {(k.rpartition(":")[0], int(k.rpartition(":")[2])): v for k, v in self.positions.items()}

    def _write_checkpoint(self, model_state: dict, optimizers: list, ranks: list[dict]) -> None:
        import torch

        path = Path(self.config.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "model": model_state, "reference": self.reference.state_dict(),
                 "optimizers": optimizers, "encoder": self.encoder.state_dict(), "ids": self.ids.state_dict(),
                 "id_tables": {t: dataclasses.asdict(c) for t, c in self.ids.configs.items()},
                 "model_config": self.model_config.to_dict(), "objectives": [o.to_dict() for o in self.objectives],
                 "start": self.start, "published": self.published, "ranks": ranks}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _restore(self, ckpt: dict, rank: int = 0) -> None:
        if len(ckpt["ranks"]) != self.world:
            raise self.config.error("checkpoint", f"{self.config.checkpoint} was written by {len(ckpt['ranks'])} "
                                    f"rank(s), not {self.world}: run with --nproc {len(ckpt['ranks'])}", "conflict")
        self.module.load_state_dict(ckpt["model"])
        self.reference.load_state_dict(ckpt["reference"])
        if self.world == 1:   # a multi-rank trainer loads its dense optimizer once it is wrapped
            for opt, state in zip(self.optimizer.optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
        self.restored_optimizers = ckpt["optimizers"]
        self.ids.load_state_dict(ckpt["ids"])
        mine = ckpt["ranks"][rank]
        self.positions = dict(mine["positions"])
        self.replay_until = dict(mine["positions"])
        for xid, ts in mine["seen"]:
            self.seen[xid] = ts
            self.seen_order.append((ts, xid))
        self.counters.update(mine["counters"])
        self.fresh = list(mine["fresh"])
        self.buffer = list(mine["buffer"])


@dataclass
class StreamStats:
    trainer: StreamTrainer | None = None
    versions: list = field(default_factory=list)   # what each publish returned

    def to_dict(self) -> dict:
        t = self.trainer
        return {"published_version": t.published if t else None, **(t.counters if t else {}),
                "publishes": len(self.versions)}


def run_stream_trainer(config: StreamConfig, *, bus: EventBus | None = None, stop: threading.Event | None = None,
                       max_idle_s: float | None = None, stats: StreamStats | None = None, log_fn=log.info,
                       startup_grace_s: float = 15.0) -> StreamStats:
    """Train from ``config.topic`` until ``stop`` (or ``max_idle_s`` without records), publishing every
    ``publish_interval_s``; a clean stop applies what is buffered, publishes it and checkpoints."""
    own_bus = bus is None
    bus = bus or config.bus.open()
    stop = stop or threading.Event()
    trainer = StreamTrainer(config, log_fn)
    stats = stats or StreamStats()
    stats.trainer = trainer
    consumer = bus.consumer(config.consumer, [config.topic])
    last_publish = last_checkpoint = last_data = time.monotonic()
    waiting_since = None
    applied_at_publish = trainer.counters["applied"]

    def checkpoint() -> None:
        nonlocal last_checkpoint
        trainer.step()
        consumer.commit(trainer.checkpoint())
        last_checkpoint = time.monotonic()

    try:
        while not stop.is_set():
            records = consumer.poll(config.training.batch_size, min(0.2, config.training.max_wait_s))
            mono = time.monotonic()
            for r in records:
                trainer.add(r.topic, r.partition, r.offset, r.next_offset, r.value)
            if records:
                last_data = mono
            if trainer.buffer:
                waiting_since = waiting_since or mono
                if len(trainer.buffer) >= config.training.batch_size or mono - waiting_since >= config.training.max_wait_s:
                    trainer.step()
                    waiting_since = None
            if mono - last_publish >= config.publish_interval_s:
                trainer.step()
                if trainer.counters["applied"] > applied_at_publish:
                    stats.versions.append(trainer.publish())
                    applied_at_publish = trainer.counters["applied"]
                last_publish = mono
            if mono - last_checkpoint >= config.checkpoint_interval_s:
                checkpoint()
            if max_idle_s is not None and mono - last_data >= (max_idle_s if trainer.counters["records"]
                                                               else max(max_idle_s, startup_grace_s)):
                break
        trainer.step()
        if trainer.counters["applied"] > applied_at_publish:
            stats.versions.append(trainer.publish())
        checkpoint()
    finally:
        consumer.close()
        if own_bus:
            bus.close()
    return stats


class StreamTrainerThread:
    """Runs :func:`run_stream_trainer` in a daemon thread (the demo's streaming scenario)."""

    def __init__(self, config: StreamConfig, bus: EventBus | None = None):
        self.config, self.bus = config, bus
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = StreamStats()
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            run_stream_trainer(self.config, bus=self.bus, stop=self._stop, stats=self.stats)
        except BaseException as exc:  # noqa: BLE001 - reported through .error
            self.error = exc
            log.exception("streaming trainer stopped")

    def start(self) -> "StreamTrainerThread":
        self._thread = threading.Thread(target=self._run, name="stream-trainer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


__all__ = ["StreamConfig", "StreamTraining", "GuardConfig", "StreamTrainer", "StreamStats", "run_stream_trainer",
           "StreamTrainerThread"]
