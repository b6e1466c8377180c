"""`stratarank validate` on experiment files, `stratarank experiments analyze` and `stratarank dashboard --html`
as an analyst runs them (real files, real processes), plus the dashboard blueprint through Flask's test client."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import analyze
from experiments.assignment import Assigner
from experiments.config import load_experiments
from experiments.dashboard import build_results, dashboard_blueprint, fmt_pct, write_results

ROOT = Path(__file__).resolve().parents[2]
DAY0 = 1_793_491_200.0  # 2026-11-01 00:00 UTC, Unix seconds


def run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "stratarank.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def two_experiment_config(tmp_path) -> Path:
    """The shipped like_up experiment plus, in a second layer, one whose logging loses treatment users."""
    text = (ROOT / "conf/experiments/like_up.yaml").read_text()
    text = text.replace("strategy: conf/objectives/feed.yaml", f"strategy: {ROOT / 'conf/objectives/feed.yaml'}")
    text += textwrap.indent(textwrap.dedent("""\
          - name: llm_mix
            salt: llm-2026-11
            experiments:
              - name: llm_share_up
                range: [0.0, 1.0]
                variants:
                  control:   {weight: 0.5}
                  treatment: {weight: 0.5, overrides: {sources.llm.max_share: 0.5}}
                metrics: [clicks_per_user]
                guardrails: [reports_per_user]
        """), "  ")
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    return path


def make_logs(config_path, out: Path, n_users=4000, days=7, ctr_lift=0.15, seed=7):
    """Exposures (Parquet folder, 2 files) and events (CSV) for the config's experiments.

    like_up's treatment raises each impression's click probability by ``ctr_lift`` (relative);
    llm_share_up has no effect, but a logging bug drops 12 % of its treatment users' exposures (SRM).
    """
    rng = np.random.default_rng(seed)
    assigner = Assigner(load_experiments(config_path))
    users = [f"u{i}" for i in range(n_users)]
    t0 = DAY0 + rng.random(n_users) * days * 86_400 * 0.8
    rows = []
    treated = np.zeros(n_users, bool)
    for i, u in enumerate(users):
        for a in assigner.assign(u):
            if a.experiment == "llm_share_up" and a.variant == "treatment" and rng.random() < 0.12:
                continue
            rows.append((u, a.layer, a.experiment, a.variant, t0[i]))
            rows.append((u, a.layer, a.experiment, a.variant, t0[i] + rng.random() * 3600))  # repeat exposure
            treated[i] |= a.experiment == "like_up" and a.variant == "treatment"
    exposures = pd.DataFrame(rows, columns=["user_id", "layer", "experiment", "variant", "ts"])

    n_imp = rng.poisson(12, n_users)
    uidx = np.repeat(np.arange(n_users), n_imp)
    ts = t0[uidx] - 86_400 + rng.random(len(uidx)) * (DAY0 + days * 86_400 - t0[uidx] + 86_400)  # some pre-exposure
    p_click = np.where(treated[uidx], 0.10 * (1 + ctr_lift), 0.10)
    click = rng.random(len(uidx)) < p_click
    report = rng.random(len(uidx)) < 0.01
    parts = [pd.DataFrame({"type": "impression", "user_id": uidx, "ts": ts, "value": np.nan})]
    parts.append(pd.DataFrame({"type": "click", "user_id": uidx[click], "ts": ts[click] + 1, "value": np.nan}))
    parts.append(pd.DataFrame({"type": "watch", "user_id": uidx[click], "ts": ts[click] + 30,
                               "value": rng.exponential(30, click.sum())}))
    parts.append(pd.DataFrame({"type": "report", "user_id": uidx[report], "ts": ts[report] + 5, "value": np.nan}))
    events = pd.concat(parts, ignore_index=True)
    events["user_id"] = np.array(users)[events.user_id.to_numpy()]
    events.insert(0, "event_id", [f"e{i}" for i in range(len(events))])
    events["item_id"] = "i1"
    events["request_id"] = "r1"
    events = pd.concat([events, events.sample(200, random_state=seed)], ignore_index=True)  # retried events

    (out / "exposures").mkdir(parents=True, exist_ok=True)
    half = len(exposures) // 2
    exposures.iloc[:half].to_parquet(out / "exposures" / "part-0.parquet", index=False)
    exposures.iloc[half:].to_parquet(out / "exposures" / "part-1.parquet", index=False)
    events.to_csv(out / "events.csv", index=False)
    return exposures, events


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ab")
    config = two_experiment_config(tmp)
    exposures, events = make_logs(config, tmp)
    return tmp, config, exposures, events


def test_validate_accepts_experiment_files_next_to_objectives_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        metrics: {ctr: {type: ratio, numerator: {event: click}, denominator: {event: impression}}}
        layers:
          - name: l
            salt: s
            experiments:
              - {name: a, range: [0, 0.6], metrics: [crt], variants: {control: {weight: 0.5}, t: {weight: 0.4}}}
        """))
    out = run("validate", "conf/experiments/like_up.yaml", "conf/objectives/feed.yaml", str(bad))
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("conf/experiments/like_up.yaml: OK experiments: 1 layers, 1 experiments "
                        "(like_up 2 variants 50% of ranking_weights), holdout 0.02, 4 metrics")
    assert lines[1].startswith("conf/objectives/feed.yaml: OK strategy feed_v1")
    err = out.stderr.strip().splitlines()
    assert f"{bad}:6: layers[0].experiments[0].variants: variant weights sum to 0.9, not 1 (control 0.5, t 0.4)" in err
    assert any(e.startswith(f"{bad}:6: layers[0].experiments[0].metrics[0]: unknown metric 'crt'; did you mean 'ctr'?")
               for e in err)
    assert len(err) == 2


