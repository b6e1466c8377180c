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


def test_admin_reload_screens_the_stored_items_with_the_new_risk_rules(tmp_path):
    from online.corpus import CorpusConfig

    risk = tmp_path / "risk.yaml"
    risk.write_text("blocked_terms: [free money]\n")
    app = make_app(risk_file=str(risk), admin_token="s3cret", corpus=CorpusConfig(path=str(tmp_path / "c.db")))
    client = app.test_client()
    items = [{"item_id": "a", "source": "human", "text": "a miracle cure for tired eyes"},
             {"item_id": "b", "source": "human", "text": "free money now"}]
    assert client.post("/v1/items", json={"items": items}).status_code == 200
    assert [client.get(f"/v1/items/{i}").get_json()["blocked"] for i in "ab"] == [False, True]
    risk.write_text("blocked_terms: [miracle cure]\n")
    r = client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.get_json()["corpus_rescreened"] == 2
    got = [client.get(f"/v1/items/{i}").get_json() for i in "ab"]
    assert [g["blocked"] for g in got] == [True, False] and got[0]["blocked_reason"].startswith("risk:")
    metrics = client.get("/metrics").data.decode()
    assert 'stratarank_corpus_writes_total{outcome="created"} 2.0' in metrics
    assert "stratarank_corpus_items 1.0" in metrics   # b only: a is blocked now


def test_admin_reload_disabled_without_a_token():
    assert make_app().test_client().post("/admin/reload").status_code == 403


def test_openapi_and_health():
    client = make_app().test_client()
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.") and "/v1/rank" in doc["paths"] and "/v1/events" in doc["paths"]
    assert client.get("/healthz").get_json() == {"status": "ok"}


VALUE_OF_TYPE = {"string": "7", "number": 7, "object": {}, "array": []}


def test_the_openapi_document_states_the_types_the_server_takes(raw_client):
    """Each field of a /v1/rank or /v1/events body, as the document types it: a value of another
    type is a 400 at its path (``true`` for a number or id too), and null is taken where it says nullable."""
    paths = raw_client.get("/openapi.json").get_json()["paths"]
    rank = paths["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    events = paths["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    candidate = {"item_id": "a", "source": "retrieval"}
    event = json.loads(EVENT)
    cases = [("/v1/rank", rank["properties"], lambda k, v: {"user_id": "u", "candidates": [candidate], k: v}, ""),
             ("/v1/rank", rank["properties"]["candidates"]["items"]["properties"],
              lambda k, v: {"user_id": "u", "candidates": [dict(candidate, **{k: v})]}, "candidates[0]."),
             ("/v1/events", events["oneOf"][1]["properties"]["events"]["items"]["properties"],
              lambda k, v: {"events": [dict(event, **{k: v})]}, "events[0].")]
    checked = 0
    for path, properties, body, prefix in cases:
        for key, schema in properties.items():
            kinds = {s["type"].replace("integer", "number") for s in schema.get("oneOf", [schema])}
            wrong = [value for kind, value in VALUE_OF_TYPE.items() if kind not in kinds] + [True]
            for value in wrong:
                status, err = post_raw(raw_client, path, json.dumps(body(key, value)).encode())
                assert status == 400 and err["path"] == prefix + key, (key, value, status, err)
                checked += 1
            status, err = post_raw(raw_client, path, json.dumps(body(key, None)).encode())
            if schema.get("nullable"):
                assert status < 300, (key, err)
            else:
                assert (status, err["path"]) == (400, prefix + key), key
    assert checked > 40


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


# ---------------------------------------------------------------- bodies that are never a 500

CANDIDATE = b'{"item_id": "a", "source": "retrieval"}'
EVENT = b'{"event_id": "e", "ts": 1, "type": "click", "user_id": "u", "item_id": "i"}'


def rank_body(candidate: bytes = CANDIDATE, **fields: bytes) -> bytes:
    """A /v1/rank body as raw bytes (the shapes below are not what json.dumps writes)."""
    extra = b"".join(b'"%s": %s, ' % (k.encode(), v) for k, v in fields.items())
    return b'{%s"user_id": "u", "candidates": [%s]}' % (extra, candidate)


def events_body(event: bytes = EVENT) -> bytes:
    return b'{"events": [%s]}' % event


def post_raw(client, path: str, raw: bytes):
    """(status, error) of a raw POST; the error envelope is checked whenever the answer is a 4xx."""
    r = client.post(path, data=raw, content_type="application/json")
    assert r.status_code < 500, (raw[:200], r.data[:300])
    if r.status_code < 400:
        return r.status_code, None
    err = r.get_json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and isinstance(err["path"], str)
    return r.status_code, err


@pytest.fixture(scope="module")
def raw_client(tmp_path_factory):
    bus = BusConfig(url=f"embedded://{tmp_path_factory.mktemp('raw') / 'bus'}")
    return create_app(ServiceConfig(nearline=NearlineConfig(bus=bus))).test_client()


def both_endpoints(rank_raw: bytes, events_raw: bytes):
    return [("/v1/rank", rank_raw), ("/v1/events", events_raw)]


def nested(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


@pytest.mark.parametrize("levels", [9, 1000, 1025, 5000, 100_000])
def test_deep_nesting_is_a_400_on_every_json_endpoint(raw_client, levels):
    from strategy.schema import MAX_DEPTH

    for path, raw in both_endpoints(rank_body(candidate=nested(levels)), events_body(nested(levels))):
        status, err = post_raw(raw_client, path, raw)
        assert status == 400
        if levels > 1024:   # past orjson's own limit: the decoder names the body's limit
            assert err["code"] == "too_deep" and f"deeper than {MAX_DEPTH} levels" in err["message"]
        else:               # within it: the first level that is not what the schema wants, by its path
            assert err["code"] == "type" and err["path"] in ("candidates[0]", "events[0]")
    status, err = post_raw(raw_client, "/v1/rank", rank_body(context=b'{"a": %s}' % nested(levels)))
    assert status == 400 and err["code"] == "too_deep"   # the free-form context: the limit, at its path
    assert err["path"].startswith("context.a[0]") if levels + 2 <= 1024 else err["path"] == ""
    assert raw_client.get("/healthz").status_code == 200


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"-NaN"])
def test_nan_and_infinity_literals_are_invalid_json(raw_client, literal):
    features = b'{"item_id": "a", "source": "retrieval", "features": {"x": %s}}' % literal
    for path, raw in both_endpoints(rank_body(features), events_body(EVENT.replace(b'"ts": 1', b'"ts": ' + literal))):
        status, err = post_raw(raw_client, path, raw)
        assert status == 400 and err["code"] == "invalid_json"
        assert "NaN and Infinity are not JSON numbers" in err["message"] and "column" in err["message"]
    status, err = post_raw(raw_client, "/v1/rank", rank_body(slate_size=literal))
    assert status == 400 and err["code"] == "invalid_json"


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" * 5000, b"-" + b"9" * 400])
def test_numbers_past_a_double_are_a_400(raw_client, number):
    features = b'{"item_id": "a", "source": "retrieval", "features": {"x": %s}}' % number
    for path, raw in both_endpoints(rank_body(features), events_body(EVENT.replace(b'"ts": 1', b'"ts": ' + number))):
        status, err = post_raw(raw_client, path, raw)
        assert status == 400 and err["code"] == "invalid_json" and "double" in err["message"]
    assert post_raw(raw_client, "/v1/rank", rank_body(slate_size=number))[0] == 400


