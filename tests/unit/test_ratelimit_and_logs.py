"""Rate-limit buckets and keys, the scorer's logging and metrics config, JSON log lines."""
import json
import logging

import pytest

from online.config import service_config_from_dict
from online.logs import REQUEST_ID, JsonFormatter, RequestContext, request_id_from
from online.ratelimit import TokenBuckets, client_key, open_limiter
from strategy import ValidationError


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_bucket_spends_its_burst_then_refills_at_the_rate():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)     # one token takes 1/rate s to come back
    clock.t += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    assert buckets.take("b") == 0.0                   # another client has its own bucket


def test_a_full_table_forgets_one_idle_client_not_every_bucket():
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock, max_clients=3)
    for client in ("a", "b", "c"):
        assert buckets.take(client) == 0.0
    assert buckets.take("a") > 0       # a is empty, and now the most recently seen
    assert buckets.take("d") == 0.0    # the table is full: b, least recently seen, is forgotten
    assert buckets.take("a") > 0 and buckets.take("c") > 0   # nobody else got a fresh bucket
    assert buckets.take("b") == 0.0    # b starts full again


@pytest.mark.parametrize("keys_on, header, headers, addr, want", [
    (True, None, {"X-API-Key": "k1", "X-Client-Id": "me"}, "10.0.0.1", "key:k1"),
    (False, None, {"X-API-Key": "k1", "X-Client-Id": "me"}, "10.0.0.1", "ip:10.0.0.1"),   # headers are not trusted
    (False, "X-Forwarded-For", {"X-Forwarded-For": "1.2.3.4, 10.0.0.9"}, "10.0.0.1", "hdr:1.2.3.4"),
    (False, "X-Forwarded-For", {}, "10.0.0.1", "ip:10.0.0.1"),
    (False, None, {}, None, "ip:-"),
])
def test_whose_bucket_a_request_takes_from(keys_on, header, headers, addr, want):
    assert client_key(headers, addr, keys_on, header) == want


def test_a_client_cannot_pick_a_fresh_bucket_by_header(tmp_path):
    from online.app import create_app
    from online.config import ServiceConfig
    from online.nearline import BusConfig, NearlineConfig

    app = create_app(ServiceConfig(rate_per_s=0.5, rate_burst=2,
                                   nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}"))))
    client = app.test_client()
    body = {"events": [{"event_id": "e", "user_id": "u", "item_id": "i", "type": "click", "ts": 1.7e9}]}
    codes = [client.post("/v1/events", json=body, headers={"X-Client-Id": f"c{i}", "X-API-Key": f"k{i}"}).status_code
             for i in range(4)]
    assert codes == [202, 202, 429, 429]
    assert "stratarank_rate_limited_total 2.0" in client.get("/metrics").data.decode()


def test_keys_on_gives_each_key_its_own_bucket(tmp_path):
    from online.app import create_app
    from online.config import ServiceConfig
    from online.nearline import BusConfig, NearlineConfig

    app = create_app(ServiceConfig(rate_per_s=0.5, rate_burst=1, api_keys=frozenset({"k1", "k2"}),
                                   nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}"))))
    client = app.test_client()
    body = {"events": []}
    status = [client.post("/v1/events", json=body, headers={"X-API-Key": k}).status_code for k in ("k1", "k1", "k2")]
    assert status == [202, 429, 202]


def test_rate_limit_and_logging_config_errors_name_the_field():
    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"rate_limit": {"per_second": 5, "storage": "memcached://x", "client_header": "X Y"},
                                  "logging": {"format": "xml", "level": "loud", "access": "yes"}})
    text = str(exc.value)
    for field in ("rate_limit.storage", "rate_limit.client_header", "logging.format", "logging.level",
                  "logging.access"):
        assert field in text, field
    assert "(allowed: text, json)" in text
    for bad in ("redis://", "redis://h:port/0", "redis://h:6379/x", "memory://somewhere"):
        with pytest.raises(ValidationError, match="rate_limit.storage"):
            service_config_from_dict({"rate_limit": {"per_second": 5, "storage": bad}})
    cfg = service_config_from_dict({"rate_limit": {"per_second": 5, "storage": "redis://127.0.0.1:6379/2",
                                                   "client_header": "X-Forwarded-For"},
                                    "logging": {"format": "json", "access": True}})
    assert (cfg.rate_storage, cfg.rate_client_header, cfg.log_format, cfg.access_log) == \
        ("redis://127.0.0.1:6379/2", "X-Forwarded-For", "json", True)
    assert isinstance(open_limiter("memory://", 1, 1), TokenBuckets)


@pytest.mark.parametrize("header, echoed", [("abc-123", True), ("a" * 128, True), ("a" * 129, False),
                                            ("has space", False), ("new\nline", False), ("", False), (None, False)])
def test_only_a_sane_client_request_id_is_kept(header, echoed):
    rid = request_id_from(header)
    assert (rid == header) is echoed
    if not echoed:
        assert len(rid) == 32 and int(rid, 16) >= 0


def test_a_json_line_carries_the_request_id_pid_fields_and_exception():
    record = logging.LogRecord("stratarank.scorer", logging.ERROR, __file__, 1, "bad %s", ("thing",), None)
    token = REQUEST_ID.set("req-9")
    try:
        RequestContext().filter(record)
    finally:
        REQUEST_ID.reset(token)
    record.fields = {"status": 500, "message": "must not replace the message"}
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-9" and line["message"] == "bad thing" and line["status"] == 500
    assert line["level"] == "error" and line["pid"] == record.process and "ValueError: boom" in line["exc"]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    RequestContext().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
