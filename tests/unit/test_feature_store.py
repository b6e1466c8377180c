"""The real-time feature store (memory backend), its config and the in-process near-line loop.
The Redis backend is checked against the same expectations in tests/integration."""
import random
import threading
import time

import numpy as np
import pytest

from online.bus import open_bus
from online.features import MemoryStore, open_store
from online.nearline import NearlineConfig, NearlineThread, run_nearline, synthetic_stream
from strategy.errors import ValidationError

T0 = 1.7e9
H = 3600.0


def imp(req, item, user="u1", ts=T0, creator=None, topic=None):
    rec = {"request_id": req, "item_id": item, "user_id": user, "ts": ts, "position": 0}
    if creator:
        rec["creator_id"] = creator
    if topic:
        rec["topic"] = topic
    return rec


def ev(eid, etype, item, user="u1", ts=T0, value=None, **extra):
    rec = {"event_id": eid, "type": etype, "item_id": item, "user_id": user, "ts": ts, **extra}
    if value is not None:
        rec["value"] = value
    return rec


def test_apply_counts_once_per_event_id_and_per_request_item():
    store = open_store("memory://", half_life_s=H)
    batch = [imp("r1", "a", creator="c1", topic="cats"), imp("r1", "b"), ev("e1", "click", "a"),
             ev("e2", "watch", "a", value=12.5)]
    assert store.apply(batch) == 4
    assert store.apply(batch + [imp("r2", "a")]) == 1  # a replay counts nothing; r2 is a new impression
    f = store.lookup("u1", ["a", "b", "zzz"], ["c1", None, "c1"], now=T0)
    assert f.item_totals["impressions"].tolist() == [2.0, 1.0, 0.0]
    assert f.item("click").tolist() == [1.0, 0.0, 0.0]
    assert f.item("watch_sum").tolist() == [12.5, 0.0, 0.0]
    # events without a creator are attributed through the item's impressions
    assert f.creator("click").tolist() == [1.0, 0.0, 1.0]
    assert f.creator("impressions").tolist() == [2.0, 0.0, 2.0]
    assert f.recent_items == ["a"]
    assert f.topic_affinity == {"cats": 1.0 + 1.0}  # click 1 + watch 1
    assert len(f.item("never_seen_type")) == 3 and f.n_items == 3


def test_counters_decay_with_the_half_life():
    store = open_store("memory://", half_life_s=H)
    store.apply([ev("e1", "click", "a", ts=T0), ev("e2", "click", "a", ts=T0 + H)])
    f = store.lookup("u1", ["a"], now=T0 + 2 * H)
    assert f.item("click")[0] == pytest.approx(0.25 + 0.5)
    assert f.item_totals["click"][0] == 2.0
    assert store.lookup("u1", ["a"], now=T0 - 10).item("click")[0] == pytest.approx(1.5)  # never grows


def test_the_result_does_not_depend_on_arrival_order():
    imps, evs = synthetic_stream(3000, seed=3, users=20, items=200, creators=15, topics=6)
    batch = imps + evs
    a, b = MemoryStore(), MemoryStore()
    a.apply(batch)
    shuffled = batch[:]
    random.Random(0).shuffle(shuffled)
    b.apply(shuffled)
    items = [f"i{k}" for k in range(200)]
    creators = [f"c{k % 15}" for k in range(200)]
    now = max(e["ts"] for e in evs) + 100
    for user in ("u0", "u5", "u19"):
        fa, fb = a.lookup(user, items, creators, now=now), b.lookup(user, items, creators, now=now)
        assert fa.recent_items == fb.recent_items
        assert fa.topic_affinity.keys() == fb.topic_affinity.keys()
        for k in fa.topic_affinity:
            assert fa.topic_affinity[k] == pytest.approx(fb.topic_affinity[k], rel=1e-12)
        for name in fa.item_counters:
            np.testing.assert_array_equal(fa.item_totals[name], fb.item_totals[name]) if name != "watch_sum" else None
            np.testing.assert_allclose(fa.item(name), fb.item(name), rtol=1e-12)
            np.testing.assert_allclose(fa.creator(name), fb.creator(name), rtol=1e-12)


def test_recent_items_keeps_the_last_50_distinct_most_recent_first():
    store = open_store("memory://", recent_items=50)
    store.apply([ev(f"e{i}", "like", f"i{i % 60}", ts=T0 + i) for i in range(120)])
    store.apply([ev("old", "click", "i0", ts=T0 - 5), ev("rep", "report", "i99", ts=T0 + 999)])
    f = store.lookup("u1", [])
    assert f.recent_items == [f"i{k}" for k in range(59, 9, -1)]  # report does not engage


