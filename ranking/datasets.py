"""Training tables for the offline rankers: the real KuaiRand logs and the simulated world's logs.

Both loaders return a :class:`Dataset`: one row per impression, one label column per objective (named
after the objective), dense feature columns and id columns, split by time.

History features are *point-in-time*: a row of period ``d`` (a date for KuaiRand, a timestamp for the
simulated logs) sees only what happened in periods strictly before ``d``. Counts that include the row's
own day inflate training (the KuaiRand README measures up to 0.15 test AUC lost), so every history column
is an exclusive cumulative sum over periods, grouped by entity — vectorised, no row loops.

Only pandas and numpy are imported here: no torch, no lightgbm.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from strategy.errors import FieldError, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "STRATARANK_DATA"

# objective name -> column of interactions.tsv (the order is the column order of the (N, K) predictions)
KUAIRAND_OBJECTIVES: dict[str, str] = {
    "click": "is_click",
    "long_view": "long_view",
    "like": "label",
    "comment": "is_comment",
    "profile_enter": "is_profile_enter",
}
KUAIRAND_TRAIN_DATES = (20220408, 20220418)
KUAIRAND_TEST_DATES = (20220419, 20220421)
KUAIRAND_REQUIRED = ("user_id", "video_id", "date", "hourmin", "time_ms", "duration_ms",
                     *KUAIRAND_OBJECTIVES.values())
USER_FEATURES_REQUIRED = ("user_id",)
# ordinal encoding of user_active_degree (least to most active); values not listed become NaN
ACTIVE_DEGREE_ORDER = ("day_new", "2_14_day_new", "single_low_active", "30day_retention", "low_active",
                       "middle_active", "high_active", "full_active")

SIM_OBJECTIVES: dict[str, str] = {  # objective -> type, for the simulated world's logs
    "click": "binary", "like": "binary", "share": "binary", "watch_time": "regression", "report": "binary",
}
SIM_REQUIRED = ("request_id", "ts", "user_id", "item_id")
# served numeric features of the simulated impressions, used as dense features where present
SIM_NUMERIC = ("position", "prior_score", "duration", "creator_followers", "text_len", "age_hours")


@dataclass
class Dataset:
    """A time-split training table.

    ``train``/``valid``/``test`` share their columns: ``id_columns`` (e.g. ``user_id``, ``item_id``),
    one label column per objective (named after it, in ``objectives`` order), ``dense_columns`` (float
    features, NaN where unknown) and bookkeeping columns (``period``, ``ts``, ...). ``valid`` is ``None``
    where the data set has no standard validation split.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    objectives: list[str]
    dense_columns: list[str]
    id_columns: list[str]
    valid: pd.DataFrame | None = None
    objective_types: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def labels(self, frame: pd.DataFrame) -> np.ndarray:
        """``(N, K)`` float array of the objectives' labels of ``frame``."""
        return frame[self.objectives].to_numpy(dtype=np.float64)

    def summary(self) -> str:
        parts = [f"train {len(self.train):,}"]
        if self.valid is not None:
            parts.append(f"valid {len(self.valid):,}")
        parts.append(f"test {len(self.test):,}")
        return (f"{self.name or 'dataset'}: " + ", ".join(parts) + f" rows; objectives {', '.join(self.objectives)};"
                f" {len(self.dense_columns)} dense features")


# ----------------------------------------------------------------------------------------------------
# point-in-time history
# ----------------------------------------------------------------------------------------------------
def add_history_features(
    df: pd.DataFrame,
    entity: str,
    labels: Sequence[str],
    period: str,
    prior: Mapping[str, float],
    strength: float = 20.0,
    prefix: str | None = None,
) -> pd.DataFrame:
    """Add point-in-time history columns of ``entity`` to ``df`` (returns a new frame, same row order).

    For a row of entity ``e`` in period ``d``, with ``n`` = impressions of ``e`` in periods ``< d`` and
    ``s_k`` = the sum of label ``k`` over them:

    - ``{prefix}_n_past`` = ``n``
    - ``{prefix}_{k}_rate`` = ``(s_k + strength * prior[k]) / (n + strength)`` (Bayesian smoothing toward
      ``prior[k]``; equals the prior for an entity never seen before; for a regression label such as
      ``watch_time`` it is the smoothed mean)

    Rows of the same period never see each other. ``period`` may be any orderable column (a date, a
    timestamp). Computed as a cumulative sum over the (entity, period) totals minus the period's own
    totals.
    """
    prefix = prefix or entity.removesuffix("_id")
    labels = list(labels)
    grouped = df.groupby([entity, period], sort=True, observed=True)
    counts = grouped.size()
    sums = grouped[labels].sum().astype(np.float64)
    past_sums = sums.groupby(level=0, sort=False).cumsum() - sums
    past_n = counts.groupby(level=0, sort=False).cumsum() - counts
    hist = pd.DataFrame({f"{prefix}_n_past": past_n.astype(np.float64)})
    for k in labels:
        hist[f"{prefix}_{k}_rate"] = (past_sums[k] + strength * float(prior[k])) / (past_n + strength)
    hist = hist.reset_index()
    out = df.merge(hist, on=[entity, period], how="left", sort=False, validate="many_to_one")
    out.index = df.index
    return out


