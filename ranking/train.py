"""Offline training of the TorchRec multi-task rankers: ``stratarank train --config conf/train/X.yaml``.

Train config format::

    name: sim_mmoe                       # registry name
    data:
      loader: table                      # table (parquet/csv/tsv file or a folder of parquet),
                                         # sim (ranking.datasets.load_sim_logs), kuairand (load_kuairand),
                                         # served (the joiner's examples: ranking.datasets.load_served)
      path: runs/sim
      from_hour: 2026-12-06T10           # served: the hours to read (YYYY-MM-DDTHH, UTC; either end open)
      to_hour: 2026-12-06T16
      ips_clip: 20                       # served: inverse-propensity weights min(1/propensity, clip), mean 1
      time_column: ts                    # table: split by time (last fractions = valid, test)
      valid_fraction: 0.1
      test_fraction: 0.1
    features: conf/features/sim.yaml     # feature spec (path, relative to the repo or this file)
    objectives: conf/objectives/feed.yaml  # an objectives file, or an inline mapping
                                         #   {name: {type, transform?, label?}}
    labels: {watch_time: watch_time}     # objective -> data column (default: the objective's
                                         #   name, else its event)
    loss_weights: {click: 1.0, watch_time: 0.5}   # default 1.0 each (never the blend weights)
    model: {arch: mmoe, num_experts: 4, expert: [64, 32], tower: [32]}
    training: {epochs: 5, batch_size: 512, lr: 0.001, weight_decay: 0.0, patience: 2, seed: 0,
               threads: 2, max_rows: null}
    registry: registry
    leaves: {n_trees: 30, num_leaves: 31}   # optional: GBDT leaf ids as id_list column(s) (ranking/leaves.py)
    distill: {alpha: 0.5, folds: 5}         # optional: soft targets from a LightGBM teacher (ranking/distill.py)
    distill_from: {model: feed_mmoe, alpha: 0.5}   # optional: ... or from a registered TorchRec teacher
    serving: {quantize: int8}               # optional: int8 | int4 | none (default): a serving variant with
                                            #   row-wise quantized embedding tables (ranking/quantize.py)

Determinism: one ``seed`` sets numpy/torch/python RNGs and the per-epoch shuffles.
Dropped rows (missing or invalid labels) are counted and printed by reason — never silently.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from strategy.checks import NAME_RE, as_bool, as_dict, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, FieldError, ValidationError, join_path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = ("name", "data", "features", "objectives", "labels", "loss_weights", "model", "training", "registry",
            "leaves", "distill", "distill_from", "serving")
DATA_KEYS = ("loader", "path", "time_column", "valid_fraction", "test_fraction", "from_hour", "to_hour", "ips_clip")
LOADERS = ("table", "sim", "kuairand", "served")
TRAINING_KEYS = ("epochs", "batch_size", "lr", "embedding_lr", "weight_decay", "patience", "seed", "threads",
                 "max_rows", "eval_batch_size", "refit")


@dataclass(frozen=True)
class DataConfig:
    loader: str = "table"
    path: str = ""
    time_column: str | None = "ts"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    from_hour: str | None = None   # served: first and last hour to read (YYYY-MM-DDTHH)
    to_hour: str | None = None
    ips_clip: float | None = None  # served: inverse-propensity training weights, clipped here


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 5
    batch_size: int = 512
    eval_batch_size: int = 8192
    lr: float = 1e-3            # Adam, dense parameters (MLPs, gates, towers)
    embedding_lr: float = 0.05  # Adagrad, embedding tables (fbgemm's fused CPU kernels under DMP
                                # support (row-wise) Adagrad and SGD, not Adam: same rule both paths)
    weight_decay: float = 0.0
    patience: int = 2
    seed: int = 0
    threads: int = 2
    max_rows: int | None = None
    refit: bool = False         # benchmark (ranking.benchmark.TorchRecRanker): after early stopping, retrain
                                # from scratch on train + valid for the best number of epochs (the most
                                # recent rows matter on a time split; LightGBMRanker refits the same way)


@dataclass(frozen=True)
class TrainConfig:
    name: str
    data: DataConfig
    features: str
    objectives: tuple  # of ObjectiveConfig
    model: object       # ModelConfig
    training: TrainingConfig
    registry: str = "registry"
    source: str | None = None
    lines: dict = field(default_factory=dict, repr=False, compare=False)
    leaves: object | None = None   # ranking.leaves.LeavesConfig: GBDT leaf ids as an id_list column
    distill: object | None = None  # ranking.distill.DistillConfig: soft targets from a LightGBM teacher
    distill_from: object | None = None  # ranking.distill.DistillFromConfig: ... from a registered TorchRec model
    serving: object | None = None  # ranking.quantize.ServingConfig: the quantized serving variant to register

    def error(self, path: str, message: str, code: str) -> FieldError:
        from strategy.errors import _line_for

        return FieldError(path, message, code, self.source, _line_for(path, self.lines) if self.lines else None)


def _resolve(path: str, base: Path | None) -> str:
    """A config-relative path: as given if it exists (cwd), else relative to the config's folder / repo."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    for root in ([base] if base else []) + [REPO_ROOT]:
        if (root / p).exists():
            return str(root / p)
    return str(p)


