"""From exposure and event tables to one result record per (experiment, variant, metric).

Pipeline (all vectorised; no per-row Python):

1. validate the metric and experiment declarations and the table columns
   (:class:`strategy.errors.ValidationError` naming the field and the allowed values);
2. per experiment, each user's *first* exposure gives their variant and start time ``t0``;
   users exposed to more than one variant of the same experiment are dropped (counted in
   ``multi_variant_users``) because their outcome cannot be attributed to either arm;
3. events of the types the metrics read and of exposed users are deduplicated by ``event_id``
   (a repeated id is a retry of one event: its first row is kept) and joined to users by
   integer user codes; an event counts for the metric when ``ts >= t0`` and as the CUPED
   pre-period covariate when ``t0 - pre_period <= ts < t0``;
4. per-user metric values (users without events are 0) are reduced to per-variant sufficient
   statistics with ``np.bincount``, then tested with :mod:`experiments.stats`.

Metric declarations (plain dicts; the YAML loader lives elsewhere)::

    clicks_per_user: {type: mean, event: click}                 # per-user count (default)
    watch_time:      {type: mean, event: watch, value: sum}     # per-user sum of ``value``
    ctr: {type: ratio, numerator: {event: click}, denominator: {event: impression}}

Experiment declarations::

    {name: rank_v2, control: control, metrics: [ctr, watch_time],
     guardrails: [reports_per_user, {metric: watch_time, harmful: decrease}],
     variants: [control, treatment], weights: [0.5, 0.5]}          # variants/weights optional

Relative lift convention: ``rel_lift = (treatment_mean - control_mean) / control_mean`` as a
fraction (0.05 = +5 %), ``control_mean`` being the unadjusted control mean; its CI is the
delta-method one (as in GrowthBook). ``ci_low``/``ci_high`` are for the *absolute* lift.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from strategy.errors import Errors, FieldError, ValidationError, did_you_mean, join_path

from . import stats as S

__all__ = [
    "EXPOSURE_COLUMNS",
    "EVENT_COLUMNS",
    "METRIC_TYPES",
    "VALUE_AGGREGATIONS",
    "analyze",
    "load_table",
    "normalize_metrics",
    "normalize_experiments",
]

EXPOSURE_COLUMNS = ("user_id", "layer", "experiment", "variant", "ts")
EVENT_COLUMNS = ("event_id", "ts", "type", "user_id", "item_id", "request_id", "value")
#: the event columns the analysis reads (``value`` only when a metric sums it)
_EVENT_NEEDED = ("event_id", "ts", "type", "user_id")
_EXPOSURE_NEEDED = ("user_id", "experiment", "variant", "ts")
METRIC_TYPES = ("mean", "ratio")
VALUE_AGGREGATIONS = ("count", "sum")
HARMFUL = ("increase", "decrease")
CORRECTIONS = ("holm", "bh")
SRM_ALARM_P = 0.001


# ----------------------------------------------------------------------------- loading
def load_table(path: str | os.PathLike, kind: str = "events") -> pd.DataFrame:
    """Read a Parquet or CSV file, or a folder of them (concatenated in name order).

    ``kind`` is ``"events"`` or ``"exposures"``; the columns the analysis needs are checked
    and a missing one raises :class:`ValidationError` naming the column and the file.
    """
    if kind not in ("events", "exposures"):
        raise ValidationError([FieldError("kind", f"unknown table kind {kind!r}; allowed: events, exposures")])
    p = Path(path)
    if not p.exists():
        raise ValidationError([FieldError(kind, f"no such file or folder: {p}", "not_found", str(p))])
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _table_format(f))
        if not files:
            raise ValidationError([FieldError(kind, "folder holds no .parquet or .csv file", "not_found", str(p))])
    else:
        if not _table_format(p):
            raise ValidationError([FieldError(kind, f"unsupported file type {p.suffix!r}; allowed: .parquet, .csv, .csv.gz", "invalid", str(p))])
        files = [p]
    needed = _EVENT_NEEDED if kind == "events" else _EXPOSURE_NEEDED
    frames = []
    for f in files:
        df = pd.read_parquet(f) if _table_format(f) == "parquet" else pd.read_csv(f)
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ValidationError([
                FieldError(f"{kind}.{c}", f"missing column {c!r}; the file has {list(df.columns)}", "missing", str(f))
                for c in missing
            ])
        frames.append(df)
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _table_format(f: Path) -> str | None:
    name = f.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    return None


# ----------------------------------------------------------------------------- declarations
def _event_ref(spec: Any, path: str, errors: Errors, default_value: str = "count") -> tuple[str, str] | None:
    """``{event: click, value: sum}`` → ``("click", "sum")``; problems go to ``errors``."""
    if not isinstance(spec, Mapping):
        errors.add(path, "must be a mapping like {event: click}", "type")
        return None
    ev = spec.get("event")
    ok = True
    if not isinstance(ev, str) or not ev:
        errors.add(join_path(path, "event"), "required: the event type this metric counts or sums", "missing")
        ok = False
    value = spec.get("value", default_value)
    if value not in VALUE_AGGREGATIONS:
        errors.add(join_path(path, "value"),
                   f"unknown value aggregation {value!r}; allowed: {', '.join(VALUE_AGGREGATIONS)}"
                   + did_you_mean(value, VALUE_AGGREGATIONS))
        ok = False
    return (ev, value) if ok else None


def normalize_metrics(metrics: Mapping[str, Any]) -> dict[str, dict]:
    """Validate metric declarations; returns ``{name: {type, x: (event, agg), y: (event, agg)|None}}``."""
    errors = Errors()
    out: dict[str, dict] = {}
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValidationError([FieldError("metrics", "must be a non-empty mapping of metric name to declaration")])
    for name, spec in metrics.items():
        path = join_path("metrics", str(name))
        if not isinstance(spec, Mapping):
            errors.add(path, "must be a mapping like {type: mean, event: click}", "type")
            continue
        mtype = spec.get("type")
        if mtype not in METRIC_TYPES:
            errors.add(join_path(path, "type"),
                       f"unknown metric type {mtype!r}; allowed: {', '.join(METRIC_TYPES)}" + did_you_mean(mtype, METRIC_TYPES))
            continue
        if mtype == "mean":
            x = _event_ref(spec, path, errors)
            if x:
                out[str(name)] = {"type": "mean", "x": x, "y": None}
        else:
            for part in ("numerator", "denominator"):
                if part not in spec:
                    errors.add(join_path(path, part), "required for a ratio metric: {event: ...}", "missing")
            if "numerator" in spec and "denominator" in spec:
                x = _event_ref(spec["numerator"], join_path(path, "numerator"), errors)
                y = _event_ref(spec["denominator"], join_path(path, "denominator"), errors)
                if x and y:
                    out[str(name)] = {"type": "ratio", "x": x, "y": y}
    errors.raise_if_any()
    return out


def normalize_experiments(experiments: Sequence[Mapping[str, Any]], metrics: Mapping[str, dict],
                          default_harmful: str = "increase") -> list[dict]:
    """Validate experiment declarations against the known metrics.

    Returns ``[{name, control, variants|None, weights|None, metrics: [(metric, role, harmful)]}]``
    where ``role`` is ``"goal"`` or ``"guardrail"`` and ``harmful`` is set for guardrails.
    """
    errors = Errors()
    out = []
    if default_harmful not in HARMFUL:
        raise ValidationError([FieldError("guardrail_harmful", f"must be one of {', '.join(HARMFUL)}, got {default_harmful!r}")])
    if isinstance(experiments, Mapping) or not isinstance(experiments, Sequence):
        raise ValidationError([FieldError("experiments", "must be a list of {name, control, metrics, guardrails}")])
    names = list(metrics)
    for i, exp in enumerate(experiments):
        path = join_path("experiments", i)
        if not isinstance(exp, Mapping):
            errors.add(path, "must be a mapping {name, control, metrics, guardrails}", "type")
            continue
        for key in ("name", "control"):
            if not isinstance(exp.get(key), str) or not exp.get(key):
                errors.add(join_path(path, key), "required (a string)", "missing")
        mlist: list[tuple[str, str, str | None]] = []
        seen: dict[str, int] = {}
        for role, key in (("goal", "metrics"), ("guardrail", "guardrails")):
            items = exp.get(key, []) or []
            if not isinstance(items, (list, tuple)):
                errors.add(join_path(path, key), "must be a list of metric names", "type")
                continue
            for j, item in enumerate(items):
                ipath = join_path(join_path(path, key), j)
                harmful = default_harmful if role == "guardrail" else None
                if isinstance(item, Mapping):
                    mname = item.get("metric")
                    harmful = item.get("harmful", harmful)
                    if role == "guardrail" and harmful not in HARMFUL:
                        errors.add(join_path(ipath, "harmful"), f"unknown direction {harmful!r}; allowed: {', '.join(HARMFUL)}")
                    ipath = join_path(ipath, "metric")
                else:
                    mname = item
                if mname not in metrics:
                    errors.add(ipath, f"unknown metric {mname!r}; declared metrics: {', '.join(map(str, names))}"
                               + did_you_mean(mname, names), "unknown")
                    continue
                if mname in seen:
                    # a goal metric that is also a guardrail: one record, with a verdict
                    k = seen[mname]
                    if role == "guardrail":
                        mlist[k] = (mname, "guardrail", harmful)
                    continue
                seen[mname] = len(mlist)
                mlist.append((mname, role, harmful))
        if not mlist:
            errors.add(join_path(path, "metrics"), "list at least one metric", "missing")
        variants = exp.get("variants")
        weights = exp.get("weights")
        if variants is not None:
            if not isinstance(variants, (list, tuple)) or len(variants) < 2:
                errors.add(join_path(path, "variants"), "must list at least 2 variants")
                variants = None
            elif exp.get("control") not in variants:
                errors.add(join_path(path, "control"),
                           f"control {exp.get('control')!r} is not one of the variants {list(variants)}")
        if weights is not None:
            if isinstance(weights, Mapping):
                if variants is None:
                    variants = list(weights)
                weights = [weights.get(v, 0.0) for v in variants]
            if variants is None or not isinstance(weights, (list, tuple)) or len(weights) != len(variants):
                errors.add(join_path(path, "weights"), "must give one weight per variant (a list aligned with "
                           "variants, or a mapping variant -> weight)")
            elif any((not isinstance(w, (int, float))) or w < 0 for w in weights) or sum(weights) <= 0:
                errors.add(join_path(path, "weights"), "weights must be non-negative numbers with a positive sum")
        out.append({"name": exp.get("name"), "control": exp.get("control"),
                    "variants": list(variants) if variants is not None else None,
                    "weights": [float(w) for w in weights] if weights is not None else None,
                    "metrics": mlist})
    errors.raise_if_any()
    return out


def _check_columns(df: Any, needed: Iterable[str], table: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValidationError([FieldError(table, f"must be a pandas DataFrame, got {type(df).__name__}", "type")])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValidationError([
            FieldError(f"{table}.{c}", f"missing column {c!r}; the table has {list(df.columns)}", "missing")
            for c in missing])


def _ts_numeric(s: pd.Series, path: str) -> tuple[np.ndarray, str]:
    """Timestamps as comparable numbers: datetimes → int64 ns (UTC), numbers as they are."""
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.to_numpy(dtype="datetime64[ns]").view("i8"), "datetime"
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype="float64" if pd.api.types.is_float_dtype(s.dtype) else "int64"), "number"
    try:
        parsed = pd.to_datetime(s, utc=True).dt.tz_localize(None)
    except (ValueError, TypeError) as e:
        raise ValidationError([FieldError(path, f"timestamps must be datetimes or numbers: {e}", "type")]) from None
    return parsed.to_numpy(dtype="datetime64[ns]").view("i8"), "datetime"


def _pre_window(pre_period: Any, ts_kind: str) -> float | None:
    """``None`` → no CUPED; ``"all"`` → every event before exposure; else a window length."""
    if pre_period is None:
        return None
    if isinstance(pre_period, str) and pre_period == "all":
        return math.inf
    if ts_kind == "datetime":
        try:
            td = pd.Timedelta(pre_period)
        except (ValueError, TypeError):
            td = None
        if td is None or td <= pd.Timedelta(0):
            raise ValidationError([FieldError("pre_period", f"must be None, 'all' or a positive duration such as '14D', got {pre_period!r}")])
        return float(td.value)
    if isinstance(pre_period, (int, float)) and not isinstance(pre_period, bool) and pre_period > 0:
        return float(pre_period)
    raise ValidationError([FieldError("pre_period", f"must be None, 'all' or a positive number in the units of ts, got {pre_period!r}")])


# ----------------------------------------------------------------------------- analysis
def analyze(exposures: pd.DataFrame, events: pd.DataFrame, metrics: Mapping[str, Any],
            experiments: Sequence[Mapping[str, Any]], pre_period: Any = None, alpha: float = 0.05,
            correction: str = "holm", sequential_tuning: float = 5000,
            guardrail_harmful: str = "increase") -> list[dict]:
    """Analyse every experiment; one record per (experiment, treatment variant, metric).

    Args:
        exposures: columns ``user_id, layer, experiment, variant, ts`` (``layer`` optional here).
        events: columns ``event_id, ts, type, user_id, item_id, request_id, value`` (``value``
            needed only by ``value: sum`` metrics; ``item_id``/``request_id`` unused).
        metrics: ``{name: declaration}``, see the module docstring.
        experiments: ``[{name, control, metrics, guardrails?, variants?, weights?}]``.
        pre_period: CUPED covariate window before each user's first exposure: ``None`` (no
            CUPED), ``"all"``, a duration (``"14D"``, ``pd.Timedelta``) for datetime ``ts`` or a
            number in the units of a numeric ``ts``. CUPED is applied to ``mean`` metrics only.
        alpha: significance level of CIs, tests and guardrail verdicts.
        correction: ``"holm"`` or ``"bh"``: which adjusted p-value goes to ``p_value_adjusted``
            (both are always reported as ``p_value_holm``/``p_value_bh``); the family is the
            experiment's metrics for one treatment variant.
        sequential_tuning: gbstats' sequential tuning parameter (total users where the
            confidence sequence is tightest).
        guardrail_harmful: direction that is harmful for guardrails that do not say.

    Returns:
        Records (dicts) with keys ``experiment, variant, metric, metric_type, role, users,
        control_users, control_mean, treatment_mean, abs_lift, rel_lift, ci_low, ci_high,
        rel_ci_low, rel_ci_high, p_value, p_value_cuped, abs_lift_cuped, ci_low_cuped,
        ci_high_cuped, cuped_theta, seq_ci_low, seq_ci_high, p_value_sequential,
        p_value_adjusted, p_value_holm, p_value_bh, srm_p, srm_alarm, guardrail, harmful,
        multi_variant_users, error``. ``p_value`` is Welch's on the absolute lift; missing
        optional values are ``None``.
    """
    if correction not in CORRECTIONS:
        raise ValidationError([FieldError("correction", f"unknown correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")])
    if not (0 < alpha < 1):
        raise ValidationError([FieldError("alpha", f"must be in (0, 1), got {alpha!r}")])
    mdefs = normalize_metrics(metrics)
    exps = normalize_experiments(experiments, mdefs, guardrail_harmful)
    _check_columns(exposures, _EXPOSURE_NEEDED, "exposures")
    used = {m for e in exps for m, _, _ in e["metrics"]}
    needs_value = any(ref[1] == "sum" for m in used for ref in (mdefs[m]["x"], mdefs[m]["y"]) if ref)
    _check_columns(events, _EVENT_NEEDED + (("value",) if needs_value else ()), "events")

    # event types and aggregations the used metrics read: one per-user column each
    refs = sorted({ref for m in used for ref in (mdefs[m]["x"], mdefs[m]["y"]) if ref})
    types = sorted({ev for ev, _ in refs})
    col_of = {ref: i for i, ref in enumerate(refs)}

    # users: integer codes from the exposures; events of never-exposed users drop out
    exp_ts, kind_x = _ts_numeric(exposures["ts"], "exposures.ts")
    user_codes, user_index = pd.factorize(exposures["user_id"])
    n_users_all = len(user_index)
    ev_type = pd.Index(types).get_indexer(events["type"])
    ev_user = pd.Index(user_index).get_indexer(events["user_id"])
    if len(events) and n_users_all and not (ev_user >= 0).any() and _id_kind(exposures["user_id"]) != _id_kind(events["user_id"]):
        raise ValidationError([FieldError(
            "events.user_id", f"no event user_id matches an exposed user: events.user_id is "
            f"{events['user_id'].dtype} but exposures.user_id is {exposures['user_id'].dtype}", "type")])
    keep = np.flatnonzero((ev_type >= 0) & (ev_user >= 0))
    ev_ids = events["event_id"].iloc[keep].to_numpy()
    # dedupe by event_id (retries of one event): the first occurrence is kept
    first = ~pd.Series(ev_ids).duplicated(keep="first").to_numpy() if len(ev_ids) else np.zeros(0, bool)
    sel = keep[first]
    ev_type, ev_user = ev_type[sel], ev_user[sel]
    ev_ts, kind_e = _ts_numeric(events["ts"].iloc[sel], "events.ts") if len(sel) else (np.zeros(0), kind_x)
    if kind_e != kind_x:
        raise ValidationError([FieldError("events.ts", f"events.ts holds {kind_e}s but exposures.ts holds {kind_x}s; use the same kind", "type")])
    ev_val = (events["value"].iloc[sel].to_numpy(dtype="float64", na_value=np.nan) if needs_value
              else np.ones(len(sel)))
    if needs_value:
        ev_val = np.nan_to_num(ev_val, nan=0.0)
    window = _pre_window(pre_period, kind_x)

    exp_names = exposures["experiment"].to_numpy()
    variants_col = exposures["variant"]
    records: list[dict] = []
    for e in exps:
        rows = np.flatnonzero(exp_names == e["name"])
        if not len(rows):
            records.extend(_no_exposures(e, mdefs, exposures["experiment"]))
            continue
        records.extend(_analyze_one(e, mdefs, rows, user_codes, exp_ts, variants_col, n_users_all,
                                    ev_user, ev_type, ev_ts, ev_val, types, refs, col_of, window,
                                    alpha, correction, sequential_tuning))
    return records


def _analyze_one(e, mdefs, rows, user_codes, exp_ts, variants_col, n_users_all, ev_user, ev_type,
                 ev_ts, ev_val, types, refs, col_of, window, alpha, correction, tuning) -> list[dict]:
    # -- variants: declared ones first (control first), then any observed extra
    vcodes, vnames = pd.factorize(variants_col.iloc[rows]) if len(rows) else (np.zeros(0, np.int64), pd.Index([]))
    ok = (vcodes >= 0) & (user_codes[rows] >= 0)  # rows with a missing variant or user id drop out
    if not ok.all():
        rows, vcodes = rows[ok], vcodes[ok]
    declared = e["variants"] or [e["control"]]
    names = list(declared) + [v for v in vnames if v not in declared]
    if e["control"] in names:
        names.remove(e["control"])
    names = [e["control"]] + names
    remap = np.array([names.index(v) for v in vnames], dtype=np.int64)
    v = remap[vcodes] if len(rows) else np.zeros(0, np.int64)
    if e["weights"] is not None:
        w_of = dict(zip(e["variants"], e["weights"]))
        weights = [w_of.get(n, 0.0) for n in names]
    elif e["variants"] is not None:
        weights = [1.0 if n in e["variants"] else 0.0 for n in names]
    else:
        weights = [1.0] * len(names)

    # -- first exposure per user; users seen in more than one variant are dropped
    u, t = user_codes[rows], exp_ts[rows]
    order = np.lexsort((t, u))
    us, ts_s, vs = u[order], t[order], v[order]
    start = np.flatnonzero(np.r_[True, us[1:] != us[:-1]]) if len(us) else np.zeros(0, np.int64)
    fu, ft, fv = us[start], ts_s[start], vs[start]
    if len(us):
        multi = np.minimum.reduceat(vs, start) != np.maximum.reduceat(vs, start)
    else:
        multi = np.zeros(0, bool)
    n_multi = int(multi.sum())
    fu, ft, fv = fu[~multi], ft[~multi], fv[~multi]
    n_e = len(fu)
    loc = np.full(n_users_all, -1, dtype=np.int64)
    loc[fu] = np.arange(n_e)
    t0 = np.zeros(n_users_all, dtype=ft.dtype if n_e else np.float64)
    t0[fu] = ft

    # -- per-user sums of each (event type, aggregation) after (and before) first exposure
    ev_loc = loc[ev_user]
    in_exp = ev_loc >= 0
    ev_t0 = t0[ev_user]
    post = in_exp & (ev_ts >= ev_t0)
    post_cols = _per_user_columns(ev_loc, ev_type, ev_val, post, n_e, types, refs)
    pre_cols = None
    if window is not None:
        pre = in_exp & (ev_ts < ev_t0)
        if math.isfinite(window):
            pre &= ev_ts >= ev_t0 - window
        pre_cols = _per_user_columns(ev_loc, ev_type, ev_val, pre, n_e, types, refs)

    k = len(names)
    users = np.bincount(fv, minlength=k)
    srm_p = S.srm_chi2(users, weights)
    no_control = None
    if users[0] == 0:
        no_control = (f"control variant {e['control']!r} has no exposures; observed variants: "
                      f"{[n for n, c in zip(names, users) if c > 0]}")

    def arm_sums(x, y=None):
        """Per-variant Σx, Σx², (Σy, Σy², Σxy) via bincount."""
        out = [np.bincount(fv, weights=x, minlength=k), np.bincount(fv, weights=x * x, minlength=k)]
        if y is not None:
            out += [np.bincount(fv, weights=y, minlength=k), np.bincount(fv, weights=y * y, minlength=k),
                    np.bincount(fv, weights=x * y, minlength=k)]
        return out

    per_metric = {}
    for mname, role, harmful in e["metrics"]:
        md = mdefs[mname]
        x = post_cols[:, col_of[md["x"]]]
        if md["type"] == "ratio":
            y = post_cols[:, col_of[md["y"]]]
            sx, sx2, sy, sy2, sxy = arm_sums(x, y)
            arms = [S.RatioStats(int(users[j]), sx[j], sx2[j], sy[j], sy2[j], sxy[j]) for j in range(k)]
            cuped_arms = None
        else:
            sx, sx2 = arm_sums(x)
            arms = [S.SampleStats(int(users[j]), sx[j], sx2[j]) for j in range(k)]
            cuped_arms = None
            if pre_cols is not None:
                xp = pre_cols[:, col_of[md["x"]]]
                sp, sp2 = arm_sums(xp)
                sxp = np.bincount(fv, weights=x * xp, minlength=k)
                cuped_arms = [S.CupedStats(int(users[j]), arms[j], S.SampleStats(int(users[j]), sp[j], sp2[j]), sxp[j])
                              for j in range(k)]
        per_metric[mname] = (md, role, harmful, arms, cuped_arms)

    records = []
    for j in range(1, k):
        fam = []
        for mname, (md, role, harmful, arms, cuped_arms) in per_metric.items():
            res = S.welch_test(arms[0], arms[j], alpha)
            seq = S.sequential_test(arms[0], arms[j], alpha, tuning)
            rec = {
                "experiment": e["name"], "variant": names[j], "metric": mname, "metric_type": md["type"],
                "role": role, "users": int(users[j]), "control_users": int(users[0]),
                "control_mean": _f(res.control_mean), "treatment_mean": _f(res.treatment_mean),
                "abs_lift": _f(res.abs_lift), "rel_lift": _f(res.rel_lift),
                "ci_low": _f(res.ci_low), "ci_high": _f(res.ci_high),
                "rel_ci_low": _f(res.rel_ci_low), "rel_ci_high": _f(res.rel_ci_high),
                "p_value": _f(res.p_value),
                "p_value_cuped": None, "abs_lift_cuped": None, "ci_low_cuped": None, "ci_high_cuped": None,
                "cuped_theta": None,
                "seq_ci_low": _f(seq.ci_low), "seq_ci_high": _f(seq.ci_high),
                "p_value_sequential": _f(seq.p_value),
                "p_value_adjusted": None, "p_value_holm": None, "p_value_bh": None,
                "srm_p": float(srm_p), "srm_alarm": bool(srm_p < SRM_ALARM_P),
                "guardrail": S.guardrail_verdict(res, harmful, alpha) if role == "guardrail" else None,
                "harmful": harmful,
                "multi_variant_users": n_multi,
                "error": no_control or res.error,
            }
            if cuped_arms is not None:
                theta = S.cuped_theta(cuped_arms[0], cuped_arms[j])
                c = S.welch_test(S.cuped_adjust(cuped_arms[0], theta), S.cuped_adjust(cuped_arms[j], theta), alpha)
                rec.update(p_value_cuped=_f(c.p_value), abs_lift_cuped=_f(c.abs_lift),
                           ci_low_cuped=_f(c.ci_low), ci_high_cuped=_f(c.ci_high), cuped_theta=float(theta))
            records.append(rec)
            fam.append(rec)
        pv = [r["p_value"] if r["p_value"] is not None else math.nan for r in fam]
        h, b = S.holm(pv), S.benjamini_hochberg(pv)
        for r, hh, bb in zip(fam, h, b):
            r["p_value_holm"], r["p_value_bh"] = _f(hh), _f(bb)
            r["p_value_adjusted"] = r["p_value_holm"] if correction == "holm" else r["p_value_bh"]
    return records


def _id_kind(s: pd.Series) -> str:
    return "number" if pd.api.types.is_numeric_dtype(s.dtype) else "text"


def _no_exposures(e, mdefs, experiment_col) -> list[dict]:
    """Records that say an experiment has no exposure at all (a typo, or not launched yet)."""
    seen = [str(x) for x in pd.unique(experiment_col)[:50]]
    msg = f"no exposures for experiment {e['name']!r}" + did_you_mean(e["name"], seen)
    treatments = [v for v in (e["variants"] or [None]) if v != e["control"]]
    return [{"experiment": e["name"], "variant": v, "metric": m, "metric_type": mdefs[m]["type"], "role": role,
             "users": 0, "control_users": 0, "control_mean": None, "treatment_mean": None, "abs_lift": None,
             "rel_lift": None, "ci_low": None, "ci_high": None, "rel_ci_low": None, "rel_ci_high": None,
             "p_value": None, "p_value_cuped": None, "abs_lift_cuped": None, "ci_low_cuped": None,
             "ci_high_cuped": None, "cuped_theta": None, "seq_ci_low": None, "seq_ci_high": None,
             "p_value_sequential": None, "p_value_adjusted": None, "p_value_holm": None, "p_value_bh": None,
             "srm_p": 1.0, "srm_alarm": False, "guardrail": None, "harmful": harmful,
             "multi_variant_users": 0, "error": msg}
            for v in treatments for m, role, harmful in e["metrics"]]


def _per_user_columns(ev_loc, ev_type, ev_val, mask, n_e, types, refs) -> np.ndarray:
    """``(n_users, len(refs))`` matrix: per-user count or value-sum of each (event, agg)."""
    idx = ev_loc[mask] * len(types) + ev_type[mask]
    size = n_e * len(types)
    counts = np.bincount(idx, minlength=size).reshape(n_e, len(types)).astype(np.float64)
    sums = None
    if any(agg == "sum" for _, agg in refs):
        sums = np.bincount(idx, weights=ev_val[mask], minlength=size).reshape(n_e, len(types))
    out = np.empty((n_e, len(refs)))
    for i, (ev, agg) in enumerate(refs):
        ti = types.index(ev)
        out[:, i] = counts[:, ti] if agg == "count" else sums[:, ti]
    return out


def _f(x) -> float | None:
    """Plain float for records; NaN becomes None (JSON-friendly)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x
