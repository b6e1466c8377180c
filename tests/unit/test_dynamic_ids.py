"""Rows for ids that appear after training (ranking/dynamic_ids.py): admission after min_count, expiry
after a TTL of event time, a table that never outgrows its capacity, row 0's sharing measured, and a
model's trained rows carried into the grown tables."""
import numpy as np
import pandas as pd
import pytest
import torch

from ranking.dynamic_ids import (DynamicIds, IdTableConfig, id_tables_from_dict, load_grown, table_key,
                                 text_bucket_collisions)
from ranking.features import FeatureEncoder, feature_spec_from_dict
from ranking.models import ModelConfig, ObjectiveConfig, build_model
from strategy.errors import Errors

SPEC = feature_spec_from_dict({"name": "t", "features": [
    {"name": "item_id", "type": "id", "column": "item_id", "dim": 4},
    {"name": "recent", "type": "id_list", "column": "recent", "table": "item_id", "max_len": 5},
    {"name": "topic", "type": "id", "column": "topic", "dim": 2},
    {"name": "topics", "type": "id_list", "column": "recent", "lookup": ["item_id", "topic"], "table": "topic"},
    {"name": "text", "type": "text", "column": "text", "buckets": 64, "dim": 2}]})


def encoder():
    frame = pd.DataFrame({"item_id": ["a", "b", "c"], "recent": [["a"], [], ["b"]], "topic": ["x", "y", "x"],
                          "text": ["one two", "three", "four five"]})
    return FeatureEncoder(SPEC).fit(frame)


def cols(items, recent=None, topics=None):
    return {"item_id": items, "recent": recent or [[] for _ in items], "topic": topics or ["x"] * len(items)}


def test_new_ids_are_admitted_after_min_count_and_encoded_to_their_row():
    enc = encoder()
    ids = DynamicIds(enc, {"item_id": IdTableConfig(capacity=6, min_count=2, ttl_s=100)}, now=0.0)
    assert len(enc.vocabs["item_id"]) == 6 and enc.vocabs["item_id"][3:] == [None, None, None]
    assert ids.observe(cols(["d", "a"]), now=1.0) == {}                   # d seen once: still row 0
    batch = enc.transform_columns(cols(["d"]), 1)
    assert batch.values[0].tolist() == [0]
    assert ids.observe(cols(["e"], recent=[["d"]]), now=2.0) == {"item_id": [4]}   # d again (in a list)
    row = enc.transform_columns(cols(["d"]), 1).values[0].tolist()
    assert row == [4] and enc.vocabs["item_id"][3] == "d"
    frame_rows = enc.transform(pd.DataFrame({**cols(["d", "zz"]), "text": ["", ""]})).values[0].tolist()
    assert frame_rows == [4, 0]                                            # the frame path agrees
    stats = ids.stats()["item_id"]
    assert stats["admitted"] == 1 and stats["used"] == 4 and stats["oov_distinct_ids"] == 2
    assert stats["oov_share"] == pytest.approx(3 / 4)                      # d, e, d of a, d, e, d


def test_rows_unseen_for_the_ttl_are_freed_and_taken_again():
    enc = encoder()
    ids = DynamicIds(enc, {"item_id": IdTableConfig(capacity=4, min_count=1, ttl_s=10, min_idle_s=5)}, now=0.0)
    assert ids.observe(cols(["a", "b", "d"]), now=5.0) == {"item_id": [4]}
    # c (trained) was last seen at 0: expired at 11; a and b were refreshed at 5
    assert ids.observe(cols(["a", "b", "d"]), now=11.0) == {"item_id": [3]}
    assert enc.vocabs["item_id"] == ["a", "b", None, "d"]
    assert enc.transform_columns(cols(["c"]), 1).values[0].tolist() == [0]
    changed = ids.observe(cols(["e"]), now=12.0)
    assert changed == {"item_id": [3]} and enc.vocabs["item_id"][2] == "e"
    # full: f waits (every row was seen within min_idle_s), later it takes the least recently seen row
    assert ids.observe(cols(["f"]), now=13.0) == {} and ids.stats()["item_id"]["full"] == 1
    assert ids.observe(cols(["f", "a", "d", "e"]), now=17.5) == {"item_id": [2]}   # b: last seen at 11
    assert enc.vocabs["item_id"] == ["a", "f", "e", "d"]
    assert sum(k is not None for k in enc.vocabs["item_id"]) <= 4


def test_an_evicted_item_leaves_the_lookups_it_keyed():
    enc = encoder()
    assert enc.maps["topics"]["a"] == "x"
    ids = DynamicIds(enc, {"item_id": IdTableConfig(capacity=3, min_count=1, ttl_s=10)}, now=0.0)
    ids.observe(cols(["b", "c"]), now=20.0)
    assert "a" not in enc.maps["topics"] and enc.vocabs["item_id"][0] is None


def test_state_round_trip_keeps_counts_and_free_rows():
    enc = encoder()
    cfg = {"item_id": IdTableConfig(capacity=5, min_count=3, ttl_s=100)}
    ids = DynamicIds(enc, cfg, now=0.0)
    ids.observe(cols(["d", "d"]), now=1.0)
    state, vocab = ids.state_dict(), list(enc.vocabs["item_id"])
    again = FeatureEncoder.from_state(enc.state_dict())
    restored = DynamicIds(again, cfg, now=50.0)
    restored.load_state_dict(state)
    assert again.vocabs["item_id"] == vocab
    assert restored.observe(cols(["d"]), now=2.0) == {"item_id": [4]}     # the third sighting


def test_capacity_config_is_checked_against_the_trained_vocabulary():
    errs = Errors()
    out = id_tables_from_dict(errs, {"item_id": {"capacity": 2}, "nope": {"capacity": 9}, "topic": {"ttl_s": 5}},
                              "ids", {"item_id": 3, "topic": 2})
    assert out == {}
    assert {e.path for e in errs.items} == {"ids.item_id.capacity", "ids.nope", "ids.topic.capacity"}


def test_grown_tables_keep_the_trained_rows_and_start_new_ones_at_zero():
    enc = encoder()
    objectives = (ObjectiveConfig("click"),)
    cfg = ModelConfig(arch="shared_bottom", bottom=(4,), tower=(2,))
    trained = build_model(enc, objectives, cfg).state_dict()
    DynamicIds(enc, {"item_id": IdTableConfig(capacity=10)}, now=0.0)
    grown = build_model(enc, objectives, cfg)
    load_grown(grown, trained)
    w = grown.state_dict()[table_key("item_id")]
    assert w.shape == (11, 4)
    assert torch.equal(w[:4], trained[table_key("item_id")]) and torch.count_nonzero(w[4:]) == 0


def test_text_bucket_collisions_are_counted():
    enc = encoder()
    out = text_bucket_collisions(enc, [f"w{k}" for k in range(200)])["text"]
    assert out["tokens"] == 200 and out["buckets_used"] <= 64 and out["colliding_token_share"] > 0.9
    assert np.isclose(text_bucket_collisions(enc, ["one"])["text"]["colliding_token_share"], 0.0)