def _objectives_from(errs: Errors, value, labels: dict, weights: dict, base: Path | None) -> tuple:
    """ObjectiveConfig tuple from an objectives file path or an inline mapping."""
    from .models import ObjectiveConfig

    if isinstance(value, str):
        from strategy.config import load_strategy

        strategy = load_strategy(_resolve(value, base))
        items = [(o.name, o.type, o.transform, o.event) for o in strategy.objectives]
    else:
        obj = as_dict(errs, value, "objectives") or {}
        if not obj:
            errs.add("objectives", "at least one objective is required", "required")
        items = []
        for name, spec in obj.items():
            path = join_path("objectives", name)
            spec = as_dict(errs, spec, path)
            if spec is None:
                continue
            check_keys(errs, spec, path, ("type", "transform", "label", "event", "weight"))
            otype = as_str(errs, spec.get("type", "binary"), f"{path}.type", choices=("binary", "regression"))
            tr = as_str(errs, spec.get("transform", "identity"), f"{path}.transform", choices=("identity", "log1p"))
            if spec.get("label") is not None:
                labels.setdefault(name, as_str(errs, spec["label"], f"{path}.label"))
            event = as_str(errs, spec["event"], f"{path}.event") if spec.get("event") is not None else None
            items.append((name, otype or "binary", tr or "identity", event))
    names = [it[0] for it in items]
    for section, mapping in (("labels", labels), ("loss_weights", weights)):
        for key in mapping:
            if key not in names:
                errs.add(f"{section}.{key}", f"unknown objective '{key}' (objectives: {', '.join(names)})",
                         "unknown_objective")
    out = []
    for name, otype, transform, event in items:
        w = as_number(errs, weights.get(name, 1.0), f"loss_weights.{name}", lo=0, lo_open=True)
        label = labels.get(name)
        if label is not None and not isinstance(label, str):
            errs.add(f"labels.{name}", "expected a column name", "type")
            label = None
        out.append(ObjectiveConfig(name, otype, transform, float(w or 1.0), label, event))
    return tuple(out)