# ----------------------------------------------------------------------------------------------------
# KuaiRand
# ----------------------------------------------------------------------------------------------------
def kuairand_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``interactions.tsv``: the argument, else ``$STRATARANK_DATA`` (the folder itself or
    a data root with a ``kuairand/`` sub-folder), else ``<repo>/../shared/data/kuairand``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or (REPO_ROOT.parent / "shared" / "data" / "kuairand")
    path = Path(data_dir)
    if not (path / "interactions.tsv").exists() and (path / "kuairand" / "interactions.tsv").exists():
        path = path / "kuairand"
    return path


def _read_table(path: Path, required: Sequence[str], sep: str) -> pd.DataFrame:
    if not path.exists():
        raise ValidationError([FieldError("", "file not found", "missing_file", str(path))])
    try:
        frame = pd.read_csv(path, sep=sep)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ValidationError([FieldError("", f"cannot read table: {exc}", "io", str(path))]) from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValidationError([FieldError(c, f"missing column '{c}'", "missing_column", str(path))
                               for c in missing])
    return frame


def _check_binary(frame: pd.DataFrame, columns: Sequence[str], file: str) -> None:
    errors = []
    for c in columns:
        values = pd.to_numeric(frame[c], errors="coerce")
        bad = values.isna() | ~values.isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            errors.append(FieldError(c, f"column '{c}' must hold 0/1 labels; row {row + 1} has "
                                        f"{frame[c].iloc[row]!r} ({int(bad.sum())} bad rows)", "bad_label", file))
    if errors:
        raise ValidationError(errors)


def _range_order(value: str) -> tuple[float, float]:
    """Sort key of a range label such as ``[1k,5k)``, ``(0,10]``, ``730+``, ``181-365``, ``0``."""
    def num(text: str) -> float:
        text = text.strip().lower()
        scale = 1.0
        if text.endswith("k"):
            scale, text = 1e3, text[:-1]
        elif text.endswith("w"):
            scale, text = 1e4, text[:-1]
        return float(text) * scale
    numbers = re.findall(r"[0-9.]+[kw]?", str(value).lower())
    if not numbers:
        return (np.inf, np.inf)
    low = num(numbers[0])
    high = num(numbers[1]) if len(numbers) > 1 else (np.inf if "+" in str(value) else low)
    return (low, high)


def encode_user_features(users: pd.DataFrame, key: str = "user_id") -> pd.DataFrame:
    """Numeric user features: numeric columns as float, ``*_range`` labels as their ordinal rank,
    ``user_active_degree`` by activity order; other text columns as category codes. Columns are
    prefixed ``u_``; ``key`` is kept."""
    out = {key: users[key].to_numpy()}
    for col in users.columns:
        if col == key:
            continue
        s = users[col]
        if pd.api.types.is_numeric_dtype(s):
            out[f"u_{col}"] = s.astype(np.float64).to_numpy()
        elif col == "user_active_degree":
            order = {v: float(i) for i, v in enumerate(ACTIVE_DEGREE_ORDER)}
            out[f"u_{col}"] = s.map(order).astype(np.float64).to_numpy()
        elif col.endswith("_range"):
            levels = sorted(s.dropna().unique(), key=_range_order)
            out[f"u_{col}"] = s.map({v: float(i) for i, v in enumerate(levels)}).astype(np.float64).to_numpy()
        else:
            codes = s.astype("category").cat.codes.astype(np.float64)
            out[f"u_{col}"] = codes.where(codes >= 0).to_numpy()
    return pd.DataFrame(out)


