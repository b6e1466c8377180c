"""The Redis feature store against a real redis-server: pipelined, pre-aggregated chunks give the
same features as the memory store (also when a chunk turns out to be a partial replay), and the
dedupe keys are bounded by ``dedupe_max_keys``."""
import random
import uuid

import numpy as np
import pytest

from online.features import RedisStore, StoreOptions, open_store
from online.nearline import synthetic_stream

H = 1800.0


def redis_store(url, chunk=2000, **options):
    host_port, db = url[len("redis://"):].split("/")
    host, port = host_port.split(":")
    opts = StoreOptions(half_life_s=H, key_prefix=f"t{uuid.uuid4().hex[:8]}:", **options)
    return RedisStore(host, int(port), int(db), opts, chunk=chunk)


def same_features(a, b, imps, evs):
    items = sorted({r["item_id"] for r in imps + evs})
    creators = sorted({r["creator_id"] for r in imps + evs if "creator_id" in r})
    now = max(r["ts"] for r in evs) + 60
    fa, fb = a.lookup("nobody", items, creators, now=now), b.lookup("nobody", items, creators, now=now)
    for name in set(fa.item_totals) | set(fb.item_totals):
        exact = np.testing.assert_array_equal if not name.endswith("_sum") else \
            (lambda x, y, err_msg: np.testing.assert_allclose(x, y, rtol=1e-12, err_msg=err_msg))  # float sums
        exact(fa.item_totals[name], fb.item_totals[name], err_msg=name)  # counts: exact
        np.testing.assert_allclose(fa.item(name), fb.item(name), rtol=1e-9, err_msg=name)
        exact(fa.creator_totals[name], fb.creator_totals[name], err_msg=name)
        np.testing.assert_allclose(fa.creator(name), fb.creator(name), rtol=1e-9, err_msg=name)
    for user in sorted({r["user_id"] for r in evs}):
        ua, ub = a.lookup(user, [], [], now=now), b.lookup(user, [], [], now=now)
        assert ua.recent_items == ub.recent_items, user
        assert ua.topic_affinity.keys() == ub.topic_affinity.keys(), user
        for t in ua.topic_affinity:
            assert ua.topic_affinity[t] == pytest.approx(ub.topic_affinity[t], rel=1e-9, abs=1e-12)


def test_pipelined_chunks_with_partial_replays_match_the_memory_store(redis_server):
    imps, evs = synthetic_stream(3000, seed=5, users=40, items=300, creators=20, topics=7)
    recs = imps + evs
    random.Random(1).shuffle(recs)  # out of time order, impressions after their events
    for r in recs[::7]:  # some events lack creator / topic: resolved from the item's impressions
        if "type" in r:
            r.pop("creator_id", None)
            r.pop("topic", None)
    mem = open_store("memory://", half_life_s=H)
    red = redis_store(redis_server, chunk=100)
    try:
        # applied before (by a consumer that crashed before committing): chunks 2-3 and a stray record
        assert red.apply(recs[150:300] + recs[1000:1001]) == mem.apply(recs[150:300] + recs[1000:1001])
        new_r, new_m = red.apply(recs), mem.apply(recs)
        assert new_r == new_m > len(recs) - 500  # (a few impressions repeat a request's item)
        assert red.stats["replayed_chunks"] >= 3
        assert red.apply(recs[:500]) == 0  # a full replay
        assert red.applied_total() == mem.stats["applied"]
        same_features(red, mem, imps, evs)
    finally:
        red.close()


