"""The scorer's HTTP contract through Flask's test client: shapes, errors, auth, limits, reload."""
import json

import pytest

from online.app import create_app
from online.config import ServiceConfig, service_config_from_dict
from online.nearline import BusConfig, NearlineConfig
from strategy import ValidationError


@pytest.fixture
def request_body(root):
    body = json.loads((root / "conf/examples/request.json").read_text())
    for cand in body["candidates"]:
        cand.pop("predictions")
    return body


@pytest.fixture(autouse=True)
def bus_dir(tmp_path, monkeypatch):
    """Every app of this module logs to a real embedded bus in its own temp folder."""
    monkeypatch.setitem(BUS, "url", f"embedded://{tmp_path / 'bus'}")
    return tmp_path / "bus"


BUS = {"url": None}


def make_app(**kw):
    kw.setdefault("nearline", NearlineConfig(bus=BusConfig(url=BUS["url"])))
    return create_app(ServiceConfig(**kw))


def test_rank_without_a_model_serves_the_degraded_order(request_body):
    client = make_app(risk_file="conf/risk.yaml").test_client()
    r = client.post("/v1/rank", json=request_body)
    assert r.status_code == 200
    body = r.get_json()
    assert body["degraded"] is True and body["model_version"] == "prior"
    assert body["strategy"] == "feed_v1" and body["request_id"] == "demo-req-1" and body["experiments"] == []
    assert len(body["items"]) == request_body["slate_size"]
    assert sum(i["source"] == "llm" for i in body["items"]) <= 3
    assert set(body["items"][0]["predictions"]) == {"click", "like", "share", "watch_time", "report"}
    reasons = {d["reason"] for d in body["dropped"]}
    assert "duplicate" in reasons
    metrics = client.get("/metrics").data.decode()
    assert 'stratarank_degraded_responses_total{reason="no_model"} 1' in metrics
    assert f"stratarank_candidates_scored_total {len(request_body['candidates'])}" in metrics
    assert client.get("/readyz").status_code == 503


def test_risk_rules_drop_with_the_rule_named(request_body):
    request_body["candidates"][0]["creator_id"] = "c_spam_1"
    request_body["candidates"][3]["text"] = "This MIRACLE cure works"
    request_body["candidates"][7]["text"] = "call 555-123-4567 now"
    for i in range(8, 14):
        request_body["candidates"][i]["creator_id"] = "prolific"
    body = make_app(risk_file="conf/risk.yaml").test_client().post("/v1/rank", json=request_body).get_json()
    dropped = {d["item_id"]: d["reason"] for d in body["dropped"]}
    cands = request_body["candidates"]
    assert dropped[cands[0]["item_id"]] == "risk:blocked_creator"
    assert dropped[cands[3]["item_id"]] == "risk:blocked_term"
    assert dropped[cands[7]["item_id"]].startswith("risk:blocked_pattern(")
    prolific = [cands[i]["item_id"] for i in range(8, 14)]
    assert sum(1 for i in prolific if dropped.get(i) == "risk:max_per_creator") == 3
    assert sum(1 for i in body["items"] if i["item_id"] in prolific) <= 3
    shown = {i["item_id"] for i in body["items"]}
    assert not shown & {cands[0]["item_id"], cands[3]["item_id"], cands[7]["item_id"]}


