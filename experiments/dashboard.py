"""The A/B dashboard: analysis results -> readable HTML with server-side PNG plots.

A results folder (written by ``stratarank experiments analyze --out DIR``) holds:

* ``results.json``     — the records of :func:`experiments.analysis.analyze` (one per experiment,
  treatment variant and metric);
* ``experiments.json`` — ``{generated_at, config, alpha, metrics, experiments: [...]}``: each experiment's
  declaration (layer, range, status, variants with weights/overrides/model, metrics, guardrails) and
  its users per variant;
* ``cumulative.json``  — the analysis re-run on the data up to the end of each day (``at``: the
  ISO date of the cut): ``[{experiment, variant, metric, at, users, control_users, rel_lift,
  rel_ci_low, rel_ci_high, p_value}]``, for the cumulative-lift-over-time plots.

* ``*decisions.jsonl`` — optional: the guarded-ramp controller's decision logs
  (``stratarank experiments control``; point the ramp's ``log:`` here or pass ``--decisions``),
  shown as each experiment's ramp timeline.

Views (no CDN, no JavaScript; plots are matplotlib Agg PNGs inlined as base64):

* ``GET /dashboard/`` — every experiment with its status, users per variant, SRM check and a
  verdict; a red banner names experiments with a sample-ratio mismatch;
* ``GET /dashboard/experiment/<name>`` — per variant a table of metrics (control and treatment
  means, relative lift in %, its CI, p-values, significance coloured), a forest plot of the lifts,
  cumulative lift over time, the guardrail verdicts and the ramp timeline (traffic share over time,
  every advance / hold / stop with its reasons and evidence).

``dashboard_blueprint(results_dir)`` re-reads the folder on each request, so a new analysis shows
up on reload. ``write_static_html(results_dir, out)`` writes the same content as one HTML file.

Number formats (also what tests compare against): relative lift ``f"{x * 100:+.2f}%"``,
p-values ``f"{p:.4f}"`` (``<0.0001`` below that), means ``f"{x:.4g}"``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = [
    "build_results", "write_results", "read_results", "fmt_pct", "fmt_p", "render_index",
    "render_experiment", "render_static", "write_static_html", "dashboard_blueprint", "create_app",
    "read_decisions", "timeline_plot",
]

RESULTS = "results.json"
EXPERIMENTS = "experiments.json"
CUMULATIVE = "cumulative.json"
DECISIONS = "*decisions.jsonl"
DECISION_KEYS = ("time", "experiment", "action", "range_after")
MAX_CUTS = 60
DAY = 86_400.0


# ----------------------------------------------------------------------------- results folder
def _seconds(ts) -> "np.ndarray":
    """Timestamps as float Unix seconds: datetimes (UTC), numbers (already seconds) or strings."""
    import numpy as np
    import pandas as pd
    s = pd.Series(ts)
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.to_numpy(dtype="datetime64[ns]").view("i8") / 1e9
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype="float64")
    return pd.to_datetime(s, utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view("i8") / 1e9


def _day_cuts(exposure_seconds, event_seconds) -> list[float]:
    """Cut times for the cumulative series: the end of each UTC day from the first exposure to the
    last exposure or event (at most MAX_CUTS); for data spanning under two days (a closed-loop
    demo runs for minutes) ten equal time slices instead."""
    import numpy as np
    if not len(exposure_seconds):
        return []
    first_ts = float(np.nanmin(exposure_seconds))
    last_ts = float(np.nanmax(exposure_seconds))
    if len(event_seconds):
        last_ts = max(last_ts, float(np.nanmax(event_seconds)))
    if last_ts - first_ts < 2 * DAY:
        step = max((last_ts - first_ts) / 10.0, 1.0)
        return [float(first_ts + step * k) for k in range(1, 11)] + [last_ts + 1.0]
    first = math.floor(first_ts / DAY) * DAY
    cuts = list(np.arange(first + DAY, last_ts + DAY, DAY))
    if cuts and cuts[-1] <= last_ts:
        cuts.append(cuts[-1] + DAY)
    if len(cuts) > MAX_CUTS:
        idx = np.unique(np.linspace(0, len(cuts) - 1, MAX_CUTS).round().astype(int))
        cuts = [cuts[i] for i in idx]
    return [float(c) for c in cuts]


def build_results(config, exposures, events, pre_period=None, alpha: float = 0.05, correction: str = "holm",
                  cumulative: bool = True) -> dict:
    """Analyse ``config``'s experiments (an :class:`ExperimentsConfig`); returns the results bundle
    ``{records, experiments, cumulative, meta}`` that :func:`write_results` stores."""
    from .analysis import analyze
    metrics, exps = config.analysis_metrics(), config.analysis_experiments()
    records = analyze(exposures, events, metrics, exps, pre_period=pre_period, alpha=alpha, correction=correction)
    series: list[dict] = []
    if cumulative and len(exposures):
        xs, es = _seconds(exposures["ts"]), _seconds(events["ts"]) if len(events) else []
        cuts = _day_cuts(xs, es)
        daily = len(cuts) > 1 and cuts[1] - cuts[0] >= DAY
        for cut in cuts:
            sub_x = exposures[xs < cut]
            if not len(sub_x):
                continue
            sub_e = events[es < cut] if len(events) else events
            moment = _dt.datetime.fromtimestamp(cut - 1, _dt.timezone.utc)
            at = moment.date().isoformat() if daily else moment.strftime("%Y-%m-%d %H:%M:%S")
            for r in analyze(sub_x, sub_e, metrics, exps, pre_period=pre_period, alpha=alpha, correction=correction):
                series.append({"experiment": r["experiment"], "variant": r["variant"], "metric": r["metric"],
                               "at": at, "users": r["users"], "control_users": r["control_users"],
                               "rel_lift": r["rel_lift"], "rel_ci_low": r["rel_ci_low"],
                               "rel_ci_high": r["rel_ci_high"], "p_value": r["p_value"]})
    exp_meta = []
    for e in config.experiments:
        d = e.to_dict()
        recs = [r for r in records if r["experiment"] == e.name]
        users = {e.control: recs[0]["control_users"] if recs else 0}
        for r in recs:
            users[r["variant"]] = r["users"]
        d["users"] = users
        d["srm_p"] = recs[0]["srm_p"] if recs else None
        d["srm_alarm"] = bool(recs and recs[0]["srm_alarm"])
        exp_meta.append(d)
    meta = {"generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "config": config.source, "alpha": alpha, "correction": correction,
            "pre_period": None if pre_period is None else str(pre_period),
            "metrics": {k: dict(v) for k, v in config.metrics.items()}}
    return {"records": records, "experiments": exp_meta, "cumulative": series, "meta": meta}


def write_results(out_dir: str | Path, bundle: Mapping) -> list[Path]:
    """Write ``results.json``, ``experiments.json`` and ``cumulative.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {RESULTS: bundle["records"], CUMULATIVE: bundle.get("cumulative", []),
             EXPERIMENTS: {**bundle.get("meta", {}), "experiments": bundle.get("experiments", [])}}
    written = []
    for name, payload in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
        tmp.replace(out / name)
        written.append(out / name)
    return written


