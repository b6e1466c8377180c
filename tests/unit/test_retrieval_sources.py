"""Retrieval without a two-tower model: the strategy's retrieval: section, the pool's round robin, the
sources that need no vectors (fresh, trending) over a real corpus and store, and POST /v1/feed."""
import time

import numpy as np
import pytest

from online.ann import AnnIndex
from online.app import create_app
from online.config import service_config_from_dict
from online.corpus import Corpus, CorpusConfig
from online.features import FeatureStore, MemoryStore
from online.retrieval import RetrievalConfig, Retriever, fill_pool, interleave, retrieval_config_from_dict
from strategy import ValidationError, load_strategy, strategy_from_dict
from strategy.items import parse_items
from strategy.retrieval import DEFAULT_RETRIEVAL, RetrievalPlan, RetrievalSource, retrieval_from_dict
from strategy.errors import Errors
from strategy.schema import parse_feed, parse_retrieve

BASE = {"strategy": "s", "objectives": {"click": {"event": "click", "type": "binary", "weight": 1}}}


def plan(*sources, pool=None):
    srcs = tuple(RetrievalSource(name, count, max_share) for name, count, max_share in sources)
    return RetrievalPlan(srcs, pool or sum(s.count for s in srcs))


# ---------------------------------------------------------------- the strategy section