def test_number_edge_cases_that_are_json(raw_client):
    ok = [b"-0", b"-0.0", b"0e0", b"1E2", b"18446744073709551615", b"123456789012345678901234567890", b"1e-400"]
    for number in ok:   # features take any finite number; slate_size takes integers in [1, 1000]
        features = b'{"item_id": "a", "source": "retrieval", "features": {"x": %s}}' % number
        assert post_raw(raw_client, "/v1/rank", rank_body(features))[0] == 200, number
    for number in (b"-0", b"0", b"1001", b"18446744073709551616", b"2.5", b"true"):
        status, err = post_raw(raw_client, "/v1/rank", rank_body(slate_size=number))
        assert status == 400 and err["path"] == "slate_size", number


@pytest.mark.parametrize("raw", [b'"caf\xe9"', b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xf8\x88\x80\x80\x80"'])
def test_bodies_that_are_not_utf8_are_a_400(raw_client, raw):
    for path, body in both_endpoints(rank_body(b'{"item_id": %s, "source": "retrieval"}' % raw),
                                     events_body(EVENT.replace(b'"i"', raw))):
        status, err = post_raw(raw_client, path, body)
        assert status == 400 and err["code"] == "invalid_json" and "not UTF-8 (byte" in err["message"]


def test_utf16_is_a_400_and_a_utf8_byte_order_mark_is_skipped(raw_client):
    body = rank_body()
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        status, err = post_raw(raw_client, "/v1/rank", body.decode().encode(encoding))
        assert status == 400 and err["code"] == "invalid_json"
    assert post_raw(raw_client, "/v1/rank", b"\xef\xbb\xbf" + body)[0] == 200
    assert post_raw(raw_client, "/v1/events", b"\xef\xbb\xbf" + events_body())[0] == 202


@pytest.mark.parametrize("escaped", [b"\\ud800", b"\\udfff", b"x\\ud83d", b"\\ude00\\ud83d", b"\\ud800\\u0041"])
def test_lone_surrogates_are_a_400(raw_client, escaped):
    for path, body in both_endpoints(rank_body(b'{"item_id": "%s", "source": "retrieval"}' % escaped),
                                     events_body(EVENT.replace(b'"u"', b'"%s"' % escaped))):
        status, err = post_raw(raw_client, path, body)
        assert status == 400 and err["code"] == "invalid_json" and "surrogate" in err["message"]
    pair = rank_body(b'{"item_id": "\\ud83d\\ude00", "source": "retrieval"}')   # a real pair is fine
    assert post_raw(raw_client, "/v1/rank", pair)[0] == 200


def test_null_bytes(raw_client):
    cand = b'{"item_id": "a%sb", "source": "retrieval"}'
    for path, body in both_endpoints(rank_body(cand % b"\x00"), events_body(EVENT.replace(b'"i"', b'"i\x00"'))):
        status, err = post_raw(raw_client, path, body)            # a raw NUL byte is not JSON
        assert status == 400 and err["code"] == "invalid_json"
    for path, body, where in [("/v1/rank", rank_body(cand % b"\\u0000"), "candidates[0].item_id"),
                              ("/v1/rank", rank_body(b'{"item_id": "a", "source": "retrieval", "text": "\\u0000"}'),
                               "candidates[0].text"),
                              ("/v1/events", events_body(EVENT.replace(b'"i"', b'"\\u0000"')), "events[0].item_id")]:
        status, err = post_raw(raw_client, path, body)            # an escaped one is, but no field takes it
        assert (status, err["code"], err["path"]) == (400, "invalid_string", where)
    status, err = post_raw(raw_client, "/v1/rank", rank_body(context=b'{"k\\u0000": 1}'))
    assert status == 400 and err["code"] == "invalid_string" and err["path"].startswith("context.k")
    # the six characters \u0000 (an escaped backslash, then u0000) are only text
    text = b'{"item_id": "a", "source": "retrieval", "text": "\\\\u0000"}'
    assert post_raw(raw_client, "/v1/rank", rank_body(text))[0] == 200


def test_a_duplicated_key_keeps_its_last_value(raw_client):
    r = raw_client.post("/v1/rank", data=rank_body(request_id=b'"first", "request_id": "last"'),
                        content_type="application/json")
    assert r.status_code == 200 and r.get_json()["request_id"] == "last"
    status, err = post_raw(raw_client, "/v1/rank", rank_body(request_id=b'"ok", "request_id": 5'))
    assert status == 400 and err["path"] == "request_id"


@pytest.mark.parametrize("raw", [b"null", b"true", b"3", b'"x"', b"[]", b"[1]", b"", b" ", b"{", b"}", b"{}"])
def test_top_level_shapes(raw_client, raw):
    status, err = post_raw(raw_client, "/v1/rank", raw)
    assert status == 400 and (err["path"] == "" or err["code"] == "required")
    status, err = post_raw(raw_client, "/v1/events", raw)
    assert status == (202 if raw == b"[]" else 400)   # a batch is a list of events or {"events": [...]}


@pytest.mark.parametrize("value", [b"7", b"0", b"-1", b"1.5", b"1e3", b"true", b"false", b"18446744073709551615"])
def test_ids_that_are_numbers_are_a_400_naming_the_field(raw_client, value):
    for field in ("item_id", "creator_id", "topic"):
        cand = b'{"source": "retrieval", "item_id": "a", "%s": %s}' % (field.encode(), value)
        status, err = post_raw(raw_client, "/v1/rank", rank_body(cand))
        assert (status, err["code"], err["path"]) == (400, "type", f"candidates[0].{field}")
    for field in ("user_id", "request_id"):
        status, err = post_raw(raw_client, "/v1/rank", b'{"candidates": [], "user_id": "u", "%s": %s}'
                               % (field.encode(), value))
        assert (status, err["code"], err["path"]) == (400, "type", field)
    for field in ("event_id", "user_id", "item_id", "request_id", "type"):
        event = EVENT[:-1] + b', "%s": %s}' % (field.encode(), value)   # the last value of a key wins
        status, err = post_raw(raw_client, "/v1/events", events_body(event))
        assert (status, err["code"], err["path"]) == (400, "type", f"events[0].{field}")
    status, err = post_raw(raw_client, "/v1/rank", rank_body(b'{"item_id": "a", "source": %s}' % value))
    assert (status, err["path"]) == (400, "candidates[0].source")


def test_a_body_just_under_the_size_limit_is_read_and_one_over_is_a_413(tmp_path):
    limit = 64 * 1024
    client = make_app(max_body_bytes=limit).test_client()
    pad = rank_body(context=b'{"pad": ""}')
    fill = b"x" * (limit - len(pad))
    status, _ = post_raw(client, "/v1/rank", rank_body(context=b'{"pad": "%s"}' % fill))
    assert status == 200
    status, err = post_raw(client, "/v1/rank", rank_body(context=b'{"pad": "%sx"}' % fill))
    assert status == 413 and err["code"] == "body_too_large"
    status, err = post_raw(client, "/v1/events", b"[" + b" " * limit + b"]")
    assert status == 413