def test_analyze_prints_the_records_of_analyze_and_writes_the_results_folder(logs):
    tmp, config, exposures, events = logs
    out = run("experiments", "analyze", "--config", str(config), "--exposures", str(tmp / "exposures"),
              "--events", str(tmp / "events.csv"), "--out", str(tmp / "results"), "--pre-period", "1D")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    c = load_experiments(config)
    expected = analyze(exposures, pd.read_csv(tmp / "events.csv"), c.analysis_metrics(), c.analysis_experiments(),
                       pre_period=86_400.0)  # 1D in the Unix seconds of numeric ts
    assert expected[1]["p_value_cuped"] is not None
    assert [(r["experiment"], r["variant"], r["metric"]) for r in records] == [
        ("like_up", "treatment", "ctr"), ("like_up", "treatment", "clicks_per_user"),
        ("like_up", "treatment", "watch_time"), ("like_up", "treatment", "reports_per_user"),
        ("llm_share_up", "treatment", "clicks_per_user"), ("llm_share_up", "treatment", "reports_per_user")]
    for got, want in zip(records, expected):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9) if isinstance(v, float) else got[k] == v, k
    by = {(r["experiment"], r["metric"]): r for r in records}
    ctr = by["like_up", "ctr"]
    assert ctr["rel_lift"] == pytest.approx(0.15, abs=0.06) and ctr["p_value"] < 0.001
    assert by["like_up", "reports_per_user"]["guardrail"] == "pass" and not ctr["srm_alarm"]
    assert by["llm_share_up", "clicks_per_user"]["srm_alarm"] is True

    res = tmp / "results"
    assert json.loads((res / "results.json").read_text()) == records
    meta = json.loads((res / "experiments.json").read_text())
    assert [e["name"] for e in meta["experiments"]] == ["like_up", "llm_share_up"]
    like = meta["experiments"][0]
    assert like["layer"] == "ranking_weights" and like["range"] == [0.0, 0.5] and like["status"] == "running"
    assert like["users"] == {"control": ctr["control_users"], "treatment": ctr["users"]}
    series = json.loads((res / "cumulative.json").read_text())
    ctr_series = [s for s in series if s["experiment"] == "like_up" and s["metric"] == "ctr"]
    assert [s["at"] for s in ctr_series] == [f"2026-11-0{d}" for d in range(1, 8)]
    assert [s["users"] for s in ctr_series] == sorted(s["users"] for s in ctr_series)  # cumulative: grows
    assert ctr_series[-1]["rel_lift"] == pytest.approx(ctr["rel_lift"])  # the last cut holds all data