def load_kuairand(
    data_dir: str | os.PathLike | None = None,
    prior_strength: float = 20.0,
    history: str = "train",
    user_features: bool = True,
) -> Dataset:
    """The KuaiRand set with its standard split (train 20220408..20220418, test 20220419..20220421).

    Columns of ``train``/``test``: ``user_id``, ``item_id`` (the video id), ``date``, ``ts`` (epoch ms),
    the labels ``click``, ``long_view``, ``like``, ``comment``, ``profile_enter`` (0/1), and the dense
    features:

    - ``hour`` (0..23), ``duration_s`` (video duration; NaN where the log has 0)
    - ``user_n_past``, ``item_n_past``: impressions of the user / video on days before the row's day
    - ``user_{objective}_rate``, ``item_{objective}_rate``: their labels' rates on those days, smoothed
      toward the train rate with ``prior_strength`` pseudo-impressions
    - ``u_*``: the user's row of ``user_features.csv`` (numeric; ranges as ordinal ranks)

    ``history='train'`` (the standard benchmark; it reproduces the README's reference figures): train rows
    of day d see train days before d; every test row sees the whole train period and no test day.
    ``history='all'`` lets a test row of day d also see the logged test days before d, as a
    daily-refreshed feature store would (higher test AUC, not comparable with the reference figures).
    ``period`` holds the period the history was cut at (the date, or 20220419 for test rows under
    ``history='train'``).

    Raises :class:`ValidationError` naming the file and column when a file or column is missing.
    """
    if history not in ("all", "train"):
        raise ValueError(f"history must be 'all' or 'train', not {history!r}")
    folder = kuairand_dir(data_dir)
    inter_path = folder / "interactions.tsv"
    users_path = folder / "user_features.csv"
    errors: list[FieldError] = []
    for p in (inter_path, users_path) if user_features else (inter_path,):
        if not p.exists():
            errors.append(FieldError("", "file not found", "missing_file", str(p)))
    if errors:
        raise ValidationError(errors)
    raw = _read_table(inter_path, KUAIRAND_REQUIRED, sep="\t")
    _check_binary(raw, list(KUAIRAND_OBJECTIVES.values()), str(inter_path))
    dates = pd.to_numeric(raw["date"], errors="coerce")
    if dates.isna().any():
        row = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise ValidationError([FieldError("date", f"column 'date' must be YYYYMMDD; row {row + 1} has "
                                                  f"{raw['date'].iloc[row]!r}", "bad_value", str(inter_path))])

    objectives = list(KUAIRAND_OBJECTIVES)
    df = pd.DataFrame({
        "user_id": raw["user_id"].astype(np.int64),
        "item_id": raw["video_id"].astype(np.int64),
        "date": dates.astype(np.int64),
        "ts": pd.to_numeric(raw["time_ms"], errors="coerce").astype(np.float64),
    })
    for name, col in KUAIRAND_OBJECTIVES.items():
        df[name] = raw[col].astype(np.int8)
    df["hour"] = (pd.to_numeric(raw["hourmin"], errors="coerce") // 100).astype(np.float64)
    duration = pd.to_numeric(raw["duration_ms"], errors="coerce").astype(np.float64) / 1000.0
    df["duration_s"] = duration.where(duration > 0)
    df = df.sort_values(["date", "ts"], kind="mergesort").reset_index(drop=True)

    lo, hi = KUAIRAND_TRAIN_DATES
    is_train = df["date"].between(lo, hi)
    prior = df.loc[is_train, objectives].mean().to_dict()

    # history period: the date, or (history='train') one period after the train days for every test row,
    # so that test rows see all train days and never each other
    df["period"] = df["date"] if history == "all" else df["date"].where(is_train, hi + 1)
    for entity in ("user_id", "item_id"):
        df = add_history_features(df, entity, objectives, "period", prior, prior_strength)
    dense = ["hour", "duration_s"]
    for entity in ("user", "item"):
        dense += [f"{entity}_n_past"] + [f"{entity}_{k}_rate" for k in objectives]

    if user_features:
        users = _read_table(users_path, USER_FEATURES_REQUIRED, sep=",")
        ufe = encode_user_features(users)
        ufe = ufe.drop_duplicates("user_id")
        df = df.merge(ufe, on="user_id", how="left", sort=False)
        dense += [c for c in ufe.columns if c != "user_id"]

    df[dense] = df[dense].astype(np.float64)
    train = df.loc[df["date"].between(lo, hi)].reset_index(drop=True)
    test = df.loc[df["date"].between(*KUAIRAND_TEST_DATES)].reset_index(drop=True)
    return Dataset(train=train, test=test, objectives=objectives, dense_columns=dense,
                   id_columns=["user_id", "item_id"], valid=None,
                   objective_types={k: "binary" for k in objectives}, name="kuairand")


# ----------------------------------------------------------------------------------------------------
# simulated world logs
# ----------------------------------------------------------------------------------------------------
def load_sim_logs(
    path: str | os.PathLike,
    objectives: Mapping[str, str] | Sequence[str] | None = None,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    prior_strength: float = 20.0,
) -> Dataset:
    """Impressions written by ``world`` (the simulated world) (``DIR/impressions.parquet`` or the file itself).

    ``objectives`` maps objective -> ``binary``/``regression`` (default: click, like, share, watch_time,
    report); each must be a label column of the file. Rows are split by ``ts``: the last ``test_frac``
    of the rows in time is ``test``, the ``valid_frac`` before them ``valid``, the rest ``train`` (cut
    at quantiles of ``ts``; rows of one ``ts`` stay together).

    Dense features: the served numbers ``position``, ``prior_score`` (NaN for human items), ``duration``,
    ``creator_followers``, ``text_len`` (each where present), ``is_llm`` (source == 'llm'), and
    point-in-time history of user and item (``*_n_past``, ``*_{objective}_rate``) over impressions with
    an earlier ``ts`` — impressions of the same ``ts`` never see each other. Id columns: ``user_id``,
    ``item_id`` and ``creator_id``/``topic`` where present. The true probabilities (``p_*``,
    ``e_watch_time``) are kept as columns but never listed as features.
    """
    p = Path(path)
    file = p / "impressions.parquet" if p.is_dir() else p
    if not file.exists():
        raise ValidationError([FieldError("", "file not found", "missing_file", str(file))])
    try:
        df = pd.read_parquet(file)
    except (OSError, ValueError) as exc:
        raise ValidationError([FieldError("", f"cannot read parquet: {exc}", "io", str(file))]) from None
    if objectives is None:
        objectives = dict(SIM_OBJECTIVES)
    elif not isinstance(objectives, Mapping):
        objectives = {k: SIM_OBJECTIVES.get(k, "binary") for k in objectives}
    objectives = dict(objectives)
    missing = [c for c in (*SIM_REQUIRED, *objectives) if c not in df.columns]
    if missing:
        raise ValidationError([FieldError(c, f"missing {'label ' if c in objectives else ''}column '{c}'",
                                          "missing_column", str(file)) for c in missing])
    bad_types = [FieldError(k, f"objective type must be 'binary' or 'regression', not {t!r}", "invalid")
                 for k, t in objectives.items() if t not in ("binary", "regression")]
    if bad_types:
        raise ValidationError(bad_types)
    if not (0 <= valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError("need 0 <= valid_frac, 0 < test_frac and valid_frac + test_frac < 1")

    return _time_split_dataset(df, objectives, valid_frac, test_frac, prior_strength,
                               f"sim:{file.parent.name if file.name == 'impressions.parquet' else file.name}")


def _time_split_dataset(df: pd.DataFrame, objectives: dict, valid_frac: float, test_frac: float,
                        prior_strength: float, name: str, weight: np.ndarray | None = None) -> Dataset:
    """Sort by ``ts``, split train / valid / test at quantiles of ``ts``, add the served numbers and the
    point-in-time history of user and item as dense features (see :func:`load_sim_logs`)."""
    df = df.copy()
    if weight is not None:
        df["weight"] = weight
    ts = df["ts"]
    if pd.api.types.is_datetime64_any_dtype(ts):
        ts = ts.astype("int64")
    df["ts"] = pd.to_numeric(ts).astype(np.float64)
    df = df.sort_values(["ts", "request_id"], kind="mergesort").reset_index(drop=True)
    for k in objectives:
        df[k] = pd.to_numeric(df[k]).astype(np.float64)

    # cut points at row quantiles of ts; rows sharing a ts (one request's slate) stay on one side
    test_start = df["ts"].quantile(1.0 - test_frac)
    valid_start = df["ts"].quantile(1.0 - test_frac - valid_frac)
    is_test = df["ts"] >= test_start
    is_valid = (df["ts"] >= valid_start) & ~is_test
    is_train = ~(is_test | is_valid)
    prior = df.loc[is_train, list(objectives)].mean().to_dict()

    dense: list[str] = []
    for col in SIM_NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
            dense.append(col)
    if "source" in df.columns:
        df["is_llm"] = (df["source"].astype(str) == "llm").astype(np.float64)
        dense.append("is_llm")
    for entity in ("user_id", "item_id"):
        df = add_history_features(df, entity, list(objectives), "ts", prior, prior_strength)
        short = entity.removesuffix("_id")
        dense += [f"{short}_n_past"] + [f"{short}_{k}_rate" for k in objectives]
    df[dense] = df[dense].astype(np.float64)
    ids = ["user_id", "item_id"] + [c for c in ("creator_id", "topic") if c in df.columns]
    return Dataset(
        train=df.loc[is_train].reset_index(drop=True),
        valid=df.loc[is_valid].reset_index(drop=True),
        test=df.loc[is_test].reset_index(drop=True),
        objectives=list(objectives), dense_columns=dense, id_columns=ids,
        objective_types=objectives, name=name,
    )


# ----------------------------------------------------------------------------------------------------
# the scorer's own served logs (the joiner's examples)
# ----------------------------------------------------------------------------------------------------
SERVED_REQUIRED = ("example_id", "request_id", "ts", "user_id", "item_id", "position")
HOUR_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}$")


def served_parts(path: str | os.PathLike, hours: tuple[str | None, str | None] = (None, None)) -> list[Path]:
    """The joiner's example parts under ``path`` (its ``out`` folder, its ``examples`` folder, or one
    ``hour=...`` folder) for the hours ``[from, to]`` (``YYYY-MM-DDTHH``, UTC; either end open)."""
    root = Path(path)
    if (root / "examples").is_dir():
        root = root / "examples"
    lo, hi = hours
    if root.name.startswith("hour="):
        folders = [root]
    else:
        folders = sorted(root.glob("hour=*"))
    out = []
    for folder in folders:
        hour = folder.name[len("hour="):]
        if (lo is not None and hour < lo) or (hi is not None and hour > hi):
            continue
        out += sorted(folder.glob("part-*.parquet"))
    return out


def read_served(path: str | os.PathLike, columns: Sequence[str] = (), hours: tuple = (None, None)) -> pd.DataFrame:
    """The joiner's examples (``online/joiner.py``) as one frame sorted by serve time. Every part must
    hold :data:`SERVED_REQUIRED` and ``columns`` (the labels and the features a model reads): a part
    written by an older feature spec, or missing a column, is a ValidationError naming the file and
    the column."""
    import pyarrow.parquet as pq

    parts = served_parts(path, hours)
    if not parts:
        span = "" if hours == (None, None) else f" for hours {hours[0] or '...'} to {hours[1] or '...'}"
        raise ValidationError([FieldError("data.path", f"no joined examples (examples/hour=*/part-*.parquet){span}",
                                          "missing_file", str(path))])
    errors, frames = [], []
    for part in parts:
        try:
            names = set(pq.read_schema(part).names)
        except (OSError, ValueError) as exc:
            errors.append(FieldError("data.path", f"cannot read parquet: {exc}", "io", str(part)))
            continue
        missing = [c for c in (*SERVED_REQUIRED, *columns) if c not in names]
        for c in missing:
            errors.append(FieldError(c, f"missing column '{c}' (a log from another feature spec or objectives?)",
                                     "missing_column", str(part)))
        if not missing and not errors:
            frames.append(pd.read_parquet(part))
    if errors:
        raise ValidationError(errors[:50])
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["ts", "example_id"], kind="mergesort", ignore_index=True)


