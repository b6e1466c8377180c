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

The HTML comes from the Jinja templates in ``experiments/templates/`` (page, list, experiment, shared
macros, CSS), autoescaped: a name or text from the results folder is shown as text, never read as markup.

``dashboard_blueprint(results_dir)`` re-reads the folder on each request, so a new analysis shows
up on reload. ``write_static_html(results_dir, out)`` writes the same content as one HTML file.

Number formats (also what tests compare against): relative lift ``f"{x * 100:+.2f}%"``,
p-values ``f"{p:.4f}"`` (``<0.0001`` below that), means ``f"{x:.4g}"``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import functools
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
TITLE = "Stratarank · A/B experiments"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _width(rng: Sequence[float]) -> float:
    return rng[1] - rng[0]


def _traffic(decision: Mapping) -> float:
    """The share of the layer a ramp decision leaves to the experiment (none once it is stopped)."""
    return 0.0 if decision.get("status") == "stopped" else _width(decision["range_after"])


@functools.cache
def _templates():
    """The Jinja environment of ``experiments/templates``: every value autoescaped, a missing one an
    error, the number formats above as filters."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("experiments", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, p=fmt_p, p_is=_p_is, num=_fmt_num, iso=_iso, width=_width, traffic=_traffic,
                       share="{:.0%}".format, count="{:,}".format, g="{:g}".format)
    env.globals["significance"] = _significance
    return env


def _render(template: str, **context) -> str:
    return _templates().get_template(template).render(**context)


def _page(title: str, meta: Mapping, body: str = "", back: str | None = None, error=None) -> str:
    """A whole page around ``body`` (HTML rendered from this module's templates, inserted as it is);
    ``back``: a link to the list; ``error``: a message shown as a banner."""
    from markupsafe import Markup

    return _render("page.html.j2", title=title, meta=meta, body=Markup(body), back=back, error=error)


def render_index(bundle: Mapping, link=lambda name: f"experiment/{name}") -> str:
    """The list of experiments (status, traffic, users, SRM, verdict) as an HTML fragment."""
    alpha = bundle.get("meta", {}).get("alpha", 0.05)
    rows = []
    for e in bundle["experiments"]:
        recs = [r for r in bundle["records"] if r["experiment"] == e["name"]]
        ramp = [d for d in bundle.get("decisions", []) if d["experiment"] == e["name"]]
        rows.append({"experiment": e, "href": link(e["name"]), "verdict": _verdict(e, recs, alpha),
                     "ramp": ramp[-1] if ramp else None})
    return _render("index.html.j2", experiments=bundle["experiments"], problems=bundle.get("problems", []), rows=rows)


def render_experiment(bundle: Mapping, name: str) -> str:
    """One experiment: metric tables per variant, forest plot, cumulative lift, guardrails, ramp timeline."""
    alpha = bundle.get("meta", {}).get("alpha", 0.05)
    e = next((x for x in bundle["experiments"] if x["name"] == name), None)
    if e is None:
        raise KeyError(name)
    recs = [r for r in bundle["records"] if r["experiment"] == name]
    series = [s for s in bundle.get("cumulative", []) if s["experiment"] == name]
    decisions = [d for d in bundle.get("decisions", []) if d["experiment"] == name]
    return _render(
        "experiment.html.j2", e=e, alpha=alpha, verdict=_verdict(e, recs, alpha),
        tables=[(v, [r for r in recs if r["variant"] == v]) for v in dict.fromkeys(r["variant"] for r in recs)],
        cuped=any(r.get("p_value_cuped") is not None for r in recs),
        guards=[r for r in recs if r.get("role") == "guardrail"], forest=forest_plot(recs, alpha),
        cumulative=cumulative_plot(series, list(dict.fromkeys(r["metric"] for r in recs))),
        decisions=decisions, timeline=timeline_plot(decisions))


def render_static(bundle: Mapping) -> str:
    """One self-contained page: the list, then every experiment (PNG plots inlined)."""
    body = render_index(bundle, link=lambda n: f"#exp-{n}")
    body += "".join(render_experiment(bundle, e["name"]) for e in bundle["experiments"])
    return _page(TITLE, bundle.get("meta", {}), body)


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
            abort(Response(_page("Stratarank · no results", {}, error=exc), 404))

    @bp.get("/")
    def index():
        b = load()
        return _page(TITLE, b.get("meta", {}), render_index(b))

    @bp.get("/experiment/<name>")
    def experiment(name):
        b = load()
        try:
            body = render_experiment(b, name)
        except KeyError:
            abort(404)
        return _page(f"Stratarank · {name}", b.get("meta", {}), body, back="../")

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
