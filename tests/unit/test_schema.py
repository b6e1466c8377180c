"""Request / event schema: every bad field is reported with its exact path."""
from datetime import datetime, timezone

import pytest

from strategy import ValidationError, parse_event, parse_events, parse_request


def good_request(n=3):
    return {
        "user_id": "u7",
        "candidates": [{"item_id": f"i{i}", "source": "retrieval", "topic": "t"} for i in range(n)],
    }


def paths(exc):
    return {e.path: e for e in exc.value.errors}


def test_valid_request_is_normalised():
    body = good_request()
    body["candidates"].append({"item_id": "99", "source": "llm", "text": "hi",
                               "generator": {"model": "g", "prior_score": 0.7}, "features": {"impressions": 3}})
    req = parse_request(body)
    assert req.user_id == "u7" and len(req.candidates) == 4
    llm = req.candidates[-1]
    assert llm.item_id == "99" and llm.generator.prior_score == 0.7 and llm.impressions == 3.0


ID_FIELDS = ("user_id", "request_id", "candidates[0].item_id", "candidates[0].creator_id", "candidates[0].topic")


@pytest.mark.parametrize("where", ID_FIELDS)
@pytest.mark.parametrize("value", [12, 0, -1, 1.5, 12.0, True, False, 2 ** 64, [], {}])
def test_an_id_that_is_not_a_string_is_rejected_at_its_path(where, value):
    body = good_request(2)
    key = where.rsplit(".", 1)[-1]
    (body["candidates"][0] if where.startswith("candidates") else body)[key] = value
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert [(e.path, e.code) for e in exc.value.errors] == [(where, "type")]
    assert "expected a string id" in exc.value.errors[0].message


@pytest.mark.parametrize("field,value", [("source", "llm\n"), ("strategy", "feed_v1\n"), ("slate_size", True),
                                         ("slate_size", 2 ** 64), ("slate_size", 10 ** 400)])
def test_patterns_match_the_whole_value_and_booleans_are_not_numbers(field, value):
    body = good_request(1)
    (body["candidates"][0] if field == "source" else body)[field] = value
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert {e.path for e in exc.value.errors} == {"candidates[0].source" if field == "source" else field}


def test_numbers_past_a_double_are_an_error_not_a_crash():
    body = good_request(2)
    body["candidates"][1]["features"] = {"x": 10 ** 400, "y": -(10 ** 5000)}
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert {(e.path, e.code) for e in exc.value.errors} == {("candidates[1].features.x", "range"),
                                                            ("candidates[1].features.y", "range")}


def test_context_nests_within_the_body_limit():
    from strategy.schema import MAX_DEPTH

    def nested(levels):   # ``levels`` arrays inside one another
        value = "leaf"
        for _ in range(levels):
            value = [value]
        return value

    body = good_request(1)
    body["context"] = {"surface": "home", "deep": nested(MAX_DEPTH - 2)}   # body, context, then the arrays
    assert parse_request(body).context["surface"] == "home"
    body["context"]["deep"] = nested(MAX_DEPTH - 1)
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert [(e.path, e.code) for e in exc.value.errors] == [("context.deep" + "[0]" * (MAX_DEPTH - 2), "too_deep")]
    assert f"deeper than {MAX_DEPTH} levels" in exc.value.errors[0].message
    body["context"]["deep"] = nested(5000)   # no recursion: an error, not a RecursionError
    with pytest.raises(ValidationError):
        parse_request(body)


def test_missing_item_id_names_the_candidate():
    body = good_request(5)
    del body["candidates"][3]["item_id"]
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert str(exc.value.errors[0]) == "candidates[3].item_id: required"


def test_every_bad_field_is_reported():
    body = {
        "user_id": True,
        "slate_size": 0,
        "colour": "red",
        "candidates": [
            {"item_id": "a", "source": "LLM!"},
            {"item_id": "", "source": "llm", "generator": {"model": "g", "prior_score": 1.5}},
            {"item_id": "c", "source": "llm", "features": {"x": float("nan"), "y": {"nested": 1}}},
            "not an object",
        ],
    }
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    got = paths(exc)
    assert set(got) >= {
        "user_id", "slate_size", "colour", "candidates[0].source", "candidates[1].item_id",
        "candidates[1].generator.prior_score", "candidates[2].features.x", "candidates[2].features.y", "candidates[3]",
    }
    assert got["colour"].code == "unknown_key"
    assert "out of range [0, 1]" in got["candidates[1].generator.prior_score"].message


def test_too_many_candidates():
    with pytest.raises(ValidationError) as exc:
        parse_request(good_request(11), max_candidates=10)
    assert paths(exc)["candidates"].code == "too_many"


@pytest.mark.parametrize("body", [None, [], "x", 3])
def test_non_object_body(body):
    with pytest.raises(ValidationError) as exc:
        parse_request(body)
    assert exc.value.errors[0].path == ""


def test_stable_id_is_deterministic_without_request_id():
    a, b = parse_request(good_request()), parse_request(good_request())
    assert a.stable_id() == b.stable_id() and a.stable_id().startswith("r-")
    body = good_request()
    body["request_id"] = "abc"
    assert parse_request(body).stable_id() == "abc"


def test_event_parsing_and_iso_timestamps():
    e = parse_event({"event_id": "e1", "ts": "2026-11-29T10:00:00Z", "type": "watch", "user_id": "1",
                     "item_id": "v", "value": 12.5})
    assert e.ts == datetime(2026, 11, 29, 10, tzinfo=timezone.utc).timestamp() and e.value == 12.5 and e.user_id == "1"


@pytest.mark.parametrize("key", ["event_id", "user_id", "item_id", "request_id", "type"])
@pytest.mark.parametrize("value", [7, 7.0, True, 2 ** 64])
def test_event_ids_and_type_are_strings(key, value):
    good = {"event_id": "e1", "ts": 1.0, "type": "click", "user_id": "u", "item_id": "i"}
    with pytest.raises(ValidationError) as exc:
        parse_events([good, dict(good, **{key: value})])
    assert [(e.path, e.code) for e in exc.value.errors] == [(f"[1].{key}", "type")]


@pytest.mark.parametrize("key,value", [("ts", True), ("value", False), ("ts", 10 ** 400), ("value", 10 ** 400),
                                       ("type", "click\n")])
def test_event_numbers_are_finite_and_not_booleans(key, value):
    good = {"event_id": "e1", "ts": 1.0, "type": "click", "user_id": "u", "item_id": "i"}
    with pytest.raises(ValidationError) as exc:
        parse_event(dict(good, **{key: value}))
    assert [e.path for e in exc.value.errors] == [key]


def test_event_batch_errors_carry_the_index():
    good = {"event_id": "e1", "ts": 1.0, "type": "click", "user_id": "u", "item_id": "i"}
    bad = dict(good, ts="yesterday", type="Click")
    with pytest.raises(ValidationError) as exc:
        parse_events({"events": [good, bad, dict(good, event_id=None)]})
    got = paths(exc)
    assert {"events[1].ts", "events[1].type", "events[2].event_id"} <= set(got)
    assert len(parse_events([good, good])) == 2