def read_decisions(paths: Sequence[str | Path]) -> tuple[list[dict], list[str]]:
    """The controller's decision records from JSON-lines logs, in time order, and one problem per
    unreadable line (``file:line: why``): a bad line is reported, never fatal."""
    decisions, problems = [], []
    for path in paths:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            continue
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = [k for k in DECISION_KEYS if k not in rec] if isinstance(rec, dict) else ["an object"]
                if missing:
                    raise ValueError(f"missing {', '.join(missing)}")
                rec["time"], rec["range_after"] = float(rec["time"]), [float(x) for x in rec["range_after"]]
            except (ValueError, TypeError) as exc:
                problems.append(f"{path}:{no}: not a decision record ({exc})")
                continue
            decisions.append(rec)
    decisions.sort(key=lambda r: r["time"])
    return decisions, problems


def read_results(results_dir: str | Path, decisions: Sequence[str | Path] = ()) -> dict:
    """The bundle back from a results folder; ``experiments.json``/``cumulative.json`` are optional
    (a bare ``results.json`` gives experiments derived from its records). Decision logs: the
    folder's ``*decisions.jsonl`` and the ``decisions`` paths."""
    d = Path(results_dir)
    path = d / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run: stratarank experiments analyze ... --out {d})")
    records = json.loads(path.read_text(encoding="utf-8"))
    meta: dict = {}
    if (d / EXPERIMENTS).is_file():
        meta = json.loads((d / EXPERIMENTS).read_text(encoding="utf-8"))
    exps = meta.pop("experiments", None)
    if exps is None:
        exps = []
        for r in records:
            if not any(e["name"] == r["experiment"] for e in exps):
                exps.append({"name": r["experiment"], "layer": "", "status": "running", "range": None,
                             "control": "control", "variants": {}, "users": {"control": r["control_users"]},
                             "srm_p": r["srm_p"], "srm_alarm": r["srm_alarm"], "description": ""})
            next(e for e in exps if e["name"] == r["experiment"])["users"][r["variant"]] = r["users"]
    series = json.loads((d / CUMULATIVE).read_text(encoding="utf-8")) if (d / CUMULATIVE).is_file() else []
    logs = sorted(d.glob(DECISIONS)) + [Path(p) for p in decisions]
    ramp, problems = read_decisions(list(dict.fromkeys(logs)))
    return {"records": records, "experiments": exps, "cumulative": series, "meta": meta, "decisions": ramp,
            "problems": problems}


