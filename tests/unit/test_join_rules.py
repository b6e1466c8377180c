"""The joiner's rules (online/joiner.py JoinState), record by record: window, grace, late and
unattributed events, duplicates, orphans read before their impression, forced emission, replay after a
restart, and the config's validation."""
import math

import pytest

from online.joiner import JoinerConfig, JoinState, LabelSpec, rows_table
from strategy import ValidationError

SPEC = LabelSpec((("click", "click", False), ("watch_time", "watch", True)))


def state(window=10.0, grace=1.0, max_pending=1000):
    return JoinState(SPEC, window, grace, ttl_s=100.0, max_pending=max_pending)


def imp(rid="r1", item="i1", user="u1", pos=0, **features):
    return {"request_id": rid, "item_id": item, "user_id": user, "ts": 100.0, "position": pos,
            "source": "retrieval", "strategy": "s", "model_version": "m@v1", "score": 1.0, "propensity": 0.5,
            "experiments": [{"layer": "l", "experiment": "e", "variant": "v"}], "predictions": {"click": 0.2},
            "features": {"topic": "news", "user_recent_items": ["i9"], **features}}


def ev(eid, etype="click", rid="r1", item="i1", value=None):
    return {"event_id": eid, "type": etype, "user_id": "u1", "item_id": item, "request_id": rid, "value": value}


class Feed:
    """Records with increasing offsets per topic."""

    def __init__(self, s: JoinState):
        self.s, self.offsets = s, {"impressions": 0, "events": 0}

    def __call__(self, topic, published, value, partition=0):
        off = self.offsets[topic]
        self.offsets[topic] += 1
        self.s.add(topic, partition, off, off + 1, published, value, now=published)


def examples(s):
    return {r["example_id"]: r for r in s.take_outputs()["examples"]}


def test_events_inside_the_window_label_the_example_and_late_ones_are_kept_apart():
    s = state()
    feed = Feed(s)
    feed("impressions", 100.0, imp())
    feed("events", 101.0, ev("e1"))
    feed("events", 105.0, ev("e2", "watch", value=12.5))
    feed("events", 109.9, ev("e3", "watch", value=2.5))
    feed("events", 110.5, ev("e4"))          # past the window (100 + 10), before the emission
    s.advance(110.5, idle=False)
    early = s.take_outputs()
    assert not early["examples"]             # the window closes at 110, plus grace 1: not yet
    assert [r["event_id"] for r in early["late"]] == ["e4"]   # late while still open: not joined
    feed("events", 112.5, ev("e5", "watch", value=1.0))
    s.advance(112.5, idle=False)
    out = s.take_outputs()
    (row,) = out["examples"]
    assert row["example_id"] == "r1:i1" and row["click"] == 1.0 and row["watch_time"] == 15.0
    assert row["n_events"] == 3 and sorted(row["event_ids"]) == ["e1", "e2", "e3"]
    assert row["position"] == 1 and row["topic"] == "news" and row["pred_click"] == 0.2
    assert [r["event_id"] for r in out["late"]] == ["e5"]
    feed("events", 113.0, ev("e6"))           # after the emission: late too, with its example id
    s.advance(113.0, idle=False)
    late = s.take_outputs()["late"]
    assert [(r["event_id"], r["example_id"]) for r in late] == [("e6", "r1:i1")]
    assert late[0]["after_window_s"] == pytest.approx(3.0)
    assert s.counters["late_events"] == 3 and s.counters["joined_events"] == 3


def test_duplicates_unattributed_and_invalid_records_are_counted_never_joined_twice():
    s = state()
    feed = Feed(s)
    feed("impressions", 100.0, imp())
    feed("impressions", 100.5, imp())                       # the same (request_id, item_id): dropped
    feed("events", 101.0, ev("e1", "watch", value=3.0))
    feed("events", 101.5, ev("e1", "watch", value=3.0))      # the same event_id
    feed("events", 102.0, ev("e2", rid=None))                # no request_id
    feed("events", 102.0, {"event_id": 7, "type": "click", "item_id": "i1"})
    feed("impressions", 102.0, {"request_id": "r2"})
    s.advance(200.0, idle=True)
    out = s.take_outputs()
    assert out["examples"][0]["watch_time"] == 3.0
    assert [r["reason"] for r in out["unattributed"]] == ["no request_id"]
    assert len(out["rejected"]) == 2 and "event_id must be a non-empty string" in out["rejected"][0]["reason"]
    assert s.counters["duplicate_impressions"] == 1 and s.counters["duplicate_events"] == 1


