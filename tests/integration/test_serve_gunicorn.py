"""`stratarank serve` for real: gunicorn with 2 workers on loopback, reload under load."""
import json
import threading
import time

import pytest

from scorer_process import TOKEN, call, start_scorer


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
    proc, port = start_scorer(config, root)
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


def test_both_workers_follow_the_ramp_controller_without_restart(tmp_path, root):
    """The controller's state file moves traffic in every worker; nobody already assigned moves."""
    from experiments.assignment import Assigner
    from experiments.config import load_experiments

    state = tmp_path / "like_up.state.json"
    ramp = tmp_path / "ramp.yaml"
    ramp.write_text(f"experiments: {root / 'conf/experiments/like_up.yaml'}\nexperiment: like_up\n"
                    f"state: {state}\nsteps: [{{share: 0.1}}, {{share: 0.5}}]\n"
                    "guardrails: [{metric: reports_per_user, margin: 0.05}]\n")
    config = tmp_path / "service.yaml"
    config.write_text(f"bus: {{url: 'embedded://{tmp_path / 'bus'}'}}\nmodel: {{registry: '{tmp_path / 'registry'}'}}\n"
                      f"experiments: {{file: conf/experiments/like_up.yaml, ramps: ['{ramp}'], poll_s: 0.2}}\n")
    proc, port = start_scorer(config, root)
    try:
        body = json.loads((root / "conf/examples/request.json").read_text())
        for cand in body["candidates"]:
            cand.pop("predictions")
        declared = Assigner(load_experiments(root / "conf/experiments/like_up.yaml"))
        variant = {f"u{k}": a.variant for k in range(200) for a in declared.assign(f"u{k}")
                   if a.experiment == "like_up"}

        def served(user):  # asked 6 times: both workers answer
            got = {tuple(e["variant"] for e in call(port, "POST", "/v1/rank", dict(body, user_id=user))[1]["experiments"])
                   for _ in range(6)}
            assert len(got) == 1, got
            return got.pop()

        in_step1 = [u for u in variant if served(u)]
        assert in_step1 and len(in_step1) < 0.3 * len(variant)
        assert all(served(u) == (variant[u],) for u in in_step1)
        state.write_text(json.dumps({"experiment": "like_up", "status": "running", "step": 1, "range": [0.0, 0.5],
                                     "started_at": 0.0, "step_started_at": 0.0}))
        time.sleep(0.5)
        assert all(served(u) == (variant[u],) for u in variant)  # step 2 is the declared range
        state.write_text(json.dumps({"experiment": "like_up", "status": "stopped", "step": 1, "range": [0.0, 0.5],
                                     "started_at": 0.0, "step_started_at": 0.0}))
        time.sleep(0.5)
        assert all(served(u) == () for u in in_step1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