# ----------------------------------------------------------------------------- formatting
def fmt_pct(x) -> str:
    return "–" if x is None else f"{x * 100:+.2f}%"


def fmt_p(p) -> str:
    if p is None:
        return "–"
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


def _p_is(p) -> str:
    """``p = 0.0123`` or ``p < 0.0001``."""
    text = fmt_p(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def _fmt_num(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _significance(r: Mapping, alpha: float) -> str:
    """``win`` / ``loss`` / ``flat`` / ``none`` for a record (goal: higher is better; guardrail: by verdict)."""
    if r.get("error") or r.get("p_value") is None:
        return "none"
    if r.get("role") == "guardrail":
        return "loss" if r.get("guardrail") == "fail" else "flat"
    p = r.get("p_value_adjusted") if r.get("p_value_adjusted") is not None else r["p_value"]
    if p < alpha:
        return "win" if (r.get("abs_lift") or 0) > 0 else "loss"
    return "flat"


def _verdict(exp: Mapping, recs: Sequence[Mapping], alpha: float) -> tuple[str, str]:
    """(css class, text) summarising an experiment for the list view."""
    if exp.get("srm_alarm"):
        return "bad", "SRM alarm: do not trust"
    if not recs or all(r.get("error") for r in recs):
        return "none", "no data"
    if any(r.get("guardrail") == "fail" for r in recs):
        return "bad", "guardrail failed"
    sig = [_significance(r, alpha) for r in recs if r.get("role") == "goal"]
    if "loss" in sig:
        return "bad", f"{sig.count('loss')} goal metric(s) worse"
    if "win" in sig:
        return "good", f"{sig.count('win')} goal metric(s) better"
    return "flat", "no significant change"


# ----------------------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w, h):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state
    return Figure(figsize=(w, h))


COLORS = {"win": "#1a7f37", "loss": "#cf222e", "flat": "#57606a", "none": "#8c959f"}


def forest_plot(recs: Sequence[Mapping], alpha: float) -> str | None:
    """Relative lift and its CI per (variant, metric), as a base64 PNG."""
    rows = [r for r in recs if r.get("rel_lift") is not None]
    if not rows:
        return None
    fig = _figure(7.5, 0.5 * len(rows) + 1.2)
    ax = fig.add_subplot(111)
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        c = COLORS[_significance(r, alpha)]
        lo, hi = r.get("rel_ci_low"), r.get("rel_ci_high")
        if lo is not None and hi is not None:
            ax.plot([lo * 100, hi * 100], [y, y], color=c, lw=2.5, solid_capstyle="round")
        ax.plot([r["rel_lift"] * 100], [y], "o", color=c, ms=7)
    ax.axvline(0, color="#333", lw=1, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['metric']} ({r['variant']})" + (" [guardrail]" if r.get("role") == "guardrail" else "")
                        for r in reversed(rows)])
    ax.set_xlabel(f"relative lift vs control, % ({(1 - alpha):.0%} CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    return _png(fig)


def cumulative_plot(series: Sequence[Mapping], metrics: Sequence[str]) -> str | None:
    """Cumulative relative lift over time (one panel per metric, a line + CI band per variant)."""
    import numpy as np
    if not series:
        return None
    metrics = [m for m in metrics if any(s["metric"] == m for s in series)]
    if not metrics:
        return None
    fig = _figure(7.5, 2.1 * len(metrics) + 0.6)
    palette = ["#0969da", "#bf3989", "#9a6700", "#1a7f37"]
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, k + 1)
        variants = sorted({s["variant"] for s in series if s["metric"] == m}, key=str)
        for j, v in enumerate(variants):
            pts = [s for s in series if s["metric"] == m and s["variant"] == v]
            x = np.arange(len(pts))
            y = np.array([np.nan if s["rel_lift"] is None else s["rel_lift"] * 100 for s in pts])
            lo = np.array([np.nan if s["rel_ci_low"] is None else s["rel_ci_low"] * 100 for s in pts])
            hi = np.array([np.nan if s["rel_ci_high"] is None else s["rel_ci_high"] * 100 for s in pts])
            col = palette[j % len(palette)]
            ax.fill_between(x, lo, hi, color=col, alpha=0.15, lw=0)
            ax.plot(x, y, marker="o", ms=3, color=col, label=str(v))
            ax.set_xticks(x)
            labels = [s["at"][5:] if len(s["at"]) == 10 else s["at"][11:] for s in pts]  # MM-DD or HH:MM:SS
            ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(pts) > 8 else 0)
        ax.axhline(0, color="#333", lw=1, ls="--")
        _focus(ax, [s for s in series if s["metric"] == m])
        ax.set_ylabel("lift %")
        ax.set_title(m, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if len(variants) > 1:
            ax.legend(fontsize=8)
    fig.subplots_adjust(hspace=0.7)
    return _png(fig)


ACTION_COLORS = {"advance": "#1a7f37", "complete": "#0969da", "hold": "#8c959f", "stop": "#cf222e"}


def timeline_plot(decisions: Sequence[Mapping]) -> str | None:
    """The ramp over time: the experiment's traffic share (step line) and each decision as a marker."""
    if not decisions:
        return None
    from matplotlib.lines import Line2D
    times = [_dt.datetime.fromtimestamp(r["time"], _dt.timezone.utc).replace(tzinfo=None) for r in decisions]
    share = [0.0 if r.get("status") == "stopped" else (r["range_after"][1] - r["range_after"][0]) * 100
             for r in decisions]
    fig = _figure(7.5, 2.6)
    ax = fig.add_subplot(111)
    ax.step(times, share, where="post", color="#24292f", lw=1.5)
    for t, y, r in zip(times, share, decisions):
        ax.plot([t], [y], "o", ms=7 if r["action"] != "hold" else 4, color=ACTION_COLORS.get(r["action"], "#57606a"))
    ax.set_ylabel("traffic, % of layer")
    ax.set_ylim(0, max(share + [1.0]) * 1.15)
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=c, label=a) for a, c in ACTION_COLORS.items()],
              fontsize=8, loc="upper left", ncol=4)
    fig.autofmt_xdate()
    return _png(fig)