def test_an_event_read_before_its_impression_waits_and_joins():
    """Topics are read in any interleaving: the event's impression may come later from the bus."""
    s = state()
    feed = Feed(s)
    feed("events", 101.0, ev("e1"))
    feed("events", 101.2, ev("e1"))           # a duplicate of a waiting event is a duplicate
    s.advance(101.2, idle=False)
    assert len(s.orphans[0]) == 1
    feed("impressions", 100.0, imp())
    feed("impressions", 103.0, imp(rid="r2"))  # impressions read past the orphan + grace: it resolves
    s.advance(103.0, idle=False)
    assert not s.orphans[0] and s.pending["r1:i1"][2][0] == 1.0
    feed("events", 150.0, ev("e9", rid="r3"))  # an unknown request: unattributed once impressions pass it
    feed("impressions", 152.0, imp(rid="r4"))
    s.advance(152.0, idle=False)
    out = s.take_outputs()
    assert {r["example_id"]: r["click"] for r in out["examples"]} == {"r1:i1": 1.0, "r2:i1": 0.0}
    assert [(r["event_id"], r["reason"]) for r in out["unattributed"]] == [("e9", "no impression")]
    assert s.counters["duplicate_events"] == 1


def test_an_impression_waits_for_an_orphan_inside_its_window():
    s = state(window=2.0, grace=0.5)
    feed = Feed(s)
    feed("impressions", 100.0, imp())
    feed("events", 101.0, ev("e1", rid="r0"))   # an orphan (unknown yet) inside r1's window...
    feed("events", 110.0, ev("e2", rid="r0"))   # ...events move on far past r1's window
    s.advance(110.0, idle=False)
    assert "r1:i1" in s.pending                 # it may be this impression's: emission waits
    s.advance(200.0, idle=True)
    assert "r1:i1" not in s.pending and s.counters["unattributed_events"] == 2


def test_max_pending_emits_the_oldest_early_and_counts_it():
    s = state(max_pending=2)
    feed = Feed(s)
    for k in range(3):
        feed("impressions", 100.0 + k, imp(rid=f"r{k}"))
    assert s.counters["forced_emissions"] == 1 and set(s.pending) == {"r1:i1", "r2:i1"}
    assert [r["example_id"] for r in s.take_outputs()["examples"]] == ["r0:i1"]


def test_a_restart_skips_what_was_accounted_for_and_keeps_open_labels(tmp_path):
    s = state()
    feed = Feed(s)
    feed("impressions", 100.0, imp())
    feed("events", 101.0, ev("e1", "watch", value=4.0))
    ck = s.checkpoint(seq=1)
    assert ck["positions"] == {"impressions:0": 0, "events:0": 1} and ck["open"]["r1:i1"][1] == ["e1"]

    again = state()
    (tmp_path / "examples").mkdir()
    again.restore(ck, tmp_path)
    replay = Feed(again)
    replay("impressions", 100.0, imp())           # offset 0 < consumed: replayed, labels restored
    replay.offsets["events"] = 0
    replay("events", 101.0, ev("e1", "watch", value=4.0))  # already joined: skipped
    replay("events", 102.0, ev("e2", "watch", value=1.0))  # new
    again.advance(200.0, idle=True)
    (row,) = again.take_outputs()["examples"]
    assert row["watch_time"] == 5.0 and sorted(row["event_ids"]) == ["e1", "e2"]
    assert again.counters["duplicate_events"] == 0 and again.counters["replayed"] == 2
    assert again.counters["impressions"] == 1 and again.counters["events"] == 2


def test_rows_table_types_mixed_and_empty_columns():
    table = rows_table([{"a": 1, "b": "x", "c": [], "d": None, "e": {"k": 1}}, {"a": 2.5, "b": None, "c": [],
                                                                                 "d": None, "e": 3}])
    assert str(table.schema.field("a").type) == "double" and str(table.schema.field("c").type) == "list<item: string>"
    assert table.column("e").to_pylist() == ['{"k":1}', "3"]
    assert all(math.isnan(x) for x in table.column("d").to_numpy(zero_copy_only=False))


def test_joiner_config_errors_name_the_key():
    with pytest.raises(ValidationError) as exc:
        JoinerConfig.from_dict({"joiner": {"window_s": 0, "grace": 1, "topic": "impressions", "dedupe_ttl_s": 5,
                                           "consumer": "bad name"}})
    paths = {e.path for e in exc.value.errors}
    assert paths == {"joiner.window_s", "joiner.grace", "joiner.topic", "joiner.consumer", "joiner.dedupe_ttl_s"}
    with pytest.raises(ValidationError) as exc:
        JoinerConfig.from_dict({"joiner": {"window_s": 60, "dedupe_ttl_s": 30}})
    assert exc.value.errors[0].path == "joiner.dedupe_ttl_s"
    cfg = JoinerConfig.from_dict({"strategies": {"files": ["conf/objectives/other.yaml"]}, "joiner": {"topic": None}})
    assert cfg.objectives == "conf/objectives/other.yaml" and cfg.topic is None
