"""Validation of corpus item writes (strategy/items.py): strict types, exact paths, did-you-mean."""
import pytest

from strategy.errors import ValidationError
from strategy.items import MAX_ITEMS, ItemGenerator, parse_item, parse_items
from strategy.schema import MAX_TEXT

LLM = {"item_id": "i1", "source": "llm", "text": "hello", "generator": {"model": "gpt", "prior_score": 0.7}}


def errors(body) -> dict:
    with pytest.raises(ValidationError) as info:
        parse_items(body)
    return {e.path: e for e in info.value.errors}


def test_a_valid_batch_keeps_exactly_the_fields_given():
    human, llm = parse_items({"items": [{"item_id": "h", "source": "human", "topic": "t1"},
                                        {**LLM, "generator": {"model": "gpt", "prompt_id": "p7", "prior_score": 1},
                                         "created_at": "2024-01-01T00:00:00Z", "ttl_s": 60, "blocked": False}]})
    assert (human.item_id, human.source, human.fields) == ("h", "human", {"topic": "t1"})
    assert llm.fields["generator"] == ItemGenerator("gpt", 1.0, "p7")
    assert llm.fields["created_at"] == 1704067200.0 and llm.fields["expires_at"] == 1704067260.0
    assert "ttl_s" not in llm.fields and llm.fields["blocked"] is False


def test_null_is_kept_as_a_clear_and_a_ttl_without_created_at_waits_for_the_store():
    write = parse_item({"item_id": "i", "source": "human", "text": None, "generator": None, "expires_at": None,
                        "ttl_s": 30})
    assert write.fields == {"text": None, "generator": None, "ttl_s": 30.0}


def test_every_bad_field_is_named_by_its_path():
    bad = errors({"items": [LLM, LLM, LLM, {"item_id": 3, "source": "lm", "creator_id": 7, "topic": "",
                                            "text": "x" * (MAX_TEXT + 1),
                                            "generator": {"model": "m", "prior_score": 1.5, "promt_id": "p"},
                                            "created_at": "yesterday", "blocked": "yes", "colour": "red"}]})
    assert bad["items[3].item_id"].code == "type" and "string id" in bad["items[3].item_id"].message
    assert "did you mean 'llm'" in bad["items[3].source"].message
    assert bad["items[3].creator_id"].code == "type"
    assert bad["items[3].topic"].code == "invalid"
    assert bad["items[3].text"].code == "too_long"
    assert bad["items[3].generator.prior_score"].code == "range"
    assert "did you mean 'prompt_id'" in bad["items[3].generator.promt_id"].message
    assert bad["items[3].created_at"].code == "type"
    assert bad["items[3].blocked"].code == "type"
    assert "did you mean" not in bad["items[3].colour"].message and bad["items[3].colour"].code == "unknown_key"
    assert all(p.startswith("items[3]") for p in bad)


@pytest.mark.parametrize("item, path, code", [
    ({"source": "human"}, "items[0].item_id", "required"),
    ({"item_id": "i"}, "items[0].source", "required"),
    ({"item_id": "i", "source": "human", "generator": {"model": "m", "prior_score": 0.5}}, "items[0].generator",
     "invalid"),
    ({**LLM, "generator": {"model": "", "prior_score": 0.5}}, "items[0].generator.model", "invalid"),
    ({**LLM, "generator": {"prior_score": 0.5}}, "items[0].generator.model", "required"),
    ({**LLM, "generator": {"model": "m", "prior_score": True}}, "items[0].generator.prior_score", "type"),
    ({**LLM, "expires_at": 10, "ttl_s": 5}, "items[0].ttl_s", "conflict"),
    ({**LLM, "ttl_s": 0}, "items[0].ttl_s", "range"),
    ({**LLM, "created_at": 100, "expires_at": 100}, "items[0].expires_at", "range"),
    ({**LLM, "created_at": 1.7e12}, "items[0].created_at", "range"),   # milliseconds, not seconds
    ({**LLM, "created_at": "2024-01-01T00:00:00"}, "items[0].created_at", "invalid"),   # no time zone
    ({**LLM, "created_at": float("inf")}, "items[0].created_at", "range"),
    ("i1", "items[0]", "type"),
])
def test_one_bad_write(item, path, code):
    bad = errors({"items": [item]})
    assert path in bad and bad[path].code == code, bad


@pytest.mark.parametrize("body, path, code", [
    ([LLM], "", "type"),
    ({}, "items", "required"),
    ({"items": []}, "items", "required"),
    ({"items": LLM}, "items", "type"),
    ({"items": [LLM] * (MAX_ITEMS + 1)}, "items", "too_many"),
    ({"items": [LLM], "item": []}, "item", "unknown_key"),
])
def test_bad_envelopes(body, path, code):
    bad = errors(body)
    assert path in bad and bad[path].code == code, bad


def test_parse_item_collects_into_given_errors_without_raising():
    from strategy.errors import Errors

    errs = Errors()
    assert parse_item({"item_id": "i", "source": "robot"}, "items[9]", errs) is None
    assert [e.path for e in errs.items] == ["items[9].source"]