def load_served(
    path: str | os.PathLike,
    objectives: Mapping[str, str],
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    hours: tuple = (None, None),
    columns: Sequence[str] = (),
    ips_clip: float | None = None,
    prior_strength: float = 20.0,
) -> Dataset:
    """Training rows from what the scorer served: the joiner's examples, with the same features and
    point-in-time history as :func:`load_sim_logs` (``position`` is the served rank: a training-only
    bias feature, neutral at serving). With ``ips_clip``, a ``weight`` column holds inverse-propensity
    weights ``min(1 / propensity, ips_clip)`` scaled to mean 1 over the rows (exploration slots served
    with a small propensity count for more)."""
    objectives = dict(objectives)
    frame = read_served(path, [*objectives, *columns], hours)
    weight = None
    if ips_clip is not None:
        prop = pd.to_numeric(frame["propensity"], errors="coerce").to_numpy(dtype=np.float64) \
            if "propensity" in frame else np.ones(len(frame))
        bad = ~np.isfinite(prop) | (prop <= 0) | (prop > 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValidationError([FieldError("propensity", f"propensity must be in (0, 1] for inverse-propensity "
                                              f"weights; example {frame['example_id'].iloc[row]} has "
                                              f"{frame['propensity'].iloc[row]!r} ({int(bad.sum())} rows)",
                                              "bad_value", str(path))])
        weight = np.minimum(1.0 / prop, ips_clip)
        weight = weight / weight.mean()
    hours_name = "" if hours == (None, None) else f"[{hours[0] or ''}..{hours[1] or ''}]"
    return _time_split_dataset(frame, objectives, valid_frac, test_frac, prior_strength,
                               f"served:{Path(path).name}{hours_name}", weight)