def test_recent_items_are_the_newest_per_item_whatever_the_order_and_batching():
    """The store trims a user's items lazily (at twice the cap); readers must still get exactly the
    ``recent_items`` newest by each item's latest engagement, for any arrival order and batch size."""
    rng = random.Random(7)
    evs = [ev(f"e{i}", "click", f"i{rng.randrange(40)}", ts=T0 + rng.randrange(500)) for i in range(2000)]
    latest: dict = {}
    for e in evs:
        latest[e["item_id"]] = max(latest.get(e["item_id"], 0), e["ts"])
    want = [i for i, _ in sorted(latest.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:4]]
    for seed, size in ((0, 1), (1, 7), (2, 2000)):
        order = evs[:]
        random.Random(seed).shuffle(order)
        store = open_store("memory://", recent_items=4)
        for k in range(0, len(order), size):
            store.apply(order[k:k + size])
        assert store.lookup("u1", []).recent_items == want
        assert len(store.recent["u1"]) <= 8                       # bounded: twice the cap at most


def test_invalid_records_are_skipped_and_counted():
    store = open_store("memory://")
    assert store.apply([{"type": "click"}, ev("e1", "click", "a", ts="not a time"), "x",
                        ev("e2", "click", "a", ts="2026-01-01T00:00:00Z")]) == 1
    assert store.stats["invalid"] == 3


def test_snapshot_and_restore_then_a_replay_counts_nothing(tmp_path):
    path = tmp_path / "features.json"
    imps, evs = synthetic_stream(2000, seed=1)
    store = open_store(f"memory://{path}")
    store.apply(imps + evs)
    store.snapshot()
    restored = open_store(f"memory://{path}")
    assert restored.apply(evs[:500] + imps[:500]) == 0
    items = sorted({e["item_id"] for e in evs})[:100]
    a, b = store.lookup("u1", items, now=T0 + 1e4), restored.lookup("u1", items, now=T0 + 1e4)
    for name in a.item_counters:
        np.testing.assert_array_equal(a.item(name), b.item(name))


def test_a_version_1_snapshot_restores_and_is_rewritten_as_version_2(tmp_path):
    """The earlier store's snapshot (per entity [total, decayed, time] lists) restores; the snapshot
    written next is version 2 (by column) and restores to the same state."""
    import json

    path = tmp_path / "features.json"
    far = time.time() + 86400
    state = {"version": 1, "written": T0, "half_life_s": H,
             "items": {"a": {"impressions": [3.0, 2.5, T0], "click": [2.0, 1.5, T0 + H]}},
             "creators": {"c1": {"click": [2.0, 2.0, T0]}}, "meta": {"a": ["c1", "cats"], "b": [None, "dogs"]},
             "recent": {"u1": {"a": T0 + H}}, "affinity": {"u1": {"cats": [4.0, T0]}},
             "seen": {"e:e1": far}, "stats": {"applied": 5, "duplicates": 0, "invalid": 0, "dedupe_evicted": 0}}
    path.write_text(json.dumps(state))
    store = open_store(f"memory://{path}", half_life_s=H)

    def check(s):
        f = s.lookup("u1", ["a", "b"], ["c1", None], now=T0 + 2 * H)
        assert f.item_totals["impressions"].tolist() == [3.0, 0.0] and f.item_totals["click"].tolist() == [2.0, 0.0]
        assert f.item("click")[0] == pytest.approx(0.75) and f.item("impressions")[0] == pytest.approx(2.5 / 4)
        assert f.creator("click").tolist() == pytest.approx([0.5, 0.0])
        assert f.recent_items == ["a"] and f.topic_affinity == {"cats": pytest.approx(1.0)}
        assert s.apply([ev("e1", "click", "a")]) == 0  # its dedupe key came back too

    check(store)
    store.snapshot()
    assert json.loads(path.read_text())["version"] == 2
    check(open_store(f"memory://{path}", half_life_s=H))
    assert store.apply([ev("e2", "click", "b", ts=T0 + 2 * H)]) == 1  # b's topic is known from the old meta
    assert store.lookup("u1", [], now=T0 + 2 * H).topic_affinity["dogs"] == pytest.approx(1.0)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(version=7), "version 1 or 2 (version: 7)"),
    (lambda s: s["items"]["click"][1].pop(), "columns of different lengths"),
    (lambda s: s.pop("seen"), "malformed version-2 snapshot (KeyError"),
])
def test_a_damaged_snapshot_is_reported_not_half_restored(tmp_path, edit, needle):
    import json

    path = tmp_path / "features.json"
    store = open_store(f"memory://{path}")
    store.apply([imp("r1", "a", creator="c1", topic="t"), ev("e1", "click", "a")])
    store.snapshot()
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    with pytest.raises(ValidationError) as exc:
        open_store(f"memory://{path}")
    assert exc.value.errors[0].path == "store.snapshot_path" and needle in str(exc.value)


