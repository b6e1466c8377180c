"""`stratarank demo` end to end at a small scale: simulate, train, serve, closed loop, analysis."""
import subprocess
import sys


def small_demo(out, root):
    proc = subprocess.run(
        [sys.executable, "-m", "stratarank.cli", "demo", "--out", str(out), "--impressions", "60000", "--epochs", "2",
         "--users", "40", "--requests", "3", "--candidates", "40", "--concurrency", "2"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_runs_the_closed_loop_and_writes_the_dashboard(tmp_path, root):
    out = tmp_path / "demo"
    text = small_demo(out, root)
    assert "Closed-loop A/B test multi_objective: multi_objective vs click_only" in text
    for metric in ("likes_per_user", "clicks_per_user", "watch_time", "ctr", "reports_per_user"):
        assert metric in text
    assert "SRM p =" in text and "LLM-generated share" in text and "latency /v1/rank" in text
    assert "errors 0" in text and "served: 0 items" not in text
    assert "no exposures" not in text
    assert (out / "dashboard.html").stat().st_size > 10_000
    assert (out / "results" / "results.json").exists() and (out / "report.txt").exists()
    assert (out / "registry" / "feed_mmoe" / "current").exists() and (out / "registry" / "feed_lgbm" / "current").exists()
    html = (out / "dashboard.html").read_text()
    assert "multi_objective" in html and "data:image/png;base64," in html

    # the same seed serves the same slates and gives the same analysis, run after run (the loop
    # advances the world in user order and waits for every worker's near-line thread each round)
    again = small_demo(tmp_path / "again", root)
    for prefix in ("served slates digest:", "inputs of the slates: world logs digest"):
        digest = [line for line in text.splitlines() if line.startswith(prefix)]
        assert digest and digest == [line for line in again.splitlines() if line.startswith(prefix)]
    assert (out / "results" / "results.json").read_text() == (tmp_path / "again" / "results" / "results.json").read_text()


def test_the_streaming_scenario_serves_versions_trained_on_the_stream(tmp_path, root):
    """`stratarank demo --scenario streaming` at a tiny scale: the static and the streaming arm both
    serve, the trainer publishes versions that the scorer follows, the report has the A/B and freshness."""
    out = tmp_path / "stream"
    proc = subprocess.run(
        [sys.executable, "-m", "stratarank.cli", "demo", "--scenario", "streaming", "--out", str(out),
         "--impressions", "120000", "--epochs", "2", "--users", "80", "--hours", "3", "--candidates", "30",
         "--concurrency", "2", "--publish-interval", "2"],
        cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "Closed-loop A/B test streaming: streaming vs static" in text and "errors 0" in text
    assert "likes_per_user" in text and "freshness (a feedback event" in text
    served = [line for line in text.splitlines() if line.startswith("streaming model:")]
    assert served and served[0].startswith("streaming model: 2 of 2 hours")
    versions = sorted((out / "registry" / "feed_stream").glob("v*"))
    assert len(versions) >= 2 and (out / "joined" / "_checkpoint.json").exists()
    assert (out / "dashboard.html").stat().st_size > 10_000