def test_the_dedupe_keys_are_bounded_oldest_first(redis_server):
    store = redis_store(redis_server, chunk=500, dedupe_max_keys=1000)
    ev = [{"event_id": f"e{i}", "type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.7e9 + i}
          for i in range(20_000)]
    try:
        for lo in range(0, len(ev), 2000):
            assert store.apply(ev[lo:lo + 2000]) == 2000
            assert store.client.zcard(store.options.key_prefix + "dedupe") <= 1000
        assert store.apply(ev[-1000:]) == 0  # the newest 1000 are remembered
        assert store.apply(ev[:10]) == 10  # older ones were forgotten: counted again
        assert store.lookup("u1", ["i1"]).item_totals["click"][0] == 20_010
        assert not store.client.keys(store.options.key_prefix + "e:*")  # no key per event any more
    finally:
        store.close()


def test_dedupe_keys_of_the_earlier_layout_are_honoured(redis_server):
    store = redis_store(redis_server)
    p = store.options.key_prefix
    store.client.set(p + "applied", 3)  # written by the previous version: one string key per record
    for i in range(3):
        store.client.set(f"{p}e:e{i}", "1", ex=3600)
    ev = [{"event_id": f"e{i}", "type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.7e9 + i}
          for i in range(10)]
    try:
        assert store.apply(ev) == 7
        assert store.apply(ev) == 0
    finally:
        store.close()


def test_a_flushed_script_cache_is_reloaded(redis_server):
    store = redis_store(redis_server, chunk=50)
    ev = [{"event_id": f"e{i}", "type": "like", "user_id": "u1", "item_id": f"i{i}", "ts": 1.7e9 + i}
          for i in range(300)]
    try:
        assert store.apply(ev[:100]) == 100
        store.client.script_flush()
        assert store.apply(ev) == 200
        assert store.lookup("u1", []).recent_items[:3] == ["i299", "i298", "i297"]
    finally:
        store.close()


def test_a_nearline_run_into_redis_reports_its_lag_to_the_scorer(redis_server, tmp_path):
    """The near-line process records where it stands in Redis; a scorer worker (another process in
    production) reads it for stratarank_nearline_lag_seconds: 0 while caught up, the age of the
    newest applied event once the consumer has gone quiet for longer than PROGRESS_STALE_S."""
    import time

    from online.app import PROGRESS_STALE_S, nearline_lag
    from online.bus import open_bus
    from online.nearline import BusConfig, NearlineConfig, run_nearline

    store = redis_store(redis_server)
    bus = open_bus(f"embedded://{tmp_path / 'bus'}")
    try:
        imps, evs = synthetic_stream(2000, seed=3, start_ts=time.time() - 30, users=50, items=200)
        bus.publish("impressions", imps)
        bus.publish("events", evs)
        bus.flush()
        config = NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}"))
        stats = run_nearline(config, bus=bus, store=store, max_idle_s=1.5, startup_grace_s=1.5)
        assert stats.records == len(imps) + len(evs) and stats.caught_up
        [progress] = store.nearline_progress()
        assert progress["consumer"] == config.nearline.consumer and progress["caught_up"]
        assert progress["newest_ts"] == evs[-1]["ts"] or progress["newest_ts"] == imps[-1]["ts"]
        assert nearline_lag(progress) == 0.0
        later = progress["updated_at"] + PROGRESS_STALE_S + 1   # the consumer died, or the stream stopped
        assert nearline_lag(progress, now=later) == pytest.approx(later - progress["newest_ts"])
    finally:
        bus.close()
        store.close()


def test_top_items_match_the_memory_store_at_any_time_and_a_replay_changes_nothing(redis_server):
    imps, evs = synthetic_stream(3000, seed=8, users=40, items=300, creators=20, topics=7)
    evs += [{"event_id": "w0", "type": "watch", "user_id": "u1", "item_id": "i0", "ts": 1.7e9, "value": 0.0},
            {"event_id": "w1", "type": "watch", "user_id": "u1", "item_id": "neg", "ts": 1.7e9, "value": -3.0}]
    recs = imps + evs
    random.Random(2).shuffle(recs)
    mem = open_store("memory://", half_life_s=H)
    red = redis_store(redis_server, chunk=100)
    end = max(r["ts"] for r in recs)
    try:
        assert red.apply(recs) == mem.apply(recs)

        def same(counter, n, now):
            got, want = red.top_items(counter, n, now=now), mem.top_items(counter, n, now=now)
            assert [i for i, _ in got] == [i for i, _ in want], (counter, n, now)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12), (counter, n, now)
            return got

        for counter in ("impressions", "click", "like", "watch_sum"):
            for now in (end - 600, end, end + 5 * H):
                top = same(counter, 25, now)
                assert len(top) == 25 and all(a[1] >= b[1] for a, b in zip(top, top[1:]))
        every = same("watch_sum", 1000, end)
        assert "neg" not in dict(every) and len(every) == 300   # "neg": a negative sum, not ranked
        before = red.top_items("click", 50, now=end)
        assert red.apply(recs[500:900]) == 0 and red.stats["replayed_chunks"] >= 1
        assert red.top_items("click", 50, now=end) == before
        assert red.top_items("click", 0, now=end) == [] and red.top_items("share_x", 5, now=end) == []
    finally:
        red.close()