def test_the_state_is_invisible_to_the_cyclic_garbage_collector():
    """Every container of the store holds only strings and numbers: Python's cyclic GC tracks none of
    them, so a full collection takes as long with a million items as with none (each counter used to
    be a list, and a full collection walked them all)."""
    import gc

    store = open_store("memory://")
    store.apply([imp("r", "i", creator="c", topic="t"), ev("e", "watch", "i", value=1.0)])  # the tables exist
    gc.collect()
    before = len(gc.get_objects())
    n = 3000
    batch = [imp(f"r{i}", f"i{i}", user=f"u{i}", creator=f"c{i}", topic=f"t{i % 7}") for i in range(n)]
    batch += [ev(f"e{i}", "watch", f"i{i}", user=f"u{i}", value=2.0) for i in range(n)]
    assert store.apply(batch) == 2 * n
    del batch
    gc.collect()
    assert len(gc.get_objects()) - before < 20  # the earlier layout: 33k more (~11 per item, creator, user)
    assert store.lookup("u7", ["i7"], ["c7"], now=T0).item_totals["watch_sum"].tolist() == [2.0]


@pytest.mark.parametrize("url, needle", [("memcached://x", "unknown scheme 'memcached'"),
                                         ("redis://h:notaport/0", "bad port"), ("nourl", "expected a URL")])
def test_bad_store_urls_name_the_field(url, needle):
    with pytest.raises(ValidationError) as exc:
        open_store(url)
    assert exc.value.errors[0].path == "store.url" and needle in str(exc.value)


def test_nearline_config_reports_every_problem_with_a_suggestion():
    with pytest.raises(ValidationError) as exc:
        NearlineConfig.from_dict({
            "bus": {"url": "kafak://h:1", "fsnyc": "always"},
            "store": {"url": "memory://a.json", "snapshot_path": "b.json", "half_life_s": 0},
            "nearline": {"batch_size": 0, "topics": ["events", "Bad"], "poll_timeot_s": 1},
            "scorer": {"anything": "belongs to the lead"},
        }, source="service.yaml")
    text = str(exc.value)
    for needle in ("bus.url: unknown scheme 'kafak'; did you mean 'kafka'?",
                   "bus.fsnyc: unknown key 'fsnyc'; did you mean 'fsync'?",
                   "store.snapshot_path: 'b.json' disagrees", "store.half_life_s: 0 is out of range",
                   "nearline.batch_size: 0 is out of range", "nearline.topics[1]: 'Bad' must match",
                   "nearline.poll_timeot_s: unknown key 'poll_timeot_s'; did you mean 'poll_timeout_s'?"):
        assert needle in text
    assert all(e.file == "service.yaml" for e in exc.value.errors)
    assert "scorer" not in text


def test_shipped_service_yaml_is_valid(root):
    cfg = NearlineConfig.load(root / "conf" / "service.yaml")
    assert cfg.bus.url.startswith(("embedded://", "kafka://")) and cfg.nearline.batch_size > 0


def test_nearline_applies_then_commits_after_the_snapshot(tmp_path):
    cfg = NearlineConfig.from_dict({
        "bus": {"url": f"embedded://{tmp_path / 'bus'}"},
        "store": {"url": "memory://", "snapshot_path": str(tmp_path / "f.json"), "snapshot_interval_s": 0.05},
        "nearline": {"batch_size": 700, "poll_timeout_s": 0.01},
    })
    imps, evs = synthetic_stream(5000, seed=2)
    with cfg.bus.open() as bus:
        bus.publish("impressions", imps)
        bus.publish("events", evs)
    stats = run_nearline(cfg, max_idle_s=0.2)
    assert stats.records == len(imps) + len(evs) and stats.commits >= 1 and stats.snapshots >= 1
    stats2 = run_nearline(cfg, max_idle_s=0.1, startup_grace_s=0.1)  # everything was committed: nothing again
    assert stats2.records == 0
    store = cfg.store.open()
    assert store.apply(evs[:10]) == 0  # restored from the snapshot


