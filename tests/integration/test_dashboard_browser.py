"""The A/B dashboard in a real browser: headless Chromium against a real local HTTP server.

Needs Debian's ``chromium`` package (``/usr/bin/chromium``); skipped with that reason otherwise.
The screenshot is kept as ``dashboard.png`` under pytest's temporary folder (path printed with -s)
and, when ``STRATARANK_SCREENSHOT_DIR`` is set, copied there.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import threading
from html import unescape
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="headless Chromium not installed: apt-get install -y chromium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def _sibling(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def chromium(profile: Path, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Results of the two-experiment world served by werkzeug on a free loopback port."""
    from werkzeug.serving import make_server

    from experiments.config import load_experiments
    from experiments.dashboard import build_results, create_app, write_results

    cli = _sibling("test_experiments_cli")
    tmp = tmp_path_factory.mktemp("browser")
    config = cli.two_experiment_config(tmp)
    exposures, events = cli.make_logs(config, tmp, n_users=3000)
    bundle = build_results(load_experiments(config), exposures, events)
    write_results(tmp / "results", bundle)
    srv = make_server("127.0.0.1", 0, create_app(tmp / "results"), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", bundle, tmp
    finally:
        srv.shutdown()
        thread.join(10)


def text_of(dom: str, pattern: str) -> str:
    m = re.search(pattern, dom, re.S)
    assert m, pattern
    return unescape(re.sub(r"<[^>]+>", "", m.group(1))).strip()


def test_index_lists_experiments_with_status_and_srm_banner(server, tmp_path):
    url, bundle, _ = server
    out = chromium(tmp_path / "profile", "--dump-dom", f"{url}/dashboard/")
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    banner = text_of(dom, r'<div class="banner" id="srm-banner"[^>]*>(.*?)</div>')
    srm = next(e for e in bundle["experiments"] if e["name"] == "llm_share_up")
    assert banner.startswith("Sample ratio mismatch: llm_share_up (p ")
    assert f"treatment {srm['users']['treatment']:,}" in banner and "like_up" not in banner
    row = text_of(dom, r'<tr id="row-like_up">(.*?)</tr>')
    like = next(e for e in bundle["experiments"] if e["name"] == "like_up")
    assert "ranking_weights" in row and "running" in row and "50%" in row
    assert f"control {like['users']['control']:,}" in row and "goal metric(s) better" in row
    assert "SRM p" in text_of(dom, r'<tr id="row-llm_share_up">(.*?)</tr>')


def test_experiment_page_shows_the_numbers_of_analyze_and_renders_plots(server, tmp_path):
    from matplotlib import image

    from experiments.dashboard import fmt_p, fmt_pct

    url, bundle, tmp = server
    page = f"{url}/dashboard/experiment/like_up"
    out = chromium(tmp_path / "profile", "--dump-dom", page)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    for r in (r for r in bundle["records"] if r["experiment"] == "like_up"):
        key = f'data-metric="{r["metric"]}" data-variant="{r["variant"]}"'
        row = text_of(dom, rf"<tr {key}>(.*?)</tr>")
        lift = text_of(dom, rf'<td class="lift (?:win|loss|flat|none)" {key}>(.*?)</td>')
        assert lift == f"{r['rel_lift'] * 100:+.2f}%" == fmt_pct(r["rel_lift"])  # the number analyze computed
        assert f"[{fmt_pct(r['rel_ci_low'])}, {fmt_pct(r['rel_ci_high'])}]" in row
        assert fmt_p(r["p_value"]) in row
    ctr = next(r for r in bundle["records"] if r["experiment"] == "like_up" and r["metric"] == "ctr")
    assert re.search(r'<td class="lift win" data-metric="ctr"', dom)  # significant and positive: green
    assert ctr["rel_lift"] > 0 and ctr["p_value_adjusted"] < 0.05
    guard = text_of(dom, r'<ul class="guardrails">(.*?)</ul>')
    assert guard.startswith("PASS reports_per_user (treatment)")
    assert len(re.findall(r'<img class="plot"[^>]+src="data:image/png;base64,', dom)) == 2

    shot = tmp_path / "dashboard.png"
    out = chromium(tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2000", page)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert float(np.var(pixels[..., :3])) > 0.001  # not blank
    # the red-free, green lift cell and the dark header are really painted
    assert (pixels[:40, :, :3].mean() < 0.3) and (pixels[:, :, 1] > pixels[:, :, 0] + 0.2).any()
    print(f"dashboard screenshot: {shot}")
    keep = os.environ.get("STRATARANK_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "dashboard.png")