def test_a_top_set_keeps_the_best_top_keep_items(redis_server):
    from online.features.base import TOP_KEEP

    ev = [{"event_id": f"e{k}", "type": "click", "user_id": "u", "item_id": f"i{k:05d}", "ts": 1.7e9 + k}
          for k in range(TOP_KEEP + 500)]   # one click each, later ones worth more
    mem = open_store("memory://", half_life_s=H)
    red = redis_store(redis_server, chunk=3000)
    try:
        assert red.apply(ev) == mem.apply(ev) == len(ev)
        assert red.client.zcard(red.options.key_prefix + "top:click") == TOP_KEEP
        got = red.top_items("click", 2 * TOP_KEEP, now=1.7e9 + len(ev))
        assert len(got) == TOP_KEEP and got[0][0] == f"i{len(ev) - 1:05d}" and got[-1][0] == "i00500"
        want = mem.top_items("click", TOP_KEEP, now=1.7e9 + len(ev))
        assert [i for i, _ in got] == [i for i, _ in want]
    finally:
        red.close()


def test_co_engagement_matches_the_memory_store_and_a_replay_counts_nothing(redis_server):
    imps, evs = synthetic_stream(6000, seed=9, users=30, items=120, creators=20, topics=7)
    recs = imps + evs
    random.Random(3).shuffle(recs)   # out of time order: late engagements decay themselves to the pair's time
    mem = open_store("memory://", half_life_s=H, recent_items=8, co_neighbours=1000)
    red = redis_store(redis_server, chunk=150, recent_items=8, co_neighbours=1000)
    end = max(r["ts"] for r in recs)
    try:
        assert red.apply(recs[300:700]) == mem.apply(recs[300:700])   # then replayed inside the full batch
        assert red.apply(recs) == mem.apply(recs)
        assert red.stats["replayed_chunks"] >= 2
        seeds = [["i3"], ["i7", "i11", "i7"], [f"i{k}" for k in range(0, 120, 9)], ["nobody"]]
        for items in seeds:
            for now in (end, end + 3 * H):
                got, want = red.co_engaged(items, 30, now=now), mem.co_engaged(items, 30, now=now)
                assert got == want, (items, now)   # the same operations on the same doubles
                assert not set(items) & {i for i, _ in got}
        assert len(mem.co_engaged(["i3"], 30, now=end)) == 30 and mem.co_engaged(["nobody"], 5) == []
        before = red.co_engaged(["i3", "i5"], 50, now=end)
        assert red.apply(recs[2000:2600]) == 0 and red.co_engaged(["i3", "i5"], 50, now=end) == before
    finally:
        red.close()


def test_co_neighbours_bounds_every_item_s_set_in_both_stores_keeping_the_strongest(redis_server):
    ev = [{"event_id": f"e{k}", "type": "click", "user_id": f"u{k // 10}", "item_id": f"i{k % 40}",
           "ts": 1.7e9 + k} for k in range(2000)]   # each user engages 10 items: 45 pairs a user
    # hub: once with each of a0..a9, later ones stronger; a9 twice (two users)
    ev += [{"event_id": f"h{k}-{n}-{item}", "type": "like", "user_id": f"h{k}-{n}", "item_id": item, "ts": 1.8e9 + k}
           for k in range(10) for n in range(1 + (k == 9)) for item in ("hub", f"a{k}")]
    mem = open_store("memory://", half_life_s=H, co_neighbours=5)
    red = redis_store(redis_server, chunk=200, co_neighbours=5)
    try:
        assert red.apply(ev) == mem.apply(ev)
        p = red.options.key_prefix
        for k in range(40):
            assert red.client.zcard(f"{p}co:i{k}") == 5 and len(mem.co[f"i{k}"]) == 5
        now = 1.8e9 + 10
        for store in (red, mem):
            hub = store.co_engaged(["hub"], 50, now=now)
            assert [i for i, _ in hub] == ["a9", "a8", "a7", "a6", "a5"]
            assert hub[0][1] == pytest.approx(2 * 2 ** (-1 / H)) and hub[1][1] == pytest.approx(2 ** (-2 / H))
            assert store.co_engaged(["a3"], 5, now=now) == [("hub", pytest.approx(2 ** (-7 / H)))]
    finally:
        red.close()
