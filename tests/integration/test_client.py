"""online.client.Client against a real HTTP server running the scorer."""
import socket
import threading
import time

import pytest
from werkzeug.serving import make_server

from online.app import create_app
from online.client import ApiError, Client
from online.config import ServiceConfig
from online.nearline import BusConfig, NearlineConfig


def candidates(n=12):
    return [{"item_id": f"i{k}", "source": "llm" if k % 4 == 0 else "retrieval", "topic": f"t{k % 3}",
             **({"generator": {"model": "g", "prior_score": 0.5}} if k % 4 == 0 else {})} for k in range(n)]


def serve(app):
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def bus_config(tmp_path):
    return NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}"))


def test_rank_events_and_errors(bus_config):
    srv = serve(create_app(ServiceConfig(nearline=bus_config)))
    try:
        with Client(f"http://127.0.0.1:{srv.server_port}") as scorer:
            slate = scorer.rank("u1", candidates(), slate_size=5, request_id="r1")
            assert slate["request_id"] == "r1" and len(slate["items"]) == 5
            assert {i["item_id"] for i in slate["items"]} <= {c["item_id"] for c in candidates()}
            events = [{"event_id": f"e{k}", "ts": 1.0 + k, "type": "click", "user_id": "u1", "item_id": f"i{k}"}
                      for k in range(3)]
            assert scorer.events(events) == 3
            assert scorer.events([]) == 0
            with pytest.raises(ApiError) as bad:
                scorer.rank("u1", [{"item_id": 7, "source": "human"}])
            assert bad.value.status == 400 and bad.value.path.startswith("candidates[0].item_id")
            ready = scorer.ready()   # no model configured: a 503 answer, returned at once (not retried)
            assert ready["ready"] is False
    finally:
        srv.shutdown()


def test_a_429_is_retried_after_retry_after(bus_config):
    srv = serve(create_app(ServiceConfig(nearline=bus_config, rate_per_s=2.0, rate_burst=1.0)))
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        with Client(url, retries=0) as once:
            once.rank("u1", candidates())
            with pytest.raises(ApiError) as limited:     # the bucket is empty: no retry, the 429 is raised
                once.rank("u1", candidates())
            assert limited.value.status == 429 and limited.value.code == "rate_limited"
        with Client(url, retries=2, max_wait_s=2.0) as patient:
            t0 = time.monotonic()
            assert len(patient.rank("u1", candidates())["items"]) > 0   # waited Retry-After (1 s), then served
            assert time.monotonic() - t0 >= 0.9
    finally:
        srv.shutdown()


def test_connection_failures_are_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # nothing listens once the socket is closed
    client = Client(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.05, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        client.rank("u1", candidates())
    assert time.monotonic() - t0 >= 0.05 + 0.1   # two backoffs before the last attempt


@pytest.mark.parametrize("kwargs", [{"base_url": "ftp://x"}, {"base_url": "127.0.0.1:8000"}, {"timeout_s": 0},
                                    {"retries": -1}])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        Client(**kwargs)