def test_analyze_table_format_and_errors(logs, tmp_path):
    tmp, config, exposures, events = logs
    out = run("experiments", "analyze", "--config", str(config), "--exposures", str(tmp / "exposures"),
              "--events", str(tmp / "events.csv"), "--format", "table")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["experiment", "variant", "metric", "role"]
    c = load_experiments(config)
    rec = next(r for r in analyze(exposures, events, c.analysis_metrics(), c.analysis_experiments())
               if r["metric"] == "ctr")
    ctr_line = next(line for line in lines if line.startswith("like_up") and " ctr " in line)
    assert fmt_pct(rec["rel_lift"]) in ctr_line and "significant" in ctr_line
    assert any("SRM ALARM" in line for line in lines if line.startswith("llm_share_up"))

    exposures.drop(columns=["variant"]).to_csv(tmp_path / "bad.csv", index=False)
    out = run("experiments", "analyze", "--config", str(config), "--exposures", str(tmp_path / "bad.csv"),
              "--events", str(tmp / "events.csv"))
    assert out.returncode == 1 and "exposures.variant: missing column 'variant'" in out.stderr
    out = run("experiments", "analyze", "--config", "conf/objectives/feed.yaml", "--exposures",
              str(tmp / "exposures"), "--events", str(tmp / "events.csv"))
    assert out.returncode == 1 and "layers: required" in out.stderr


