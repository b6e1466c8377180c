"""`stratarank serve` as a real process for the integration tests: start it, call it."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import pytest

from online.broker import free_port

TOKEN = "test-admin-token"


def call(port, method, path, body=None, headers=None):
    """(status, parsed JSON body or raw bytes) of one request on a new connection."""
    status, _, payload = call_full(port, method, path, body, headers)
    return status, payload


def call_full(port, method, path, body=None, headers=None):
    """(status, response headers, parsed JSON body or raw bytes) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    is_json = raw and resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, dict(resp.getheaders()), (json.loads(raw) if is_json else raw)


def write_config(tmp_path, root, extra: str = ""):
    """A service YAML in ``tmp_path``: the shipped strategy, an embedded bus and a memory store there,
    plus ``extra`` YAML lines."""
    config = tmp_path / "service.yaml"
    config.write_text(
        f"strategies: {{files: ['{root / 'conf/objectives/feed.yaml'}']}}\n"
        f"bus: {{url: 'embedded://{tmp_path / 'bus'}'}}\n"
        "store: {url: 'memory://'}\n"
        f"model: {{registry: '{tmp_path / 'registry'}'}}\n" + extra)
    return config


def start_scorer(config, root, workers: int = 2, log_path=None, env=None):
    """`stratarank serve` with ``workers`` gunicorn workers on a free port; waits until /readyz has
    answered from each of them.
    Its output goes to ``log_path`` when given (read it after), else to a pipe."""
    port = free_port()
    env = dict(os.environ, STRATARANK_ADMIN_TOKEN=TOKEN, **(env or {}))
    out = open(log_path, "w") if log_path is not None else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config),
                             "--port", str(port), "--workers", str(workers)], env=env, cwd=root,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    pids = set()
    while time.time() < deadline and proc.poll() is None:
        try:   # every worker up (one that is still importing torch would leave the others all the traffic)
            body = call(port, "GET", "/readyz")[1]
            pids.add(body["worker"] if isinstance(body, dict) else None)
            if len(pids - {None}) >= workers:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    text = open(log_path).read() if log_path is not None else proc.stdout.read()
    pytest.fail("scorer did not start: " + text)


def stop_scorer(proc, timeout_s: float = 30) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