def test_a_retrieval_section_is_validated_with_file_lines(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("strategy: s\nobjectives:\n  click: {event: click, type: binary, weight: 1}\nretrieval:\n"
                    "  max_candidates: 5000\n  sources:\n    ann: {count: 10, max_share: 0}\n    fressh: {count: 3}\n"
                    "    fresh: {count: 2, llm_share: 2, seeds: 3}\n    trending: {counter: Click}\n")
    with pytest.raises(ValidationError) as exc:
        load_strategy(path)
    got = {(e.path, e.line) for e in exc.value.errors}
    assert got == {("retrieval.max_candidates", 5), ("retrieval.sources.ann.max_share", 7),
                   ("retrieval.sources.fressh", 8), ("retrieval.sources.fresh.seeds", 9),
                   ("retrieval.sources.fresh.llm_share", 9), ("retrieval.sources.trending.count", 10),
                   ("retrieval.sources.trending.counter", 10)}
    assert "did you mean 'fresh'" in str(exc.value)


def test_co_engaged_takes_seeds_like_similar_and_nothing_else(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("strategy: s\nobjectives:\n  click: {event: click, type: binary, weight: 1}\nretrieval:\n"
                    "  sources:\n    co_engaged: {count: 5, seeds: 0}\n    similar: {count: 5, seeds: 51}\n"
                    "    trending: {count: 5}\n    co_engagd: {count: 1}\n    explore: {count: 1, seeds: 2}\n")
    with pytest.raises(ValidationError) as exc:
        load_strategy(path)
    assert {(e.path, e.line) for e in exc.value.errors} == {
        ("retrieval.sources.co_engaged.seeds", 6), ("retrieval.sources.similar.seeds", 7),
        ("retrieval.sources.co_engagd", 9), ("retrieval.sources.explore.seeds", 10)}
    assert "did you mean 'co_engaged'" in str(exc.value)
    ok = retrieval_from_dict(Errors(), {"sources": {"co_engaged": {"count": 7, "seeds": 2, "max_share": 0.5}}})
    assert ok.source("co_engaged") == RetrievalSource("co_engaged", 7, 0.5, seeds=2) and ok.max_candidates == 7
    assert DEFAULT_RETRIEVAL.source("co_engaged").count == DEFAULT_RETRIEVAL.source("similar").count == 30
    assert DEFAULT_RETRIEVAL.max_candidates == 400 < sum(s.count for s in DEFAULT_RETRIEVAL.sources)


def test_counts_past_the_request_limit_need_max_candidates_and_all_zero_is_refused():
    errs = Errors()
    assert retrieval_from_dict(errs, {"sources": {"ann": {"count": 1500}, "fresh": {"count": 600}}}) is None
    assert "set max_candidates" in errs.items[0].message
    errs = Errors()
    assert retrieval_from_dict(errs, {"sources": {"ann": {"count": 0}}}) is None
    assert "every count is 0" in errs.items[0].message
    ok = retrieval_from_dict(Errors(), {"max_candidates": 300, "sources": {"ann": {"count": 1500},
                                                                          "fresh": {"count": 600}}})
    assert ok.max_candidates == 300 and [s.name for s in ok.sources] == ["ann", "fresh"]


def test_an_override_of_one_source_keeps_the_default_others():
    s = strategy_from_dict(BASE)
    assert s.retrieval is None
    v = s.with_overrides({"retrieval.sources.fresh.count": 150})
    assert v.retrieval.source("fresh").count == 150
    assert [x.name for x in v.retrieval.sources] == [x.name for x in DEFAULT_RETRIEVAL.sources]
    assert v.retrieval.source("ann") == DEFAULT_RETRIEVAL.source("ann")
    with pytest.raises(ValidationError, match="retrieval.sources.fresh.count"):
        s.with_overrides({"retrieval.sources.fresh.count": -1})


# ---------------------------------------------------------------- the pool


def test_the_pool_takes_one_item_per_source_in_turn_and_credits_every_finder():
    lists = {"ann": ["a1", "a2", "x", "a3"], "fresh": ["x", "f1", "f2"], "explore": ["e1", "a1"]}
    ids, sources, credited = fill_pool(plan(("ann", 4, 1), ("fresh", 3, 1), ("explore", 2, 1), pool=6), lists)
    assert ids == ["a1", "x", "e1", "a2", "f1", "a3"]   # ann, fresh, explore, ann, fresh, ann (explore ran out)
    assert dict(zip(ids, sources))["a1"] == ["ann", "explore"]
    assert dict(zip(ids, sources))["x"] == ["fresh", "ann"]      # first finder first, then in plan order
    assert credited == {"ann": 3, "fresh": 2, "explore": 1}


def test_max_share_caps_what_a_source_brings_in_and_the_others_fill_the_pool():
    lists = {"fresh": [f"f{i}" for i in range(50)], "ann": [f"a{i}" for i in range(50)]}
    ids, _, credited = fill_pool(plan(("fresh", 50, 0.2), ("ann", 50, 1), pool=20), lists)
    assert len(ids) == 20 and credited == {"fresh": 4, "ann": 16}


def test_interleave_takes_ranks_across_rows_once_each():
    assert interleave([["a", "b", "c"], ["b", "d"], []]) == ["a", "b", "d", "c"]


# ---------------------------------------------------------------- parts the sources read


def test_index_vectors_of_and_a_uniform_sample_skip_removed_items():
    index = AnnIndex(4, kind="flat", compact_fraction=None)
    vecs = np.eye(4, dtype=np.float32)
    index.add(["a", "b", "c", "d"], vecs)
    index.remove(["b"])
    found, got = index.vectors_of(["d", "b", "zz", "a"])
    assert found == ["d", "a"] and np.array_equal(got, vecs[[3, 0]])
    rng = np.random.default_rng(0)
    draws = [tuple(sorted(index.sample(2, rng))) for _ in range(300)]
    assert all(len(set(d)) == 2 and "b" not in d for d in draws)
    counts = {i: sum(i in d for d in draws) for i in "acd"}
    assert min(counts.values()) > 150   # each live item in about 2/3 of the draws
    assert sorted(index.sample(10, rng)) == ["a", "c", "d"]


def test_top_items_rank_by_the_counter_decayed_to_now():
    store = MemoryStore()
    now = time.time()
    old = [{"event_id": f"o{k}", "type": "click", "user_id": "u", "item_id": "old", "ts": now - 10 * 3600}
           for k in range(20)]   # 20 clicks ten half-lives ago: worth 0.02 now
    new = [{"event_id": f"n{k}", "type": "click", "user_id": "u", "item_id": "new", "ts": now - 60} for k in range(2)]
    store.apply(old + new + [{"event_id": "l", "type": "like", "user_id": "u", "item_id": "liked", "ts": now}])
    top = store.top_items("click", 5, now=now)
    assert [i for i, _ in top] == ["new", "old"]
    assert top[1][1] == pytest.approx(20 * 2 ** -10, rel=1e-6)
    assert store.top_items("like", 5, now=now)[0][0] == "liked" and store.top_items("share", 5) == []


# ---------------------------------------------------------------- request bodies


@pytest.mark.parametrize("body, path", [
    ({"user_id": "u", "candidates": []}, "candidates"), ({}, "user_id"), ({"user_id": 7}, "user_id"),
    ({"user_id": "u", "slate_size": 0}, "slate_size"), ([], "")])
def test_feed_bodies_are_validated(body, path):
    with pytest.raises(ValidationError) as exc:
        parse_feed(body)
    assert exc.value.errors[0].path == path


@pytest.mark.parametrize("body, code", [
    ({}, "required"), ({"user_id": "u", "text": "t"}, "conflict"), ({"text": "  "}, "required"),
    ({"item_id": "i", "k": 0}, "range"), ({"item_id": "i", "k": 1.5}, "type"), ({"text": "x", "q": 1}, "unknown_key")])
def test_retrieve_bodies_name_exactly_one_query(body, code):
    with pytest.raises(ValidationError) as exc:
        parse_retrieve(body)
    assert exc.value.errors[0].code == code
    assert parse_retrieve({"text": "garlic", "k": 5}).k == 5


# ---------------------------------------------------------------- sources over a real corpus


@pytest.fixture
def corpus(tmp_path):
    c = Corpus(CorpusConfig(path=str(tmp_path / "corpus.db")))
    yield c
    c.close()


def write(corpus, now, n=30, **extra):
    items = [{"item_id": f"i{k}", "source": "llm" if k % 3 == 0 else "human", "topic": f"t{k % 4}",
              "creator_id": f"c{k % 5}", "text": f"word{k % 7} hello", "created_at": now - k * 600,
              **({"generator": {"model": "g", "prior_score": 0.6}} if k % 3 == 0 else {}), **extra}
             for k in range(n)]
    corpus.upsert(parse_items({"items": items}))


def test_fresh_takes_young_items_llm_first_and_never_blocked_expired_or_recent(corpus):
    now = time.time()
    write(corpus, now)   # i0 .. i29, one every 10 minutes back; llm: i0, i3, ...
    corpus.upsert(parse_items({"items": [{"item_id": "i3", "source": "llm", "blocked": True},
                                         {"item_id": "i6", "source": "llm", "expires_at": now + 0.5}]}))
    r = Retriever(RetrievalConfig(), corpus)
    r.sync()   # the fresh source reads the retriever's view of the corpus, as of its last sync
    fresh = RetrievalPlan((RetrievalSource("fresh", 6, llm_share=0.5, max_age_h=2.0),), 6)
    user = {"user_id": "u", "recent_items": ["i1"], "topic_affinity": {}}
    pool = r.retrieve(fresh, user, now=now)
    ids = [it.item_id for it in pool.items]
    assert ids == ["i0", "i6", "i9", "i2", "i4", "i5"]   # 3 llm (i3 blocked), then 3 human (i1 engaged), newest first
    assert all(created >= now - 7200 for created in (it.created_at for it in pool.items))
    later = r.retrieve(fresh, user, now=now + 1)
    assert "i6" not in [it.item_id for it in later.items]   # expired
    assert pool.unavailable == {} and pool.found == {"fresh": 6}


def test_trending_comes_from_the_store_and_items_outside_the_corpus_drop_out(corpus):
    now = time.time()
    write(corpus, now, n=10)
    store = MemoryStore()
    events = [{"event_id": f"e{k}-{item}", "type": "click", "user_id": f"u{k}", "item_id": item, "ts": now - 30}
              for item, clicks in (("i7", 5), ("gone", 9), ("i2", 3), ("i4", 1)) for k in range(clicks)]
    store.apply(events)
    r = Retriever(RetrievalConfig(), corpus, store=store)
    pool = r.retrieve(RetrievalPlan((RetrievalSource("trending", 3),), 3), {"user_id": "u0", "recent_items": ["i4"]},
                      now=now)
    assert [it.item_id for it in pool.items] == ["i7", "i2"]   # "gone" is not in the corpus, i4 was engaged
    assert pool.found == {"trending": 3}
    assert set(r.retrieve(DEFAULT_RETRIEVAL, {"user_id": "u"}, now=now).unavailable) == {"ann", "similar", "explore"}


def test_co_engaged_follows_the_user_s_recent_items_through_the_store(corpus):
    now = time.time()
    write(corpus, now, n=10)
    store = MemoryStore()
    sessions = [["i1", "i2"], ["i1", "i2"], ["i1", "i3"], ["i1", "gone"], ["i5", "i6"], ["i2", "i4"]]
    store.apply([{"event_id": f"e{u}-{k}", "type": "click", "user_id": f"u{u}", "item_id": item,
                  "ts": now - 100 + k} for u, items in enumerate(sessions) for k, item in enumerate(items)])
    r = Retriever(RetrievalConfig(), corpus, store=store)
    co = RetrievalPlan((RetrievalSource("co_engaged", 3, seeds=1),), 3)
    user = {"user_id": "me", "recent_items": ["i1", "i4"]}
    pool = r.retrieve(co, user, now=now)
    assert [it.item_id for it in pool.items] == ["i2", "i3"]   # "gone" is not in the corpus
    assert pool.found == {"co_engaged": 3} and pool.unavailable == {}
    two = r.retrieve(RetrievalPlan((RetrievalSource("co_engaged", 5, seeds=2),), 5), user, now=now)
    assert [it.item_id for it in two.items] == ["i2", "i3"]   # i2: with i1 twice and with i4; i4 is recent
    assert r.retrieve(co, {"user_id": "new"}, now=now).found == {"co_engaged": 0}   # no seeds: nothing
    no_store = Retriever(RetrievalConfig(), corpus).retrieve(co, user, now=now)
    assert no_store.unavailable == {"co_engaged": "no feature store"} and not no_store.items
    silent = Retriever(RetrievalConfig(), corpus, store=FeatureStore()).retrieve(co, user, now=now)
    assert silent.unavailable == {"co_engaged": "the store (FeatureStore) keeps no co-engagement"}


def test_feed_without_a_model_serves_fresh_items_through_the_rank_path(tmp_path):
    cfg = service_config_from_dict({"corpus": {"path": str(tmp_path / "c.db")},
                                    "bus": {"url": f"embedded://{tmp_path / 'bus'}"}})
    app = create_app(cfg)
    try:
        client = app.test_client()
        now = time.time()
        write(app.extensions["stratarank.corpus"], now)
        app.extensions["stratarank"].retriever.sync()   # what its sync thread does within sync_interval_s
        answer = client.post("/v1/feed", json={"user_id": "u1", "slate_size": 5}).get_json()
        assert len(answer["items"]) == 5 and all(i["retrieved_by"] == ["fresh"] for i in answer["items"])
        assert answer["retrieval"]["credited"] == {"fresh": 30}
        assert set(answer["retrieval"]["unavailable"]) == {"ann", "similar", "explore"}
        assert {"retrieval", "ranking", "fresh", "corpus"} <= set(answer["retrieval"]["timings_ms"])
        assert any(i["source"] == "llm" for i in answer["items"])   # feed.yaml's llm min_slots 1
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'stratarank_feed_candidates_total{source="fresh"} 30.0' in metrics
        assert 'stratarank_feed_stage_seconds_count{stage="ranking"} 1.0' in metrics
        assert client.post("/v1/feed", json={"user_id": "u1", "strategy": "nope"}).status_code == 404
        missing = client.post("/v1/retrieve", json={"text": "hello"})
        assert missing.status_code == 503 and missing.get_json()["error"]["code"] == "retrieval_unavailable"
    finally:
        app.extensions["stratarank"].close()


def test_the_fresh_memory_equals_the_corpus_through_writes_updates_blocks_and_expiry(corpus):
    """The retriever's own list of young items (what the fresh source walks) against the corpus's
    query, after every step of random writes, re-dated updates, blocks, unblocks and expiries."""
    rng = np.random.default_rng(7)
    clock = {"now": 1_800_000_000.0}
    corpus.clock = lambda: clock["now"]
    r = Retriever(RetrievalConfig(), corpus, clock=lambda: clock["now"])
    for step in range(40):
        writes = []
        for _ in range(int(rng.integers(1, 60))):
            k = int(rng.integers(0, 150))
            w = {"item_id": f"i{k}", "source": "llm" if k % 3 == 0 else "human",
                 "created_at": clock["now"] - float(rng.integers(0, 7200))}
            if k % 3 == 0:
                w["generator"] = {"model": "gen", "prior_score": 0.5}
            roll = rng.random()
            if roll < 0.1:
                w["blocked"] = True
            elif roll < 0.15:
                w["blocked"] = False
            if 0.15 <= roll < 0.3:
                w["expires_at"] = clock["now"] + float(rng.integers(1, 600))
            else:
                w["expires_at"] = None   # an earlier expiry may precede the new created_at: clear it
            writes.append(w)
        corpus.upsert(parse_items({"items": list({w["item_id"]: w for w in writes}.values())}))
        clock["now"] += float(rng.integers(0, 300))
        r.sync()
        since = clock["now"] - 3600.0
        for kind in ("llm", "human"):
            expected = [it.item_id for it in corpus.fresh(since, source=kind, limit=10_000, now=clock["now"])]
            got = r._youngest(r._state, kind, since, 10_000, set())
            assert sorted(got) == sorted(expected), (step, kind)
            times = [r._state.created[i][0] for i in got]
            assert times == sorted(times, reverse=True)
    assert r._state.stale <= max(1000, len(r._state.created))


def test_a_block_after_the_last_sync_drops_out_at_once_and_unsynced_items_are_read_whole(corpus):
    now = time.time()
    write(corpus, now, n=10)
    r = Retriever(RetrievalConfig(), corpus, store=MemoryStore())
    r.sync()
    fresh = RetrievalPlan((RetrievalSource("fresh", 10, llm_share=0.5, max_age_h=5.0),), 10)
    before = [it.item_id for it in r.retrieve(fresh, {"user_id": "u"}, now=now).items]
    assert "i1" in before and "i3" in before
    corpus.upsert(parse_items({"items": [{"item_id": "i1", "source": "human", "blocked": True},
                                         {"item_id": "i3", "source": "llm", "text": "rewritten"}]}))
    pool = r.retrieve(fresh, {"user_id": "u"}, now=now)            # no sync in between
    assert "i1" not in [it.item_id for it in pool.items]
    assert next(it for it in pool.items if it.item_id == "i3").text == "word3 hello"   # content as last synced
    r.sync()
    assert next(it for it in r.retrieve(fresh, {"user_id": "u"}, now=now).items
                if it.item_id == "i3").text == "rewritten"
    write(corpus, now, n=12)                                          # i10, i11: written, not synced yet
    assert set(r._servable(r._state, ["i11", "i1", "nope"], now)) == {"i11"}
    assert r._servable(r._state, ["i11"], now)["i11"].text == "word4 hello"


def test_an_item_retracted_by_a_past_expiry_leaves_the_index_and_the_fresh_lists(corpus):
    now = time.time()
    write(corpus, now, n=6)
    r = Retriever(RetrievalConfig(), corpus)
    r.sync()
    assert "i1" in r._state.items
    result = corpus.upsert(parse_items({"items": [{"item_id": "i1", "source": "human", "expires_at": now - 1}]}))
    assert result.expired == 1 and result.updated == 0
    assert corpus.get("i1") is None                        # hidden at once
    r.sync()
    assert "i1" not in r._state.items and "i1" not in r._youngest(r._state, "human", now - 86_400, 100, set())
    assert corpus.purge(now) == 1                          # and deleted by the purge


@pytest.mark.parametrize("freeze", [True, False])
def test_the_heap_is_frozen_after_the_first_bulk_sync_only_when_configured(corpus, freeze):
    import gc

    write(corpus, time.time(), n=20)
    gc.unfreeze()
    r = Retriever(RetrievalConfig(gc_freeze=freeze), corpus).start()
    try:
        deadline = time.monotonic() + 10
        while len(r._state.items) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        r.stop(timeout=30)   # joins the sync thread: the iteration that indexed the items has also frozen (or not),
        assert not r._thread.is_alive()   # however long its gc.collect() took on a busy machine
        assert len(r._state.items) == 20
        assert (gc.get_freeze_count() > 0) is freeze
    finally:
        r.stop()
        gc.unfreeze()
    with pytest.raises(ValidationError, match="retrieval.gc_freeze"):
        errs = Errors()
        retrieval_config_from_dict(errs, {"gc_freeze": "yes"})
        errs.raise_if_any()