def test_nearline_thread_feeds_a_shared_store_within_a_second(tmp_path):
    cfg = NearlineConfig.from_dict({"bus": {"url": f"embedded://{tmp_path}"}, "nearline": {"poll_timeout_s": 0.02}})
    store = open_store("memory://")
    with open_bus(cfg.bus.url) as bus:
        worker = NearlineThread(cfg, bus=bus, store=store).start()
        try:
            time.sleep(0.1)
            t0 = time.monotonic()
            bus.publish("events", [ev("e1", "click", "hot", user="u7")])
            while store.lookup("u7", ["hot"]).item_totals["click"][0] == 0:
                assert time.monotonic() - t0 < 5, "the event never became visible"
                time.sleep(0.002)
        finally:
            worker.stop()
        assert worker.error is None and store.lookup("u7", []).recent_items == ["hot"]


def test_lookup_and_apply_run_concurrently():
    store = open_store("memory://")
    imps, evs = synthetic_stream(4000, seed=4)
    errors = []

    def reader():
        try:
            for _ in range(200):
                store.lookup("u1", ["i1", "i2"], ["c1", None])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    store.apply(imps + evs)
    t.join()
    assert not errors


def test_an_unreachable_redis_is_reported_as_store_unavailable():
    pytest.importorskip("redis")
    import socket

    from online.features import StoreUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StoreUnavailable, match="redis://127.0.0.1"):
        store.lookup("u1", ["a"], ["c"])
    with pytest.raises(StoreUnavailable):
        store.apply([ev("e1", "click", "a")])


def test_co_engagement_pairs_a_new_item_with_the_user_s_recent_ones_once():
    store = open_store("memory://", half_life_s=H, recent_items=2)
    store.apply([ev("e1", "click", "a"), ev("e2", "click", "b", ts=T0 + H), ev("e3", "like", "b", ts=T0 + H),
                 ev("e4", "report", "x", ts=T0 + H), ev("e5", "click", "c", ts=T0 + 2 * H),
                 ev("e6", "click", "d", ts=T0 + 3 * H)])   # like b: b is recent already; report: no engagement
    now = T0 + 3 * H
    assert store.co_engaged(["b"], 10, now=now) == [("d", pytest.approx(1.0)), ("c", pytest.approx(0.5)),
                                                    ("a", pytest.approx(0.25))]   # once each, decayed
    assert store.co_engaged(["a"], 10, now=now) == [("c", pytest.approx(0.5)), ("b", pytest.approx(0.25))]
    # d came when the window (2) held c and b: a is no longer paired; the seeds themselves are left out
    assert store.co_engaged(["c", "b"], 10, now=now) == [("d", pytest.approx(2.0)), ("a", pytest.approx(0.75))]
    assert store.co_engaged(["c"], 1, now=now) == [("d", pytest.approx(1.0))]
    assert store.co_engaged(["c"], 0, now=now) == [] and store.co_engaged(["zz"], 5, now=now) == []
    assert store.apply([ev("e6", "click", "d", ts=T0 + 3 * H)]) == 0
    assert store.co_engaged(["c", "b"], 10, now=now)[0] == ("d", pytest.approx(2.0))   # a replay adds nothing


def test_co_engagement_survives_a_snapshot_and_an_older_snapshot_restores_without_it(tmp_path):
    import json

    path = tmp_path / "features.json"
    store = open_store(f"memory://{path}", half_life_s=H)
    store.apply([ev(f"e{k}", "click", f"i{k % 5}", user=f"u{k % 3}", ts=T0 + k) for k in range(60)])
    store.snapshot()
    want = store.co_engaged(["i1", "i2"], 10, now=T0 + 100)
    assert len(want) == 3 and open_store(f"memory://{path}", half_life_s=H).co_engaged(["i1", "i2"], 10,
                                                                                     now=T0 + 100) == want
    state = json.loads(path.read_text())
    del state["co"]   # written before the store kept co-engagement
    path.write_text(json.dumps(state))
    older = open_store(f"memory://{path}", half_life_s=H)
    assert older.co_engaged(["i1"], 10, now=T0 + 100) == [] and older.lookup("u1", []).recent_items


@pytest.mark.parametrize("value", [0, -1, 1001, 2.5, True, "50"])
def test_a_bad_co_neighbours_is_named_with_its_range(value):
    with pytest.raises(ValidationError) as exc:
        open_store("memory://", co_neighbours=value)
    assert exc.value.errors[0].path == "store.co_neighbours" and "[1, 1000]" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        NearlineConfig.from_dict({"store": {"co_neighbours": value}})
    assert exc.value.errors[0].path == "store.co_neighbours"
    assert NearlineConfig.from_dict({"store": {"co_neighbours": 7}}).store.open().options.co_neighbours == 7
