"""The scorer keeps answering through faults: broker down at start, corrupt or failing models."""
import json
import time

import numpy as np
import pandas as pd

from online.app import create_app
from online.bus import open_bus
from online.config import ServiceConfig
from online.nearline import BusConfig, NearlineConfig, StoreConfig


def rank_body(n=30):
    cands = [{"item_id": f"i{k}", "source": "llm" if k % 5 == 0 else "retrieval", "topic": f"t{k % 4}",
              "creator_id": f"c{k % 7}", "features": {"duration": 10.0 + k, "text_len": 40}} for k in range(n)]
    for c in cands[::5]:
        c["generator"] = {"model": "g", "prior_score": 0.5}
    return {"user_id": "u1", "candidates": cands}


def test_broker_down_at_start_requests_succeed_and_events_arrive_later(tmp_path, kafka_brokers):
    port = kafka_brokers.free_port()
    bus = BusConfig(url=f"kafka://127.0.0.1:{port}", spool_dir=str(tmp_path / "spool"))
    app = create_app(ServiceConfig(nearline=NearlineConfig(bus=bus, store=StoreConfig(url="redis://127.0.0.1:1/0"))))
    client = app.test_client()
    t0 = time.monotonic()
    for k in range(20):
        assert client.post("/v1/rank", json=rank_body()).status_code == 200
        events = [{"event_id": f"e{k}-{j}", "ts": 1.0 + k, "type": "click", "user_id": "u1", "item_id": f"i{j}"}
                  for j in range(5)]
        assert client.post("/v1/events", json={"events": events}).status_code == 202
    assert time.monotonic() - t0 < 30  # nothing blocked on the missing broker
    broker = kafka_brokers.start(port)
    try:
        scorer = app.extensions["stratarank"]
        assert scorer.bus.flush(60)
        reader = open_bus(f"kafka://127.0.0.1:{port}", spool_dir=str(tmp_path / "reader-spool"))
        consumer = reader.consumer("check", ["events", "impressions"])
        got = {"events": [], "impressions": []}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(got["events"]) < 100 or len(got["impressions"]) < 400):
            for rec in consumer.poll(5000, 0.5):
                got[rec.topic].append(rec.value)
        reader.close()
        assert sorted(e["event_id"] for e in got["events"]) == sorted(f"e{k}-{j}" for k in range(20) for j in range(5))
        assert len(got["impressions"]) == 20 * 20  # every served slate was logged once
        scorer.close()
    finally:
        kafka_brokers.stop(broker)


def _lightgbm(registry):
    from ranking.artifacts import register_lgbm
    from ranking.lgbm import LGBMMultiObjective

    rng = np.random.default_rng(0)
    n = 2000
    frame = pd.DataFrame({"prior_score": rng.random(n), "duration": rng.random(n) * 60, "text_len": rng.random(n) * 80,
                          "is_llm": rng.integers(0, 2, n).astype(float)})
    for name in ("click", "like", "share"):
        frame[name] = (rng.random(n) < 0.1 + 0.3 * frame["prior_score"]).astype(float)
    frame["report"] = (rng.random(n) < 0.005).astype(float)  # under the feed strategy's 0.05 guardrail
    frame["watch_time"] = rng.random(n) * 30
    types = {"click": "binary", "like": "binary", "share": "binary", "watch_time": "regression", "report": "binary"}
    model = LGBMMultiObjective(types, num_boost_round=20).fit(frame, ["prior_score", "duration", "text_len", "is_llm"])
    return register_lgbm(registry, "feed_lgbm", model, {"test": {}})


def test_corrupt_primary_model_falls_back_to_lightgbm_then_prior(tmp_path):
    registry = tmp_path / "registry"
    _lightgbm(registry)
    broken = registry / "feed_mmoe" / "v1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text(json.dumps({"name": "feed_mmoe", "version": "v1", "kind": "torchrec"}))
    (broken / "weights.pt").write_bytes(b"not a checkpoint")
    (registry / "feed_mmoe" / "current").write_text("v1\n")
    near = NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}"))
    config = ServiceConfig(nearline=near, registry=str(registry), model_name="feed_mmoe", fallback_name="feed_lgbm")
    client = create_app(config).test_client()
    ready = client.get("/readyz").get_json()
    assert ready["ready"] is True and ready["model_version"] == "feed_lgbm@v1"
    assert any(e.startswith("feed_mmoe:") for e in ready["load_errors"])
    body = client.post("/v1/rank", json=rank_body()).get_json()
    assert body["model_version"] == "feed_lgbm@v1" and body["degraded"] is True and len(body["items"]) == 20
    metrics = client.get("/metrics").data.decode()
    assert 'stratarank_degraded_responses_total{reason="no_model"}' not in metrics

    # a model that fails at request time: the chain moves on to the prior order and says so
    scorer = client.application.extensions["stratarank"]
    model = scorer.serving.chain.models[0]

    def boom(rows):
        raise RuntimeError("model crashed")

    model.predict = boom
    body = client.post("/v1/rank", json=rank_body()).get_json()
    assert body["model_version"] == "prior" and body["degraded"] is True and len(body["items"]) == 20
    # the first cause is the one counted: the primary never loaded
    assert 'stratarank_degraded_responses_total{reason="primary_unavailable"} 2' in client.get("/metrics").data.decode()