def _focus(ax, pts: Sequence[Mapping]) -> None:
    """Y-limits that fit the CIs once a fifth of the final users are in, so the first days'
    very wide bands do not flatten the rest of the curve (they are clipped, not hidden)."""
    final = max((s["users"] for s in pts), default=0)
    vals = [v * 100 for s in pts if s["users"] >= 0.2 * final
            for v in (s["rel_ci_low"], s["rel_ci_high"], s["rel_lift"]) if v is not None]
    if vals:
        lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
        pad = 0.1 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


# ----------------------------------------------------------------------------- HTML
CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header .sub{color:#c9d1d9;font-size:13px;margin-top:4px}
main{padding:18px 28px;max-width:1200px}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
.banner{background:#cf222e;color:#fff;padding:12px 16px;border-radius:6px;margin:0 0 16px;font-weight:600}
.banner small{font-weight:400;display:block;margin-top:4px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin-bottom:18px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #d8dee4;text-align:right;white-space:nowrap}
th{background:#f6f8fa;font-weight:600}th:first-child,td:first-child,td.name,th.name{text-align:left}
td.win{color:#1a7f37;font-weight:700;background:#dafbe1}td.loss{color:#cf222e;font-weight:700;background:#ffebe9}
td.flat{color:#57606a}td.none{color:#8c959f}
.pill{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600}
.pill.good{background:#dafbe1;color:#1a7f37}.pill.bad{background:#ffebe9;color:#cf222e}
.pill.flat,.pill.none{background:#eaeef2;color:#57606a}.pill.running{background:#ddf4ff;color:#0969da}
.pill.stopped,.pill.hold{background:#eaeef2;color:#57606a}
.pill.advance{background:#dafbe1;color:#1a7f37}.pill.complete{background:#ddf4ff;color:#0969da}
.pill.stop{background:#ffebe9;color:#cf222e}td.wrap{white-space:normal;font-size:12px}
.pass{color:#1a7f37;font-weight:700}.fail{color:#cf222e;font-weight:700}
.note{color:#57606a;font-size:13px}img.plot{max-width:100%;border:1px solid #d8dee4;border-radius:6px;background:#fff}
h2{font-size:18px;margin:0 0 6px}h3{font-size:15px;margin:16px 0 6px}
"""


def _page(title: str, body: str, meta: Mapping) -> str:
    sub = " · ".join(x for x in (f"generated {meta.get('generated_at')}" if meta.get("generated_at") else "",
                                 f"config {meta.get('config')}" if meta.get("config") else "",
                                 f"α = {meta.get('alpha', 0.05)}") if x)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
            f"<body><header><h1>{_e(title)}</h1><div class=sub>{_e(sub)}</div></header><main>{body}</main>"
            "</body></html>")


def _srm_banner(exps: Sequence[Mapping]) -> str:
    bad = [e for e in exps if e.get("srm_alarm")]
    if not bad:
        return ""
    items = "; ".join(f"{_e(e['name'])} ({_e(_p_is(e.get('srm_p')))}, users "
                      + " / ".join(f"{_e(v)} {n:,}" for v, n in (e.get("users") or {}).items()) + ")" for e in bad)
    return (f"<div class=banner id=srm-banner role=alert>Sample ratio mismatch: {items}"
            "<small>The split of users across variants differs from the configured weights (χ² test, p &lt; 0.001). "
            "Assignment or logging is broken; do not trust these results until it is fixed.</small></div>")


def _weights(e: Mapping) -> str:
    v = e.get("variants") or {}
    return " / ".join(f"{_e(k)} {spec.get('weight', 0):.0%}" for k, spec in v.items()) if v else "–"


def render_index(bundle: Mapping, link=lambda name: f"experiment/{name}") -> str:
    """The list of experiments (status, traffic, users, SRM, verdict) as an HTML fragment."""
    alpha = bundle.get("meta", {}).get("alpha", 0.05)
    rows = []
    for e in bundle["experiments"]:
        recs = [r for r in bundle["records"] if r["experiment"] == e["name"]]
        cls, text = _verdict(e, recs, alpha)
        rng = e.get("range")
        ramp = [d for d in bundle.get("decisions", []) if d["experiment"] == e["name"]]
        traffic = "–" if not rng else f"{(rng[1] - rng[0]):.0%}"
        if ramp:  # the controller's latest range, not the declared one
            last = ramp[-1]
            share = 0.0 if last.get("status") == "stopped" else last["range_after"][1] - last["range_after"][0]
            traffic = f"{share:.0%} <span class='pill {_e(last['action'])}'>ramp: {_e(last['action'])}</span>"
        users = " / ".join(f"{_e(v)} {n:,}" for v, n in (e.get("users") or {}).items())
        srm = (f"<span class='pill bad'>SRM p {fmt_p(e.get('srm_p'))}</span>" if e.get("srm_alarm")
               else f"<span class=note>p {fmt_p(e.get('srm_p'))}</span>")
        rows.append(
            f"<tr id='row-{_e(e['name'])}'><td class=name><a href='{_e(link(e['name']))}'>{_e(e['name'])}</a></td>"
            f"<td class=name>{_e(e.get('layer', ''))}</td>"
            f"<td class=name><span class='pill {_e(e.get('status', 'running'))}'>{_e(e.get('status', 'running'))}</span></td>"
            f"<td>{traffic}</td><td class=name>{_weights(e)}</td>"
            f"<td class=name>{users}</td><td>{srm}</td><td class=name><span class='pill {cls}'>{_e(text)}</span></td></tr>")
    table = ("<table id=experiments><thead><tr><th class=name>experiment</th><th class=name>layer</th>"
             "<th class=name>status</th><th>traffic</th><th class=name>weights</th><th class=name>users</th>"
             "<th>SRM</th><th class=name>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return (_srm_banner(bundle["experiments"]) + _problems_banner(bundle.get("problems", []))
            + f"<div class=card><h2>Experiments</h2>{table}</div>")


def _metric_table(recs: Sequence[Mapping], alpha: float, cuped: bool) -> str:
    head = ("<tr><th class=name>metric</th><th class=name>role</th><th>control</th><th>treatment</th>"
            f"<th>rel. lift</th><th>{(1 - alpha):.0%} CI (rel.)</th><th>p-value</th><th>adj. p</th>"
            + ("<th>CUPED p</th>" if cuped else "") + "<th>users (c / t)</th><th class=name>verdict</th></tr>")
    rows = []
    for r in recs:
        sig = _significance(r, alpha)
        if r.get("role") == "guardrail":
            verdict = (f"<span class={'fail' if r.get('guardrail') == 'fail' else 'pass'}>"
                       f"{_e((r.get('guardrail') or '–').upper())}</span>"
                       f" <span class=note>(harmful: {_e(r.get('harmful'))})</span>")
        else:
            verdict = {"win": "<span class=pass>better</span>", "loss": "<span class=fail>worse</span>",
                       "flat": "not significant", "none": "–"}[sig]
        if r.get("error"):
            verdict = f"<span class=note>{_e(r['error'])}</span>"
        ci = ("–" if r.get("rel_ci_low") is None or r.get("rel_ci_high") is None
              else f"[{fmt_pct(r['rel_ci_low'])}, {fmt_pct(r['rel_ci_high'])}]")
        key = f"data-metric='{_e(r['metric'])}' data-variant='{_e(r['variant'])}'"
        rows.append(
            f"<tr {key}><td class=name>{_e(r['metric'])}</td><td class=name>{_e(r.get('role', ''))}</td>"
            f"<td>{_fmt_num(r.get('control_mean'))}</td><td>{_fmt_num(r.get('treatment_mean'))}</td>"
            f"<td class='lift {sig}' {key}>{fmt_pct(r.get('rel_lift'))}</td><td class='ci {sig}'>{ci}</td>"
            f"<td class=p>{fmt_p(r.get('p_value'))}</td><td>{fmt_p(r.get('p_value_adjusted'))}</td>"
            + (f"<td>{fmt_p(r.get('p_value_cuped'))}</td>" if cuped else "")
            + f"<td>{r.get('control_users', 0):,} / {r.get('users', 0):,}</td><td class=name>{verdict}</td></tr>")
    return f"<table class=metrics><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _evidence(rec: Mapping) -> str:
    if rec.get("metric") == "srm":
        return f"SRM p {fmt_p(rec.get('estimate'))}"
    ci = f"[{fmt_pct(rec.get('ci_low'))}, {fmt_pct(rec.get('ci_high'))}]"
    margin = "–" if rec.get("margin") is None else f"{rec['margin'] * 100:.2f}%"
    return (f"{_e(rec.get('metric'))} ({_e(rec.get('variant'))}) {fmt_pct(rec.get('estimate'))} {ci} "
            f"vs margin {margin}: {_e(rec.get('verdict', '–'))}")


def render_timeline(decisions: Sequence[Mapping]) -> str:
    """The guarded ramp of one experiment: a plot and one row per decision with its evidence."""
    if not decisions:
        return ""
    plot = timeline_plot(decisions)
    rows = []
    for r in reversed(decisions):  # newest first
        lo, hi = r["range_after"]
        before = r.get("range_before") or r["range_after"]
        step = f"{r.get('step_before', 0) + 1} → {r.get('step_after', 0) + 1}"
        rows.append(
            f"<tr class='decision {_e(r['action'])}'><td class=name>{_e(_iso(r['time']))}</td>"
            f"<td class=name><span class='pill {_e(r['action'])}'>{_e(r['action'])}</span></td><td>{_e(step)}</td>"
            f"<td>{(before[1] - before[0]):.0%} → {(0 if r.get('status') == 'stopped' else hi - lo):.0%}</td>"
            f"<td class='name wrap'>{'<br>'.join(_e(x) for x in r.get('reasons', []))}</td>"
            f"<td class='name wrap'>{'<br>'.join(_evidence(x) for x in r.get('evidence', []))}</td></tr>")
    last = decisions[-1]
    return ("<div class=card id=ramp><h3>Guarded ramp: decisions over time</h3>"
            f"<p class=note>{len(decisions)} decisions; now <b>{_e(last.get('status', 'running'))}</b> at "
            f"{(0 if last.get('status') == 'stopped' else last['range_after'][1] - last['range_after'][0]):.0%} "
            "of the layer. Evidence: relative lift with its always-valid (sequential) confidence interval "
            "against the guardrail's margin.</p>"
            + (f"<img class=plot alt='ramp timeline' src='data:image/png;base64,{plot}'>" if plot else "")
            + "<table class=timeline><thead><tr><th class=name>time (UTC)</th><th class=name>action</th><th>step</th>"
            "<th>traffic</th><th class=name>reasons</th><th class=name>evidence</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>")


def _problems_banner(problems: Sequence[str]) -> str:
    if not problems:
        return ""
    shown = "".join(f"<br>{_e(p)}" for p in problems[:5])
    more = f"<br>… and {len(problems) - 5} more" if len(problems) > 5 else ""
    return f"<div class=banner role=alert>Decision log lines skipped:<small>{shown}{more}</small></div>"


def render_experiment(bundle: Mapping, name: str) -> str:
    """One experiment: metric tables per variant, forest plot, cumulative lift, guardrails."""
    alpha = bundle.get("meta", {}).get("alpha", 0.05)
    e = next((x for x in bundle["experiments"] if x["name"] == name), None)
    if e is None:
        raise KeyError(name)
    recs = [r for r in bundle["records"] if r["experiment"] == name]
    cls, text = _verdict(e, recs, alpha)
    parts = [_srm_banner([e])]
    variants = e.get("variants") or {}
    overrides = "; ".join(
        f"<b>{_e(v)}</b>: " + (", ".join(f"{_e(k)} = {_e(x)}" for k, x in (spec.get("overrides") or {}).items())
                               or "base strategy") + (f", model {_e(spec['model'])}" if spec.get("model") else "")
        for v, spec in variants.items())
    rng = e.get("range")
    parts.append(
        f"<div class=card id='exp-{_e(name)}'><h2>{_e(name)} <span class='pill {cls}'>{_e(text)}</span> "
        f"<span class='pill {_e(e.get('status', 'running'))}'>{_e(e.get('status', 'running'))}</span></h2>"
        + (f"<p>{_e(e['description'])}</p>" if e.get("description") else "")
        + f"<p class=note>layer {_e(e.get('layer', ''))} · traffic "
        + ("–" if not rng else f"[{rng[0]:g}, {rng[1]:g})") + f" · weights {_weights(e)} · users "
        + " / ".join(f"{_e(v)} {n:,}" for v, n in (e.get("users") or {}).items())
        + f" · SRM p {fmt_p(e.get('srm_p'))}</p>" + (f"<p class=note>{overrides}</p>" if overrides else ""))
    cuped = any(r.get("p_value_cuped") is not None for r in recs)
    for v in dict.fromkeys(r["variant"] for r in recs):
        parts.append(f"<h3>{_e(v)} vs {_e(e.get('control', 'control'))}</h3>"
                     + _metric_table([r for r in recs if r["variant"] == v], alpha, cuped))
    guards = [r for r in recs if r.get("role") == "guardrail"]
    if guards:
        items = "".join(
            f"<li><span class={'fail' if r.get('guardrail') == 'fail' else 'pass'}>"
            f"{_e((r.get('guardrail') or 'n/a').upper())}</span> {_e(r['metric'])} ({_e(r['variant'])}): "
            f"{fmt_pct(r.get('rel_lift'))}, p {fmt_p(r.get('p_value'))}, harmful if it {_e(r.get('harmful'))}s</li>"
            for r in guards)
        parts.append(f"<h3>Guardrails</h3><ul class=guardrails>{items}</ul>")
    parts.append("</div>")
    forest = forest_plot(recs, alpha)
    if forest:
        parts.append(f"<div class=card><h3>Relative lift by metric</h3><img class=plot alt='forest plot of lifts' "
                     f"src='data:image/png;base64,{forest}'></div>")
    series = [s for s in bundle.get("cumulative", []) if s["experiment"] == name]
    cum = cumulative_plot(series, list(dict.fromkeys(r["metric"] for r in recs)))
    if cum:
        parts.append(f"<div class=card><h3>Cumulative relative lift over time</h3><img class=plot "
                     f"alt='cumulative lift over time' src='data:image/png;base64,{cum}'>"
                     "<p class=note>Each point re-analyses all data up to the end of that day (UTC); "
                     "the band is the unadjusted CI, so early peeks are noisier than they look.</p></div>")
    parts.append(render_timeline([d for d in bundle.get("decisions", []) if d["experiment"] == name]))
    return "".join(parts)


def render_static(bundle: Mapping) -> str:
    """One self-contained page: the list, then every experiment (PNG plots inlined)."""
    body = render_index(bundle, link=lambda n: f"#exp-{n}")
    body += "".join(render_experiment(bundle, e["name"]) for e in bundle["experiments"])
    return _page("Stratarank · A/B experiments", body, bundle.get("meta", {}))


def write_static_html(results_dir: str | Path, out: str | Path, decisions: Sequence[str | Path] = ()) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_static(read_results(results_dir, decisions)), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- Flask
def dashboard_blueprint(results_dir: str | Path, url_prefix: str = "/dashboard", decisions: Sequence[str | Path] = ()):
    """A Flask blueprint serving the dashboard of ``results_dir`` and the ``decisions`` logs
    (all re-read on each request)."""
    from flask import Blueprint, Response, abort

    bp = Blueprint("dashboard", __name__, url_prefix=url_prefix)
    results_dir = Path(results_dir)

    def load():
        try:
            return read_results(results_dir, decisions)
        except FileNotFoundError as exc:
            abort(Response(_page("Stratarank · no results", f"<div class=banner>{_e(exc)}</div>", {}), 404))

    @bp.get("/")
    def index():
        b = load()
        return _page("Stratarank · A/B experiments", render_index(b), b.get("meta", {}))

    @bp.get("/experiment/<name>")
    def experiment(name):
        b = load()
        try:
            body = render_experiment(b, name)
        except KeyError:
            abort(404)
        body = "<p><a href='../'>← all experiments</a></p>" + body
        return _page(f"Stratarank · {name}", body, b.get("meta", {}))

    @bp.get("/results.json")
    def raw():
        return Response(json.dumps(load()["records"]), mimetype="application/json")

    return bp


def create_app(results_dir: str | Path, decisions: Sequence[str | Path] = ()):
    """A Flask app with the dashboard blueprint at ``/dashboard`` (``/`` redirects there)."""
    from flask import Flask, redirect
    app = Flask("stratarank.dashboard")
    app.register_blueprint(dashboard_blueprint(results_dir, decisions=decisions))

    @app.get("/")
    def root():
        return redirect("/dashboard/")

    return app