@pytest.mark.parametrize(
    "payload,status,code,path",
    [
        ("{not json", 400, "invalid_json", ""),
        ({"candidates": []}, 400, "required", "user_id"),
        ({"user_id": "u", "candidates": [{"item_id": "a"}]}, 400, "required", "candidates[0].source"),
        ({"user_id": "u", "candidates": "many"}, 400, "type", "candidates"),
        ({"user_id": "u", "strategy": "nope", "candidates": []}, 404, "unknown_strategy", "strategy"),
        ({"user_id": "u", "candidates": [{"item_id": str(i), "source": "x"} for i in range(11)]}, 400, "too_many",
         "candidates"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(payload, status, code, path):
    client = make_app(max_candidates=10).test_client()
    data = payload if isinstance(payload, str) else json.dumps(payload)
    r = client.post("/v1/rank", data=data, content_type="application/json")
    assert r.status_code == status
    err = r.get_json()["error"]
    assert err["code"] == code and err["path"] == path and err["message"]


def test_body_size_and_content_type_limits():
    client = make_app(max_body_bytes=2048).test_client()
    r = client.post("/v1/rank", data=json.dumps({"user_id": "u", "candidates": [], "context": {"x": "y" * 5000}}),
                    content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "body_too_large"
    r = client.post("/v1/rank", data="user_id=u", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415


def test_api_key_and_rate_limit():
    client = make_app(api_keys=frozenset({"k1"}), rate_per_s=1.0, rate_burst=2).test_client()
    body = {"user_id": "u", "candidates": [{"item_id": "a", "source": "retrieval"}]}
    assert client.post("/v1/rank", json=body).status_code == 401
    assert client.post("/v1/rank", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    codes = [client.post("/v1/rank", json=body, headers={"X-API-Key": "k1"}).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = client.post("/v1/rank", json=body, headers={"X-API-Key": "k1"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.get_json()["error"]["code"] == "rate_limited"


def test_events_are_validated(tmp_path):
    client = make_app().test_client()
    good = {"event_id": "e1", "ts": 1.0, "type": "click", "user_id": "u", "item_id": "i"}
    assert client.post("/v1/events", json={"events": [good]}).get_json() == {"accepted": 1}
    r = client.post("/v1/events", json=[good, {**good, "type": 7}])
    assert r.status_code == 400 and r.get_json()["error"]["path"] == "[1].type"


def test_admin_reload_needs_the_token_and_swaps(tmp_path, root):
    strategy = tmp_path / "s.yaml"
    strategy.write_text((root / "conf/objectives/feed.yaml").read_text())
    app = make_app(strategy_files=(str(strategy),), admin_token="s3cret")
    client = app.test_client()
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401
    strategy.write_text(strategy.read_text().replace("strategy: feed_v1", "strategy: feed_v2"))
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.get_json()["strategies"] == ["feed_v2"]
    body = {"user_id": "u", "candidates": [{"item_id": "a", "source": "retrieval"}]}
    assert client.post("/v1/rank", json=body).get_json()["strategy"] == "feed_v2"
    strategy.write_text("strategy: broken\nobjectives: {}\n")
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "reload_failed"
    assert client.post("/v1/rank", json=body).get_json()["strategy"] == "feed_v2"  # still serving


def test_admin_reload_disabled_without_a_token():
    assert make_app().test_client().post("/admin/reload").status_code == 403


def test_openapi_and_health():
    client = make_app().test_client()
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.") and "/v1/rank" in doc["paths"] and "/v1/events" in doc["paths"]
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_service_config_validation_names_the_key():
    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"server": {"prot": 80, "workers": 0}, "rate_limit": {"per_second": -1}})
    text = str(exc.value)
    assert "server.prot: unknown key 'prot'; did you mean 'port'?" in text
    assert "server.workers: 0 is out of range" in text and "rate_limit.per_second" in text
    cfg = service_config_from_dict({"auth": {"admin_token_env": "TOK"}}, environ={"TOK": "x", "STRATARANK_API_KEYS": "a, b"})
    assert cfg.admin_token == "x" and cfg.api_keys == {"a", "b"}


def test_experiment_variants_apply_overrides_and_log_exposures(tmp_path, request_body):
    from online.bus import open_bus

    bus_url = BUS["url"]
    app = make_app(experiments={"file": "conf/experiments/like_up.yaml"})
    client = app.test_client()
    responses = {}
    for user in ("qa-like-up-t", "qa-like-up-c"):
        body = dict(request_body, user_id=user, request_id=f"req-{user}")
        responses[user] = client.post("/v1/rank", json=body).get_json()
    assert responses["qa-like-up-t"]["experiments"] == [
        {"layer": "ranking_weights", "experiment": "like_up", "variant": "treatment"}]
    assert responses["qa-like-up-c"]["experiments"][0]["variant"] == "control"
    # the treatment's like weight is 8 instead of 4: same candidates, different scores
    score = {u: {i["item_id"]: i["score"] for i in r["items"]} for u, r in responses.items()}
    common = set(score["qa-like-up-t"]) & set(score["qa-like-up-c"])
    assert any(abs(score["qa-like-up-t"][i] - score["qa-like-up-c"][i]) > 1e-9 for i in common)
    app.extensions["stratarank"].bus.flush()
    reader = open_bus(bus_url)
    exposures = [r.value for r in reader.consumer("t", ["exposures"]).poll(100, 1.0)]
    reader.close()
    assert {(e["user_id"], e["variant"]) for e in exposures} == {("qa-like-up-t", "treatment"), ("qa-like-up-c", "control")}
    assert all(set(e) >= {"user_id", "layer", "experiment", "variant", "ts"} for e in exposures)
