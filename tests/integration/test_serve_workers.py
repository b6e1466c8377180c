"""What must hold across gunicorn workers of one `stratarank serve`: one /metrics scrape sees
every worker, a Redis-backed rate limit is one limit for all of them, and JSON log lines carry
the request id and the worker's pid. Real processes, real Redis, real HTTP."""
import json
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from scorer_process import call, call_full, start_scorer, stop_scorer, write_config


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rank_body(root) -> dict:
    body = json.loads((root / "conf/examples/request.json").read_text())
    for cand in body["candidates"]:
        cand.pop("predictions")
    return body


def test_one_scrape_counts_the_requests_of_every_worker(tmp_path, root):
    proc, port = start_scorer(write_config(tmp_path, root), root)
    try:
        body, sent, workers = rank_body(root), 0, set()
        for i in range(60):   # a new connection each time: the workers take turns accepting
            assert call(port, "POST", "/v1/rank", body)[0] == 200
            sent += 1
            if i % 3 == 0:
                ready = call(port, "GET", "/readyz")[1]
                workers.add(ready["worker"])
                assert ready["gc_frozen"] > 10_000   # serve froze the worker's heap once its app was built
        assert len(workers) == 2, "the requests did not reach both workers"
        # each scrape reaches one worker, and every one of them sees the whole server
        for _ in range(4):
            got = samples(call(port, "GET", "/metrics")[1].decode())
            assert got[("stratarank_requests_total", frozenset({("endpoint", "/v1/rank"), ("status", "200")}))] == sent
            assert got[("stratarank_request_seconds_count", frozenset({("endpoint", "/v1/rank")}))] == sent
            assert got[("stratarank_candidates_scored_total", frozenset())] == sent * len(body["candidates"])
            assert got[("stratarank_model_info", frozenset({("version", "prior")}))] == 1
            assert ("stratarank_nearline_lag_seconds", frozenset()) in got
    finally:
        stop_scorer(proc)


def hammer(port, seconds: float, threads: int = 4, headers=None) -> tuple[int, int]:
    """(accepted, refused with 429) of /v1/events calls made as fast as ``threads`` can for ``seconds``."""
    counts, lock, stop = {202: 0, 429: 0}, threading.Lock(), time.monotonic() + seconds
    event = {"events": [{"event_id": "e", "user_id": "u1", "item_id": "i1", "type": "click", "ts": 1.7e9}]}

    def run():
        while time.monotonic() < stop:
            status = call(port, "POST", "/v1/events", event, headers)[0]
            with lock:
                counts[status] = counts.get(status, 0) + 1

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert set(counts) == {202, 429}, counts
    return counts[202], counts[429]


RATE, SECONDS = 20, 3.0


def test_a_redis_rate_limit_is_one_limit_for_all_workers(tmp_path, root, redis_server):
    limit = f"rate_limit: {{per_second: {RATE}, burst: {RATE}, storage: '{redis_server}'}}\n"
    proc, port = start_scorer(write_config(tmp_path, root, limit), root)
    try:
        accepted, refused = hammer(port, SECONDS)
        expected = RATE + RATE * SECONDS   # the full bucket, then the refill
        assert 0.8 * expected <= accepted <= 1.15 * expected, (accepted, expected)
        assert refused > accepted
        got = samples(call(port, "GET", "/metrics")[1].decode())
        assert got[("stratarank_rate_limited_total", frozenset())] == refused
        assert got[("stratarank_rate_limit_storage_errors_total", frozenset())] == 0
    finally:
        stop_scorer(proc)


def test_memory_buckets_are_per_worker_as_the_warning_says(tmp_path, root):
    """The embedded default is per process: the same client gets about twice the rate from 2 workers
    (which is what the Redis test above must not show), and serve says so at start."""
    limit = f"rate_limit: {{per_second: {RATE}, burst: {RATE}}}\n"
    log = tmp_path / "serve.log"
    proc, port = start_scorer(write_config(tmp_path, root, limit), root, log_path=log)
    try:
        accepted, _ = hammer(port, SECONDS)
        assert accepted >= 1.5 * (RATE + RATE * SECONDS), accepted
        assert "each of the 2 workers keeps its own buckets" in log.read_text()
    finally:
        stop_scorer(proc)


def test_json_log_lines_carry_the_request_id_and_the_worker_pid(tmp_path, root):
    log = tmp_path / "serve.log"
    config = write_config(tmp_path, root, "logging: {format: json, access: true}\n")
    proc, port = start_scorer(config, root, log_path=log)
    try:
        status, headers, ready = call_full(port, "GET", "/readyz", headers={"X-Request-Id": "trace-42"})
        assert headers["X-Request-Id"] == "trace-42"
        _, headers, _ = call_full(port, "POST", "/v1/rank", {"user_id": 7}, headers={"X-Request-Id": "bad id!"})
        minted = headers["X-Request-Id"]   # an id with a space is not echoed into the logs: a new one is
        assert minted != "bad id!" and len(minted) == 32
    finally:
        stop_scorer(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]   # every line is JSON
    access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "stratarank.access"}
    assert access["trace-42"]["pid"] == ready["worker"] and access["trace-42"]["status"] == status
    assert access[minted]["status"] == 400 and access[minted]["path"] == "/v1/rank"
    assert any(ln["logger"] == "stratarank.serve" and "2 workers" in ln["message"] for ln in lines)



def test_redis_buckets_are_shared_and_fall_back_to_local_ones_when_redis_is_down(redis_server):
    import uuid

    from online.broker import free_port
    from online.ratelimit import RedisTokenBuckets

    prefix = f"test:{uuid.uuid4().hex}:"
    a = RedisTokenBuckets(redis_server, rate=1.0, burst=3, prefix=prefix)
    b = RedisTokenBuckets(redis_server, rate=1.0, burst=3, prefix=prefix)   # another worker or replica
    assert [a.take("k"), b.take("k"), a.take("k")] == [0.0, 0.0, 0.0]
    assert 0.9 <= b.take("k") <= 1.0   # the shared bucket is empty: about 1/rate to wait
    assert a.take("other") == 0.0
    errors = []
    down = RedisTokenBuckets(f"redis://127.0.0.1:{free_port()}/0", rate=1.0, burst=2, on_error=lambda: errors.append(1))
    assert [down.take("k") == 0.0 for _ in range(3)] == [True, True, False]   # limited by its own buckets
    assert len(errors) == 3