def train_config_from_dict(data, source: str | None = None, lines: dict | None = None) -> TrainConfig:
    """Validate a train config mapping (every problem at once, with file:line)."""
    from .models import ModelConfig, model_config_from_dict

    base = Path(source).resolve().parent if source and not source.startswith("<") else None
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", TOP_KEYS, required=("name", "data", "features", "objectives"))
    name = as_str(errs, obj.get("name", ""), "name", pattern=NAME_RE) if "name" in obj else None

    data_cfg = None
    d = as_dict(errs, obj.get("data", {}), "data")
    if d is not None:
        before = len(errs.items)
        check_keys(errs, d, "data", DATA_KEYS)
        loader = as_str(errs, d.get("loader", "table"), "data.loader", choices=LOADERS)
        path = d.get("path", "")
        if loader != "kuairand" and not path:
            errs.add("data.path", "required", "required")
        path = as_str(errs, path or "", "data.path") if path is not None else ""
        tcol = d.get("time_column", "ts")
        if tcol is not None:
            tcol = as_str(errs, tcol, "data.time_column")
        vf = as_number(errs, d.get("valid_fraction", 0.1), "data.valid_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
        tf = as_number(errs, d.get("test_fraction", 0.1), "data.test_fraction", lo=0, hi=1, hi_open=True)
        served = {}
        for key in ("from_hour", "to_hour", "ips_clip"):
            if d.get(key) is None:
                continue
            if loader != "served":
                errs.add(f"data.{key}", f"only for loader: served (this one is '{loader}')", "invalid")
            elif key == "ips_clip":
                served[key] = as_number(errs, d[key], "data.ips_clip", lo=1, hi=1e6)
            else:
                from .datasets import HOUR_RE

                served[key] = as_str(errs, str(d[key]), f"data.{key}", pattern=HOUR_RE)
        if served.get("from_hour") and served.get("to_hour") and served["from_hour"] > served["to_hour"]:
            errs.add("data.from_hour", f"'{served['from_hour']}' is after to_hour '{served['to_hour']}'", "range")
        if len(errs.items) == before:
            data_cfg = DataConfig(loader, _resolve(path, base) if path else "", tcol, float(vf), float(tf), **served)

    features = as_str(errs, obj.get("features", ""), "features")
    labels = as_dict(errs, obj.get("labels") or {}, "labels") or {}
    weights = as_dict(errs, obj.get("loss_weights") or {}, "loss_weights") or {}
    objectives = ()
    external: list[FieldError] = []  # errors of the referenced objectives file keep their own file:line
    if "objectives" in obj:
        try:
            objectives = _objectives_from(errs, obj["objectives"], dict(labels), weights, base)
        except ValidationError as exc:
            external = list(exc.errors)
    model = model_config_from_dict(errs, obj.get("model") or {}, "model") or ModelConfig()

    t = as_dict(errs, obj.get("training") or {}, "training") or {}
    check_keys(errs, t, "training", TRAINING_KEYS)
    tk = {}
    ranges = {"epochs": (1, 10_000, True), "batch_size": (1, 1 << 20, True), "eval_batch_size": (1, 1 << 22, True),
              "lr": (0, 10, False), "embedding_lr": (0, 100, False), "weight_decay": (0, 10, False), "patience": (1, 1000, True),
              "seed": (0, 2 ** 31, True), "threads": (1, 256, True), "max_rows": (1, 10 ** 10, True)}
    for key, (lo, hi, integer) in ranges.items():
        if t.get(key) is not None:
            v = as_number(errs, t[key], f"training.{key}", lo=lo, hi=hi, integer=integer,
                          lo_open=key in ("lr", "embedding_lr"))
            if v is not None:
                tk[key] = v
    if t.get("refit") is not None and as_bool(errs, t["refit"], "training.refit") is not None:
        tk["refit"] = t["refit"]
    registry = as_str(errs, obj.get("registry", "registry"), "registry") or "registry"
    leaves = distill = distill_from = None
    if obj.get("leaves") is not None:
        from .leaves import leaves_config_from_dict

        leaves = _binary_section(errs, "leaves", "GBDT leaves", objectives, leaves_config_from_dict(
            errs, obj["leaves"], "leaves", [o.name for o in objectives] if objectives else None))
    if obj.get("distill") is not None:
        from .distill import distill_config_from_dict

        distill = _binary_section(errs, "distill", "the distillation teacher", objectives, distill_config_from_dict(
            errs, obj["distill"], "distill", [o.name for o in objectives] if objectives else None))
    if obj.get("distill_from") is not None:
        from .distill import distill_from_config_from_dict

        distill_from = _binary_section(errs, "distill_from", "the teacher's soft targets", objectives,
                                       distill_from_config_from_dict(errs, obj["distill_from"], "distill_from",
                                                                     [o.name for o in objectives] if objectives else None))
        if distill is not None and distill_from is not None:
            errs.add("distill_from", "one teacher at a time: distill (LightGBM) or distill_from (a registered "
                     "model)", "conflict")
    serving = None
    if obj.get("serving") is not None:
        from .quantize import serving_config_from_dict

        serving = serving_config_from_dict(errs, obj["serving"], "serving")
    try:
        errs.raise_if_any(source, lines)
    except ValidationError as exc:
        raise ValidationError(exc.errors + external) from None
    if external:
        raise ValidationError(external)
    cfg = TrainConfig(name, data_cfg, _resolve(features, base), objectives, model, TrainingConfig(**tk),
                      registry, source, dict(lines or {}), leaves, distill, distill_from, serving)
    return cfg


def _binary_section(errs: Errors, section: str, what: str, objectives, cfg):
    """A ``leaves`` / ``distill`` config with its objectives resolved: the listed ones (each must be
    binary) or, when none are listed, every binary objective of the config."""
    if cfg is None or not objectives:
        return cfg
    import dataclasses

    types = {o.name: o.type for o in objectives}
    chosen = cfg.objectives or tuple(k for k, t in types.items() if t == "binary")
    if not chosen:
        errs.add(f"{section}.objectives", f"no binary objective to fit {what} on", "required")
    for i, k in enumerate(cfg.objectives or ()):
        if types.get(k) != "binary":
            errs.add(f"{section}.objectives[{i}]", f"objective '{k}' is a {types.get(k)}; {what} "
                     "fits binary objectives only", "invalid")
    return dataclasses.replace(cfg, objectives=tuple(chosen))


def load_train_config(path: str | Path) -> TrainConfig:
    data, lines = read_yaml(path)
    return train_config_from_dict(data, source=str(path), lines=lines)


# ---------------------------------------------------------------- data


@dataclass
class Prepared:
    """Everything a training process needs, computed deterministically from the config."""

    encoder: object
    objectives: tuple
    train: object          # FeatureBatch
    y_train: np.ndarray    # (N, K) training targets (transformed)
    valid: object
    y_valid: np.ndarray    # raw labels
    test: object | None
    y_test: np.ndarray | None
    description: dict
    dropped: dict
    leaves: object | None = None   # ranking.leaves.LeafFeatures (fitted) when the config has a leaves section
    w_train: np.ndarray | None = None  # (N,) per-row training weights (inverse propensity), mean 1


def _read_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise ValidationError([FieldError("data.path", "file or folder not found", "missing_file", str(p))])
    try:
        if p.is_dir():
            # a world's output folder: its impressions (events.parquet is another table)
            files = [p / "impressions.parquet"] if (p / "impressions.parquet").exists() else sorted(p.glob("*.parquet"))
            if not files:
                raise ValidationError([FieldError("data.path", "folder holds no .parquet file", "missing_file", str(p))])
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        if p.suffix == ".parquet":
            return pd.read_parquet(p)
        return pd.read_csv(p, sep="\t" if p.suffix in (".tsv", ".tab") else ",")
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError([FieldError("data.path", f"cannot read: {exc}", "io", str(p))]) from None


def load_frames(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, dict]:
    """(train, valid, test-or-None, description) for the config's data section."""
    d = cfg.data
    if d.loader == "kuairand":
        from .datasets import load_kuairand

        ds = load_kuairand(d.path or None)
        train, test = ds.train, ds.test
        train, valid = _time_split(train, "ts", d.valid_fraction)
        desc = {"loader": "kuairand", "path": d.path, "summary": ds.summary(), "dense_columns": ds.dense_columns}
        return train, valid, test, desc
    if d.loader == "served":
        from .datasets import load_served
        from .features import load_feature_spec

        names = {o.name: o.type for o in cfg.objectives}
        spec = load_feature_spec(cfg.features)
        computed = leaves_feature_check(cfg, spec)   # GBDT leaf columns are computed, never logged
        columns = [c for c in spec.columns if c not in computed]
        ds = load_served(d.path, names, d.valid_fraction, max(d.test_fraction, 1e-9), (d.from_hour, d.to_hour),
                         columns, d.ips_clip)
        return ds.train, ds.valid, ds.test, {"loader": "served", "path": d.path, "hours": [d.from_hour, d.to_hour],
                                             "ips_clip": d.ips_clip, "summary": ds.summary(),
                                             "dense_columns": ds.dense_columns}
    if d.loader == "sim":
        from .datasets import load_sim_logs

        names = {o.name: o.type for o in cfg.objectives}
        ds = load_sim_logs(d.path, names, valid_frac=d.valid_fraction, test_frac=max(d.test_fraction, 1e-9))
        return ds.train, ds.valid, ds.test, {"loader": "sim", "path": d.path, "summary": ds.summary(),
                                             "dense_columns": ds.dense_columns}
    frame = _read_table(d.path)
    desc = {"loader": "table", "path": d.path, "rows": len(frame)}
    if d.time_column and d.time_column not in frame.columns:
        raise ValidationError([cfg.error("data.time_column", f"time column '{d.time_column}' is not in {d.path}",
                                         "unknown_column")])
    if d.time_column:
        frame = frame.sort_values(d.time_column, kind="mergesort").reset_index(drop=True)
    n = len(frame)
    n_test = int(round(n * d.test_fraction))
    n_valid = int(round(n * d.valid_fraction))
    train = frame.iloc[: n - n_test - n_valid].reset_index(drop=True)
    valid = frame.iloc[n - n_test - n_valid: n - n_test].reset_index(drop=True)
    test = frame.iloc[n - n_test:].reset_index(drop=True) if n_test else None
    return train, valid, test, desc


def _time_split(frame: pd.DataFrame, column: str, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = frame.sort_values(column, kind="mergesort").reset_index(drop=True) if column in frame else frame
    n_valid = max(1, int(round(len(frame) * fraction)))
    return frame.iloc[: len(frame) - n_valid].reset_index(drop=True), frame.iloc[len(frame) - n_valid:].reset_index(drop=True)


def label_columns(cfg_or_objectives, frame: pd.DataFrame, source: str | None = None,
                  lines: dict | None = None, what: str = "data") -> list[str]:
    """The data column of each objective; a missing one is a ValidationError naming it."""
    from strategy.errors import _line_for

    objectives = getattr(cfg_or_objectives, "objectives", cfg_or_objectives)
    errors, cols = [], []
    for o in objectives:
        found = next((c for c in o.label_candidates() if c in frame.columns), None)
        if found is None:
            looked = ", ".join(f"'{c}'" for c in o.label_candidates())
            path = f"labels.{o.name}" if o.label else f"objectives.{o.name}"
            errors.append(FieldError(path, f"objective '{o.name}' has no label column in the {what} "
                                           f"(looked for {looked})", "missing_label", source,
                                     _line_for(path, lines or {}) if lines else None))
        cols.append(found)
    if errors:
        raise ValidationError(errors)
    return cols


def clean_labels(frame: pd.DataFrame, objectives, columns: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(raw labels (N, K) float64, keep mask (N,), {reason: rows}) — each dropped row counted once,
    under its first reason."""
    y = np.empty((len(frame), len(objectives)), dtype=np.float64)
    keep = np.ones(len(frame), dtype=bool)
    reasons: dict[str, int] = {}
    for k, (o, col) in enumerate(zip(objectives, columns)):
        raw = frame[col]
        v = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        checks = [(raw.isna().to_numpy(), f"missing label '{col}'"),
                  (np.isnan(v) & raw.notna().to_numpy(), f"non-numeric label '{col}'"),
                  (~np.isfinite(v) & ~np.isnan(v), f"infinite label '{col}'")]
        if o.type == "binary":
            checks.append((np.isfinite(v) & ~np.isin(v, (0.0, 1.0)), f"label '{col}' not 0/1"))
        elif o.transform == "log1p":
            checks.append((np.isfinite(v) & (v < 0), f"negative label '{col}' (log1p needs >= 0)"))
        for bad, why in checks:
            new = bad & keep
            if new.any():
                reasons[why] = reasons.get(why, 0) + int(new.sum())
                keep &= ~bad
        y[:, k] = v
    return y, keep, reasons


def prepare(cfg: TrainConfig, log=print) -> Prepared:
    """Load the data, drop invalid rows (printing why), fit the encoder on train, encode all splits."""
    from .features import FeatureEncoder, load_feature_spec
    from .models import transform_labels

    spec = load_feature_spec(cfg.features)
    train, valid, test, desc = load_frames(cfg)
    if cfg.training.max_rows and len(train) > cfg.training.max_rows:
        train = train.iloc[len(train) - cfg.training.max_rows:].reset_index(drop=True)
        desc["max_rows"] = cfg.training.max_rows
    dense_columns = desc.pop("dense_columns", None)   # the loader's numeric inputs (GBDT leaves read them)
    encoder = FeatureEncoder(spec)
    leaf_cols = leaves_feature_check(cfg, spec)
    encoder.check_columns(train, f"data ({cfg.data.path or cfg.data.loader})", optional=leaf_cols)
    columns = label_columns(cfg, train, cfg.source, cfg.lines, f"data ({cfg.data.path or cfg.data.loader})")
    splits, dropped = {}, {}
    for split, frame in (("train", train), ("valid", valid), ("test", test)):
        if frame is None or not len(frame):
            splits[split] = None
            continue
        y, keep, reasons = clean_labels(frame, cfg.objectives, columns)
        if reasons:
            dropped[split] = {"rows": int((~keep).sum()), "of": len(frame), "reasons": reasons}
            log(f"{split}: dropped {int((~keep).sum()):,} of {len(frame):,} rows: "
                + "; ".join(f"{n:,} {why}" for why, n in reasons.items()))
            frame = frame.loc[keep].reset_index(drop=True)
            y = y[keep]
        splits[split] = (frame, y)
    if splits["train"] is None or splits["valid"] is None:
        raise ValidationError([FieldError("data", "no rows left for training/validation after the split",
                                          "empty", cfg.source)])
    leaves = None
    columns_in = dense_columns or [f.column for f in spec.dense]   # the GBDTs' inputs
    if cfg.leaves is not None:
        leaves = fit_leaves(cfg, splits["train"][0], splits["train"][1], columns_in, log)
        splits = {s: (leaves.add_column(v[0]), v[1]) if v else None for s, v in splits.items()}
        desc["leaves"] = {"fit_rows": leaves.fit_rows, "trees": leaves.max_len, "column": leaves.column}
    if cfg.distill is not None:
        teacher, y_soft = fit_teacher(cfg, splits["train"], splits["valid"], columns_in, log)
        splits["train"] = (splits["train"][0], y_soft)
        desc["distill"] = teacher.describe()
    if cfg.distill_from is not None:
        from .distill import registered_teacher_targets

        y_soft, desc["distill_from"] = registered_teacher_targets(cfg, splits["train"][0], splits["train"][1],
                                                                  cfg.registry, log)
        splits["train"] = (splits["train"][0], y_soft)
    encoder.fit(splits["train"][0])
    enc = {s: (encoder.transform(v[0]), v[1]) if v else (None, None) for s, v in splits.items()}
    desc.update({f"{s}_rows": (len(v[0]) if v else 0) for s, v in splits.items()})
    desc["label_columns"] = dict(zip([o.name for o in cfg.objectives], columns))
    desc["dropped"] = dropped
    w_train = None
    if "weight" in splits["train"][0].columns:   # inverse-propensity weights of served logs (data.ips_clip)
        w_train = splits["train"][0]["weight"].to_numpy(dtype=np.float64)
        desc["weights"] = {"mean": float(w_train.mean()), "max": float(w_train.max())}
    return Prepared(encoder, cfg.objectives, enc["train"][0], transform_labels(enc["train"][1], cfg.objectives),
                    enc["valid"][0], enc["valid"][1], enc["test"][0], enc["test"][1], desc, dropped, leaves, w_train)


def leaves_feature_check(cfg: TrainConfig, spec) -> frozenset:
    """With a ``leaves`` section, the feature spec must read each leaf column as an ``id_list`` long enough
    for one leaf per tree (and, with ``leaves.scores``, each score column as a dense feature); returns the
    columns the leaves add (absent from the raw data)."""
    if cfg.leaves is None:
        return frozenset()
    from .leaves import LeafFeatures

    lc = cfg.leaves
    objs = tuple(lc.objectives or ())
    shape = LeafFeatures(objs or ("_",), ["_"], column=lc.column, per_objective=lc.per_objective, scores=lc.scores)
    errors = []
    wanted = [(col, "id_list", "leaves.column", lc.n_trees * len(objs), f"{len(objs)} objectives")
              for col, objs in shape.leaf_columns.items()]
    wanted += [(col, "dense", "leaves.scores", None, "") for col in shape.score_columns]
    for col, kind, key, per_row, objs in wanted:
        feats = [f for f in spec.features if f.column == col]
        if not feats:
            extra = f", max_len: {per_row}" if per_row else ""
            errors.append(cfg.error(key, f"the feature spec {spec.source or spec.name} has no feature reading the "
                                    f"GBDT column '{col}' (add {{name: {col}, type: {kind}, column: {col}{extra}}})",
                                    "unknown_column"))
        for f in feats:
            if f.type != kind:
                errors.append(cfg.error(key, f"feature '{f.name}' reads the GBDT column '{col}' as '{f.type}'; "
                                        f"it must be {kind}", "invalid"))
            elif per_row and f.max_len < per_row:
                errors.append(cfg.error("leaves.n_trees", f"{per_row} leaf ids per row ({lc.n_trees} trees x "
                                        f"{objs}) but feature '{f.name}' keeps max_len {f.max_len}", "invalid"))
    if errors:
        raise ValidationError(errors)
    return frozenset(shape.columns)


def fit_leaves(cfg: TrainConfig, frame: pd.DataFrame, y: np.ndarray, feature_columns, log=print):
    """Fit the config's :class:`ranking.leaves.LeafFeatures` on training rows ``frame`` (raw labels ``y``
    in ``cfg.objectives`` order): on the earliest ``fit_fraction`` of them by time."""
    from .leaves import LeafFeatures, earliest

    t0 = time.perf_counter()
    lc = cfg.leaves
    names = [o.name for o in cfg.objectives]
    idx = [names.index(k) for k in lc.objectives]
    keep = earliest(frame, lc.fit_fraction, cfg.data.time_column or "ts")
    leaves = LeafFeatures.from_config(lc, lc.objectives, feature_columns)
    sub = frame.loc[keep] if not keep.all() else frame
    leaves.fit(sub, y[keep][:, idx])
    leaves.fit_rows = int(keep.sum())
    log(f"leaves: {lc.n_trees} trees x {len(lc.objectives)} objectives ({', '.join(lc.objectives)}) on "
        f"{leaves.fit_rows:,} of {len(frame):,} training rows, {len(feature_columns)} columns "
        f"({time.perf_counter() - t0:.1f}s)")
    return leaves


def fit_teacher(cfg: TrainConfig, train: tuple, valid: tuple, feature_columns, log=print):
    """Fit the config's :class:`ranking.distill.Teacher` on the training rows (early stopping on the
    validation rows); ``train`` / ``valid``: ``(frame, raw labels in cfg.objectives order)``. Returns the
    teacher and the training labels with its objectives' columns softened (the others unchanged)."""
    from .distill import Teacher

    t0 = time.perf_counter()
    dc = cfg.distill
    names = [o.name for o in cfg.objectives]
    idx = [names.index(k) for k in dc.objectives]
    teacher = Teacher.from_config(dc, dc.objectives, feature_columns)
    teacher.fit(train[0], train[1][:, idx], valid[0], valid[1][:, idx])
    y = np.array(train[1], dtype=np.float64)
    y[:, idx] = teacher.soft_targets(train[1][:, idx])
    log(f"distill: LightGBM teacher on {len(train[0]):,} training rows, {len(feature_columns)} columns, "
        f"rounds {teacher.rounds_}, out-of-fold AUC "
        + ", ".join(f"{k} {v:.4f}" for k, v in teacher.oof_auc_.items())
        + f"; targets = {dc.alpha:g} x label + {1 - dc.alpha:g} x teacher ({time.perf_counter() - t0:.1f}s)")
    return teacher, y


# ---------------------------------------------------------------- metrics


def evaluate_outputs(outputs: np.ndarray, labels: np.ndarray, objectives) -> dict:
    """Per-objective metrics of raw model outputs (N, K) against raw labels (N, K).

    Binary: ``auc``, ``logloss``, ``mean_pred``, ``mean_label``. Regression: ``rmse`` in the
    transformed space, ``mean_pred``/``mean_label`` in natural units."""
    try:
        from .metrics import auc, logloss
    except ImportError:  # pragma: no cover - metrics.py is another engineer's module
        from sklearn.metrics import log_loss, roc_auc_score

        def auc(y, p):
            return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")

        def logloss(y, p):
            return float(log_loss(y, p, labels=[0, 1]))
    out = {}
    for k, o in enumerate(objectives):
        y, z = labels[:, k], outputs[:, k].astype(np.float64)
        if o.type == "binary":
            p = 1.0 / (1.0 + np.exp(-z))
            out[o.name] = {"auc": auc(y, p), "logloss": logloss(y, np.clip(p, 1e-7, 1 - 1e-7)),
                           "mean_pred": float(p.mean()), "mean_label": float(y.mean())}
        else:
            t = np.log1p(np.clip(y, 0, None)) if o.transform == "log1p" else y
            nat = np.expm1(z).clip(0) * float(o.output_scale) if o.transform == "log1p" else z
            out[o.name] = {"rmse": float(np.sqrt(np.mean((z - t) ** 2))), "mean_pred": float(nat.mean()),
                           "mean_label": float(y.mean())}
    return out


def monitor_value(metrics: dict, objectives) -> float:
    """Early-stopping score (higher is better): mean AUC of the binary objectives, else -mean rmse."""
    aucs = [metrics[o.name]["auc"] for o in objectives if o.type == "binary"]
    aucs = [a for a in aucs if a == a]
    if aucs:
        return float(np.mean(aucs))
    rmses = [metrics[o.name]["rmse"] for o in objectives if o.type == "regression"]
    return -float(np.mean(rmses)) if rmses else float("nan")


# ---------------------------------------------------------------- loop


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict_outputs(model, batch, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Raw outputs (N, K) of ``batch``; with ``world > 1`` each rank runs an equal share of padded
    chunks (the sharded forward is collective) and the shares are all-gathered."""
    import torch

    n = len(batch)
    if world == 1:
        outs = []
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                part = batch.select(slice(s, min(n, s + batch_size)))
                outs.append(model(part.dense, part.kjt).float().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0))
    import torch.distributed as dist

    per = max(1, batch_size // world)
    chunk = per * world
    n_chunks = max(1, math.ceil(n / chunk))
    padded = np.arange(n_chunks * chunk) % max(n, 1)
    local = []
    with torch.no_grad():
        for c in range(n_chunks):
            idx = padded[c * chunk + rank * per: c * chunk + (rank + 1) * per]
            part = batch.select(idx)
            local.append(model(part.dense, part.kjt).float().numpy())
    local = np.concatenate(local)
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    # reassemble: chunk c, rank r holds rows c*chunk + r*per ... + per
    full = np.empty((n_chunks * chunk, local.shape[1]), dtype=np.float32)
    for r, arr in enumerate(gathered):
        for c in range(n_chunks):
            full[c * chunk + r * per: c * chunk + (r + 1) * per] = arr[c * per:(c + 1) * per]
    return full[:n]


class _Optimizers:
    """Steps several optimizers as one."""

    def __init__(self, *optimizers):
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def make_optimizer(model, tcfg: TrainingConfig):
    """Adagrad (``embedding_lr``) on the embedding tables, Adam (``lr``) on everything else — the
    same update rule the DMP path runs (fused Adagrad in fbgemm for the sharded tables)."""
    import torch

    emb = [p for n, p in model.named_parameters() if n.startswith("ebc.")]
    dense = [p for n, p in model.named_parameters() if not n.startswith("ebc.")]
    return _Optimizers(torch.optim.Adagrad(emb, lr=tcfg.embedding_lr, eps=1e-8) if emb else None,
                       torch.optim.Adam(dense, lr=tcfg.lr, weight_decay=tcfg.weight_decay))


def fit(model, prep: Prepared, tcfg: TrainingConfig, *, rank: int = 0, world: int = 1, log=print,
        get_state=None, progress: bool = True, optimizer=None) -> dict:
    """Train with Adam, validate each epoch, stop early; returns the history and the best state.

    ``get_state()`` returns a full CPU state_dict (called on every rank: it may be collective); it
    defaults to a copy of ``model.state_dict()``. ``optimizer`` defaults to Adam over all parameters
    (the DMP path passes one over the dense parameters; its tables update in the backward pass).
    """
    import torch
    from tqdm import tqdm

    from .models import MultiTaskLoss, fit_dense_encodings

    # quantile bin edges of a model's dense encoding (model.dense_encoding) come from the training rows;
    # every rank sees the same rows, so DMP ranks fit identical edges (already fitted ones are kept)
    fit_dense_encodings(model, prep.train.dense)
    loss_fn = MultiTaskLoss(prep.objectives)
    if optimizer is None:
        optimizer = make_optimizer(model, tcfg)
    get_state = get_state or (lambda: {k: v.detach().clone() for k, v in model.state_dict().items()})
    y_train = torch.from_numpy(prep.y_train)
    w_train = torch.from_numpy(prep.w_train).float() if prep.w_train is not None else None
    n = len(prep.train)
    bs = tcfg.batch_size
    history, best, best_state, best_epoch, bad = [], -math.inf, None, 0, 0
    show = progress and rank == 0
    t_train = 0.0
    seen = 0
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        perm = np.random.default_rng([tcfg.seed, epoch]).permutation(n)
        n_batches = math.ceil(n / bs)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{tcfg.epochs}", unit="batch", disable=not show,
                   file=sys.stderr, mininterval=0.5, leave=False)
        total, count = 0.0, 0
        t0 = time.perf_counter()
        for b in bar:
            idx = perm[b * bs:(b + 1) * bs]
            scale = 1.0
            if world > 1:
                # split the global batch between the ranks (sizes may differ by one row); scaling each
                # rank's mean loss by its share makes DDP's gradient average the global batch mean
                if len(idx) < world:
                    continue
                n_global = len(idx)
                idx = np.array_split(idx, world)[rank]
                scale = world * len(idx) / n_global
            part = prep.train.select(idx)
            out = model(part.dense, part.kjt)
            rows = torch.from_numpy(idx)
            loss, _ = loss_fn(out, y_train[rows], w_train[rows] if w_train is not None else None)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if show and b % 20 == 0:
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        bar.close()
        t_epoch = time.perf_counter() - t0
        t_train += t_epoch
        seen += count * world
        model.eval()
        outputs = predict_outputs(model, prep.valid, tcfg.eval_batch_size, rank, world)
        metrics = evaluate_outputs(outputs, prep.y_valid, prep.objectives)
        score = monitor_value(metrics, prep.objectives)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "valid": metrics, "score": score,
                        "seconds": round(t_epoch, 3)})
        if rank == 0:
            parts = ", ".join(f"{k} auc {v['auc']:.4f}" if "auc" in v else f"{k} rmse {v['rmse']:.4f}"
                              for k, v in metrics.items())
            log(f"epoch {epoch}: train loss {total / max(count, 1):.4f}, {count * world / t_epoch:,.0f} ex/s; "
                f"valid {parts}")
        if score != score:  # nan: validation rows of a single class for every objective
            score = -math.inf
        if best_state is None or score > best + 1e-5:
            best, best_epoch, bad = score, epoch, 0
            best_state = get_state()
        else:
            bad += 1
            if bad >= tcfg.patience:
                if rank == 0:
                    log(f"early stopping: no improvement for {bad} epoch(s); best epoch {best_epoch}")
                break
    return {"history": history, "best_epoch": best_epoch, "best_score": best, "best_state": best_state,
            "train_seconds": t_train, "examples_per_second": seen / t_train if t_train else 0.0}


def final_metrics(model, prep: Prepared, tcfg: TrainingConfig, rank: int = 0, world: int = 1) -> dict:
    """Validation and (if any) test metrics of ``model`` (call after loading the best state).

    Also sets each log1p regression's ``output_scale`` in ``prep.objectives`` (Duan's smearing factor
    on the validation rows, see :func:`ranking.models.smearing_factor`): the registry saves those
    objectives, so served natural-unit predictions are unbiased in mean."""
    from .models import with_smearing

    valid_out = predict_outputs(model, prep.valid, tcfg.eval_batch_size, rank, world)
    prep.objectives = with_smearing(prep.objectives, valid_out, prep.y_valid)
    out = {"valid": evaluate_outputs(valid_out, prep.y_valid, prep.objectives)}
    if prep.test is not None:
        out["test"] = evaluate_outputs(predict_outputs(model, prep.test, tcfg.eval_batch_size, rank, world),
                                       prep.y_test, prep.objectives)
    return out


def train_from_config(cfg: TrainConfig, registry: str | None = None, log=print, progress: bool = True,
                      register: bool = True) -> dict:
    """Single-process training end to end: prepare, fit, evaluate, register. Returns a summary dict
    (``version``, ``metrics``, ``path``, ...)."""
    import torch

    from .models import build_model

    torch.set_num_threads(cfg.training.threads)
    seed_everything(cfg.training.seed)
    t0 = time.perf_counter()
    prep = prepare(cfg, log)
    log(f"data: train {len(prep.train):,}, valid {len(prep.valid):,}, test {len(prep.test) if prep.test else 0:,} "
        f"rows; {len(prep.encoder.sparse_keys)} sparse + {prep.encoder.dense_dim} dense features; "
        f"objectives {', '.join(o.name for o in cfg.objectives)}")
    seed_everything(cfg.training.seed)
    model = build_model(prep.encoder, cfg.objectives, cfg.model)
    result = fit(model, prep, cfg.training, log=log, progress=progress)
    model.load_state_dict(result["best_state"])
    model.eval()
    metrics = final_metrics(model, prep, cfg.training)
    return finish(cfg, prep, result, metrics, result["best_state"], registry, log, register,
                  extra={"nproc": 1, "wall_seconds": round(time.perf_counter() - t0, 2)})


def finish(cfg: TrainConfig, prep: Prepared, result: dict, metrics: dict, state: dict, registry, log,
           register: bool, extra: dict) -> dict:
    from .artifacts import save_model

    metrics = {**metrics, "best_epoch": result["best_epoch"], "epochs_run": len(result["history"]),
               "examples_per_second": round(result["examples_per_second"], 1),
               "train_seconds": round(result["train_seconds"], 2), **extra,
               "history": [{k: v for k, v in h.items()} for h in result["history"]]}
    for split in ("valid", "test"):
        if split in metrics:
            log(f"{split}: " + ", ".join(
                f"{k} auc {v['auc']:.4f}" if "auc" in v else f"{k} rmse {v['rmse']:.4f}"
                for k, v in metrics[split].items()))
    summary = {"metrics": metrics, "version": None, "path": None}
    quantize = cfg.serving.quantize if cfg.serving is not None else "none"
    if register:
        path = save_model(registry or cfg.registry, cfg.name, state, prep.encoder, cfg.model, prep.objectives,
                          metrics, data=prep.description, train_config=cfg.source,
                          leaves=getattr(prep, "leaves", None), quantize=quantize)
        summary.update(version=path.name, path=str(path))
        log(f"registered {cfg.name}@{path.name} in {path.parent.parent} (current)"
            + (f" with its {quantize} serving variant" if quantize != "none" else ""))
    return summary


# ---------------------------------------------------------------- synthetic data (tests, benchmarks)


def synthetic_impressions(n: int = 2000, seed: int = 0, n_users: int = 200, n_items: int = 400,
                          n_topics: int = 8) -> pd.DataFrame:
    """A small impressions table with the simulated world's columns and learnable labels.

    Labels depend on a user x topic affinity, an item quality, an LLM-source effect and words of
    the text, so a ranker reaches AUC well above 0.5 on every binary objective.
    """
    rng = np.random.default_rng(seed)
    words = ["cats", "dogs", "cooking", "travel", "music", "news", "sports", "games", "art", "science"]
    item_topic = rng.integers(0, n_topics, n_items)
    item_quality = rng.normal(0, 1, n_items)
    item_llm = rng.random(n_items) < 0.3
    item_creator = rng.integers(0, n_items // 4 + 1, n_items)
    affinity = rng.normal(0, 1.2, (n_users, n_topics))
    user = rng.integers(0, n_users, n)
    item = rng.integers(0, n_items, n)
    topic = item_topic[item]
    text = np.array([f"{words[t]} {words[(t + 3) % 10]} {'amazing' if q > 0.5 else 'plain'} item{i % 17}"
                     for i, t, q in zip(range(n_items), item_topic, item_quality)], dtype=object)[item]
    z = affinity[user, topic] + 0.8 * item_quality[item] - 0.3 * item_llm[item] - 0.5
    p_click = 1 / (1 + np.exp(-z))
    click = (rng.random(n) < p_click).astype(np.int64)
    like = (click & (rng.random(n) < 1 / (1 + np.exp(-(z - 1.5))))).astype(np.int64)
    share = (click & (rng.random(n) < 1 / (1 + np.exp(-(z - 2.5))))).astype(np.int64)
    report = (rng.random(n) < 1 / (1 + np.exp(z + 3.0))).astype(np.int64)
    watch = np.where(click == 1, rng.gamma(2.0, 5.0 * np.exp(0.5 * z)), 0.0)
    recent = [[f"i{j}" for j in rng.integers(0, n_items, rng.integers(0, 6))] for _ in range(n)]
    return pd.DataFrame({
        "request_id": [f"r{i // 10}" for i in range(n)],
        "ts": np.arange(n, dtype=np.float64),
        "user_id": [f"u{u}" for u in user],
        "item_id": [f"i{i}" for i in item],
        "position": np.arange(n) % 10,
        "source": np.where(item_llm[item], "llm", "organic"),
        "creator_id": [f"c{c}" for c in item_creator[item]],
        "topic": [f"t{t}" for t in topic],
        "text": text,
        "generator": np.where(item_llm[item], "llm-a", None),
        "prior_score": np.where(item_llm[item], 1 / (1 + np.exp(-item_quality[item])), np.nan),
        "duration": rng.gamma(2.0, 20.0, n_items)[item].round(1),
        "creator_followers": rng.integers(0, 5000, n_items // 4 + 1)[item_creator[item]],
        "text_len": np.array([len(t.split()) for t in text]),
        "user_recent_items": recent,
        "click": click, "like": like, "share": share, "watch_time": watch, "report": report,
        "p_click": p_click,
    })


# ---------------------------------------------------------------- evaluation of a registered model


def evaluate_registered(loaded, cfg: TrainConfig, split: str = "test", group_column: str = "user_id",
                        log=print, frame: pd.DataFrame | None = None, keep_predictions: bool = False) -> dict:
    """Metrics of a registered model (``ranking.artifacts.LoadedModel``) on ``split`` of the config's data
    (``frame``: those rows, when the caller has loaded them already, e.g. to score several models;
    ``keep_predictions``: the result also holds ``predictions`` and ``labels``, (N, K) in objective order,
    e.g. to compare two models on the same rows with :func:`ranking.metrics.auc_difference`).

    Uses the model's own fitted encoder (``loaded.predict``), never a refit. Binary objectives:
    ``auc``, ``gauc`` (grouped by ``group_column`` where present), ``logloss``, ``ece``; regression:
    ``rmse`` in the transformed space and ``mae`` in natural units. Rows with invalid labels are
    dropped and reported, as in training.
    """
    from . import metrics as M

    if frame is None:
        train, valid, test, _ = load_frames(cfg)
        frame = {"train": train, "valid": valid, "test": test}[split]
    if frame is None or not len(frame):
        raise ValidationError([FieldError("split", f"the config's data has no '{split}' rows", "empty", cfg.source)])
    objectives = loaded.objective_configs
    columns = label_columns(objectives, frame, cfg.source, cfg.lines, f"{split} data")
    y, keep, reasons = clean_labels(frame, objectives, columns)
    if reasons:
        log(f"{split}: dropped {int((~keep).sum()):,} of {len(frame):,} rows: "
            + "; ".join(f"{n:,} {why}" for why, n in reasons.items()))
        frame, y = frame.loc[keep].reset_index(drop=True), y[keep]
    t0 = time.perf_counter()
    p = loaded.predict(frame)
    seconds = time.perf_counter() - t0
    groups = frame[group_column].to_numpy() if group_column in frame.columns else None
    out: dict = {}
    for k, o in enumerate(objectives):
        if o.type == "binary":
            m = {"auc": M.auc(y[:, k], p[:, k]), "logloss": M.logloss(y[:, k], p[:, k]), "ece": M.ece(y[:, k], p[:, k])}
            if groups is not None:
                m["gauc"] = M.gauc(y[:, k], p[:, k], groups)
        else:
            tr = (lambda v: np.log1p(np.clip(v, 0, None))) if o.transform == "log1p" else (lambda v: v)
            m = {"rmse": float(np.sqrt(np.mean((tr(p[:, k]) - tr(y[:, k])) ** 2))),
                 "mae": float(np.mean(np.abs(p[:, k] - y[:, k])))}
        m.update(mean_pred=float(p[:, k].mean()), mean_label=float(y[:, k].mean()))
        out[o.name] = m
    result = {"model": f"{loaded.name}@{loaded.version}", "split": split, "rows": len(frame),
              "predict_seconds": round(seconds, 3), "metrics": out}
    if keep_predictions:
        result.update(predictions=p, labels=y)
    return result