def test_dashboard_html_and_blueprint(logs, tmp_path):
    from flask import Flask
    tmp, config, exposures, events = logs
    res = tmp_path / "res"
    bundle = build_results(load_experiments(config), exposures, events)
    write_results(res, bundle)
    rec = next(r for r in bundle["records"] if r["metric"] == "ctr")

    out = run("dashboard", "--results", str(res), "--html", str(tmp_path / "dash.html"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "dash.html").read_text()
    assert fmt_pct(rec["rel_lift"]) in page and "id=srm-banner" in page
    assert page.count("data:image/png;base64,") == 4  # a forest and a cumulative plot per experiment
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched from elsewhere

    app = Flask(__name__)
    app.register_blueprint(dashboard_blueprint(res))
    client = app.test_client()
    index = client.get("/dashboard/")
    assert index.status_code == 200
    html = index.get_data(as_text=True)
    assert "Sample ratio mismatch: llm_share_up" in html and "href='experiment/like_up'" in html
    detail = client.get("/dashboard/experiment/like_up")
    assert detail.status_code == 200
    body = detail.get_data(as_text=True)
    assert f"data-metric='ctr' data-variant='treatment'>{fmt_pct(rec['rel_lift'])}</td>" in body
    assert "srm-banner" not in body and "<img class=plot" in body
    assert client.get("/dashboard/experiment/nope").status_code == 404
    assert client.get("/dashboard/results.json").get_json() == json.loads((res / "results.json").read_text())
    empty = Flask(__name__)
    empty.register_blueprint(dashboard_blueprint(tmp_path / "missing"))
    assert empty.test_client().get("/dashboard/").status_code == 404
    out = run("dashboard", "--results", str(tmp_path / "missing"), "--html", str(tmp_path / "x.html"))
    assert out.returncode == 1 and "no results.json" in out.stderr


def test_validate_finds_the_strategy_from_another_directory(tmp_path):
    out = run("validate", str(ROOT / "conf/experiments/like_up.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{ROOT / 'conf/experiments/like_up.yaml'}: OK experiments: 1 layers")


def test_dashboard_command_serves_http(logs, tmp_path):
    import urllib.request
    tmp, config, exposures, events = logs
    write_results(tmp_path / "res", build_results(load_experiments(config), exposures, events, cumulative=False))
    proc = subprocess.Popen([sys.executable, "-m", "stratarank.cli", "dashboard", "--results", str(tmp_path / "res"),
                             "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/"), line
        with urllib.request.urlopen(url, timeout=30) as resp:
            page = resp.read().decode()
        assert resp.status == 200 and "like_up" in page and "srm-banner" in page
        with urllib.request.urlopen(url.rsplit("/dashboard/", 1)[0] + "/", timeout=30) as resp:  # / redirects
            assert resp.geturl() == url
    finally:
        proc.terminate()
        proc.wait(10)


def test_cumulative_series_with_datetime_timestamps(logs):
    tmp, config, exposures, events = logs
    c = load_experiments(config)
    numeric = build_results(c, exposures, events)["cumulative"]
    as_dt = build_results(c, exposures.assign(ts=pd.to_datetime(exposures.ts, unit="s", utc=True)),
                          events.assign(ts=pd.to_datetime(events.ts, unit="s")))["cumulative"]
    assert [(s["experiment"], s["metric"], s["at"], s["users"]) for s in as_dt] == \
        [(s["experiment"], s["metric"], s["at"], s["users"]) for s in numeric]


def test_dashboard_shows_the_ramp_controller_timeline(logs, tmp_path):
    """The controller's decisions (real CLI runs on real files) appear as a timeline with their evidence."""
    tmp, config, exposures, events = logs
    res = tmp_path / "res"
    write_results(res, build_results(load_experiments(config), exposures, events, cumulative=False))
    ramp = tmp_path / "ramp.yaml"
    ramp.write_text(f"experiments: {config}\nexperiment: like_up\nstate: {tmp_path / 'state.json'}\n"
                    f"log: {res / 'like_up.decisions.jsonl'}\n"
                    "steps: [{share: 0.3, min_minutes: 600, min_users: 100}, {share: 0.5}]\n"
                    # like_up's treatment raises ctr by 15 %: declared harmful here, so the ramp must stop
                    "guardrails: [{metric: ctr, margin: 0.02, harmful: increase}]\n")
    control = ["experiments", "control", "--config", str(ramp), "--exposures", str(tmp / "exposures"),
               "--events", str(tmp / "events.csv"), "--once"]
    for now, action in ((DAY0 + 3600, "hold"), (DAY0 + 8 * 86_400, "stop")):  # an hour in; after the week
        out = run(*control, "--now", str(now))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["action"] == action
    log = res / "like_up.decisions.jsonl"
    log.write_text(log.read_text() + "{not json\n")
    extra = tmp_path / "other.decisions.jsonl"
    extra.write_text(json.dumps({"time": DAY0, "experiment": "like_up", "action": "hold", "reasons": ["started"],
                                 "range_before": [0, 0.3], "range_after": [0, 0.3], "status": "running",
                                 "step_before": 0, "step_after": 0, "evidence": []}) + "\n")

    out = run("dashboard", "--results", str(res), "--decisions", str(extra), "--html", str(tmp_path / "d.html"))
    assert out.returncode == 0, out.stderr
    assert "like_up.decisions.jsonl:3: not a decision record" in out.stderr
    page = (tmp_path / "d.html").read_text()
    assert "Guarded ramp: decisions over time" in page and "alt='ramp timeline'" in page
    rows = page.split("<table class=timeline>")[1].split("</table>")[0]
    assert rows.count("<tr class='decision") == 3
    assert rows.index("class='decision stop'") < rows.index("class='decision hold'")  # newest first
    assert "30% → 0%" in rows and "ctr (treatment) +" in rows and "vs margin 2.00%: harm" in rows
    assert "0% <span class='pill stop'>ramp: stop</span>" in page  # the list shows the ramp's traffic now
    assert "Decision log lines skipped" in page
    missing = run("dashboard", "--results", str(res), "--decisions", str(tmp_path / "nope.jsonl"), "--html", "x")
    assert missing.returncode == 1 and "no such file" in missing.stderr
