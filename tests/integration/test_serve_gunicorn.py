"""`stratarank serve` for real: gunicorn with 2 workers on loopback, reload under load."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, (json.loads(raw) if raw and resp.getheader("Content-Type", "").startswith("application/json") else raw)


@pytest.fixture
def served(tmp_path, root):
    strategy = tmp_path / "feed.yaml"
    strategy.write_text((root / "conf/objectives/feed.yaml").read_text())
    config = tmp_path / "service.yaml"
    config.write_text(
        f"strategies: {{files: ['{strategy}']}}\n"
        f"risk: '{root / 'conf/risk.yaml'}'\n"
        f"bus: {{url: 'embedded://{tmp_path / 'bus'}'}}\n"
        "store: {url: 'memory://'}\n"
        f"model: {{registry: '{tmp_path / 'registry'}'}}\n"
    )
    port = free_port()
    env = dict(os.environ, STRATARANK_ADMIN_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config),
                             "--port", str(port), "--workers", "2"], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if call(port, "GET", "/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("scorer did not start: " + proc.stdout.read())
    yield port, strategy, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


def test_ranks_logs_impressions_and_reloads_under_load_without_failures(served, root):
    port, strategy, tmp_path = served
    body = json.loads((root / "conf/examples/request.json").read_text())
    for cand in body["candidates"]:
        cand.pop("predictions")
    status, out = call(port, "POST", "/v1/rank", body)
    assert status == 200 and out["strategy"] == "feed_v1" and out["degraded"] is True

    failures, done, seen = [], threading.Event(), set()

    def load():
        while not done.is_set():
            try:
                st, resp = call(port, "POST", "/v1/rank", body)
                if st != 200:
                    failures.append(st)
                else:
                    seen.add(resp["strategy"])
            except OSError as exc:  # a dropped connection is a failed request too
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert call(port, "POST", "/admin/reload")[0] == 401
    strategy.write_text(strategy.read_text().replace("strategy: feed_v1", "strategy: feed_v2"))
    status, out = call(port, "POST", "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and out["strategies"] == ["feed_v2"]
    time.sleep(3.0)
    done.set()
    for t in threads:
        t.join()
    assert failures == []
    assert "feed_v2" in seen
    # after the reload every worker serves the new strategy
    assert {call(port, "POST", "/v1/rank", body)[1]["strategy"] for _ in range(10)} == {"feed_v2"}
    metrics = call(port, "GET", "/metrics")[1].decode()
    assert "stratarank_requests_total" in metrics

    # the served slates reached the bus as impressions with the features the model saw
    from online.bus import open_bus

    bus = open_bus(f"embedded://{tmp_path / 'bus'}")
    consumer = bus.consumer("test-reader", ["impressions"])
    records = []
    for _ in range(50):
        batch = consumer.poll(10_000, 0.2)
        if not batch:
            break
        records += batch
    bus.close()
    assert records, "no impressions logged"
    first = records[0].value
    assert first["request_id"] == "demo-req-1" and "features" in first and "topic" in first["features"]
