"""Retrieval with a trained two-tower model: corpus writes reach the index within seconds, blocked and
expired items leave it, a new model version is indexed in the background and swapped in whole, and
POST /v1/feed and /v1/retrieve serve from it."""
import time

import numpy as np
import pytest

from online.app import create_app
from online.config import service_config_from_dict
from online.corpus import Corpus, CorpusConfig
from online.retrieval import RetrievalConfig, Retriever, item_payload
from strategy.items import parse_items
from strategy.retrieval import DEFAULT_RETRIEVAL, RetrievalPlan, RetrievalSource


@pytest.fixture(scope="module")
def encoder(two_tower):
    from ranking.two_tower import load_two_tower

    return load_two_tower(two_tower["registry"], two_tower["name"])


@pytest.fixture
def corpus(tmp_path):
    c = Corpus(CorpusConfig(path=str(tmp_path / "corpus.db")))
    yield c
    c.close()


def catalogue_writes(world, n=None):
    cat = world.catalog().head(n) if n else world.catalog()
    return [{"item_id": r.item_id, "source": "llm" if r.source == "llm" else "human", "creator_id": r.creator_id,
             "topic": r.topic, "text": r.text,
             **({"generator": {"model": r.generator, "prior_score": float(r.prior_score)}} if r.source == "llm" else {})}
            for r in cat.itertuples(index=False)]


def test_written_items_are_retrievable_within_seconds_and_blocked_or_expired_ones_leave(encoder, corpus, two_tower):
    world = two_tower["world"]
    corpus.upsert(parse_items({"items": catalogue_writes(world)}))
    r = Retriever(RetrievalConfig(sync_interval_s=0.05), corpus, encoder).start()
    try:
        deadline = time.monotonic() + 30
        while r.status()["indexed"] < len(world.item_ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status()["indexed"] == len(world.item_ids)
        now = time.time()
        fresh = {"item_id": "brand-new", "source": "llm", "topic": world.topic_names[0], "creator_id": "c-new",
                 "text": world.catalog().query(f"topic == '{world.topic_names[0]}'")["text"].iloc[0],
                 "generator": {"model": "sim-gpt-large", "prior_score": 0.7}, "created_at": now}
        t0 = time.monotonic()
        corpus.upsert(parse_items({"items": [fresh]}))
        query = encoder.encode_text(fresh["text"])
        while "brand-new" not in r._state.index and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert time.monotonic() - t0 < 5, "a written item was not indexed within 5 s"
        found, scores = r.similar(text=fresh["text"], k=10)
        assert "brand-new" in [it.item_id for it in found]   # its content alone gives it a vector near its text
        assert np.all(np.diff(scores) <= 1e-6)
        near, _ = r.similar(item_id="brand-new", k=10)
        assert "brand-new" not in [it.item_id for it in near]
        assert sum(it.topic == fresh["topic"] for it in near) >= 5, [it.topic for it in near]
        corpus.upsert(parse_items({"items": [{"item_id": "brand-new", "source": "llm", "blocked": True},
                                             {"item_id": world.item_ids[0], "source": "human",
                                              "expires_at": time.time() + 0.3}]}))
        deadline = time.monotonic() + 5
        while ("brand-new" in r._state.index or world.item_ids[0] in r._state.index) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "brand-new" not in r._state.index and world.item_ids[0] not in r._state.index
        assert query.shape == (encoder.dim,)
    finally:
        r.stop()


def test_each_source_and_the_blend_answer_a_user(encoder, corpus, two_tower):
    world = two_tower["world"]
    corpus.upsert(parse_items({"items": catalogue_writes(world)}))
    r = Retriever(RetrievalConfig(), corpus, encoder)
    r.sync()
    recent = list(two_tower["logs"].query("click == 1")["item_id"].iloc[:3])
    user = {"user_id": world.user_ids[0], "recent_items": recent, "topic_affinity": {world.topic_names[1]: 2.0}}
    pool = r.retrieve(DEFAULT_RETRIEVAL, user)
    assert pool.unavailable == {"co_engaged": "no feature store", "trending": "no feature store"}
    assert {"ann", "similar", "fresh", "explore"} <= set(pool.credited)
    ids = [it.item_id for it in pool.items]
    assert len(ids) == len(set(ids)) and not set(recent) & set(ids)
    assert max(pool.found.values()) <= len(ids) <= DEFAULT_RETRIEVAL.max_candidates   # overlaps count once
    assert sum(pool.credited.values()) == len(ids)
    ann = r.retrieve(RetrievalPlan((RetrievalSource("ann", 50),), 50), user)
    vectors = encoder.encode_items([item_payload(it) for it in ann.items])
    scores = vectors @ encoder.encode_users([user])[0]
    assert np.all(np.diff(scores) <= 1e-4)   # best first, by the user's vector


def test_a_new_model_version_is_indexed_in_the_background_and_swapped_in_whole(encoder, corpus, two_tower):
    from ranking.two_tower import load_two_tower

    world = two_tower["world"]
    corpus.upsert(parse_items({"items": catalogue_writes(world, 200)}))
    pointer = {"v": "one"}
    r = Retriever(RetrievalConfig(), corpus, encoder, load_encoder=lambda: load_two_tower(
        two_tower["registry"], two_tower["name"]), pointer=lambda: pointer["v"])
    r.sync()
    before = r._state
    pointer["v"] = "two"
    assert r.follow_model()
    r._rebuilding.join(30)
    assert r._state is not before and r.rebuilds == 1
    assert len(r._state.index) == 200 and r._state.encoder is not before.encoder
    assert not r.follow_model()   # the pointer did not move again


def test_feed_and_retrieve_endpoints_serve_from_the_index(two_tower, tmp_path):
    world = two_tower["world"]
    cfg = service_config_from_dict({
        "corpus": {"path": str(tmp_path / "c.db")}, "bus": {"url": f"embedded://{tmp_path / 'bus'}"},
        "retrieval": {"model": two_tower["name"], "registry": two_tower["registry"], "sync_interval_s": 0.05}})
    app = create_app(cfg)
    scorer = app.extensions["stratarank"]
    try:
        client = app.test_client()
        assert client.post("/v1/items", json={"items": catalogue_writes(world, 300)}).status_code == 200
        deadline = time.monotonic() + 10
        while scorer.retriever.status()["indexed"] < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        feed = client.post("/v1/feed", json={"user_id": world.user_ids[3], "slate_size": 8}).get_json()
        assert len(feed["items"]) == 8 and feed["retrieval"]["model_version"] == scorer.retriever.model_version
        assert {"ann", "explore"} <= set(feed["retrieval"]["credited"])
        assert all(set(i["retrieved_by"]) <= {"ann", "similar", "co_engaged", "fresh", "trending", "explore"}
                   for i in feed["items"])
        got = client.post("/v1/retrieve", json={"text": world.item_text[0], "k": 5}).get_json()
        assert len(got["items"]) == 5 and {"score", "engagement", "topic", "text"} <= set(got["items"][0])
        by_user = client.post("/v1/retrieve", json={"user_id": world.user_ids[3], "k": 3}).get_json()
        assert len(by_user["items"]) == 3
        unknown = client.post("/v1/retrieve", json={"item_id": "nope"})
        assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "unknown_item"
        assert "stratarank_retrieval_indexed_items 300.0" in client.get("/metrics").get_data(as_text=True)
    finally:
        scorer.close()


def test_a_configured_model_that_does_not_load_leaves_the_other_sources(tmp_path):
    cfg = service_config_from_dict({"corpus": {"path": str(tmp_path / "c.db")},
                                    "bus": {"url": f"embedded://{tmp_path / 'bus'}"},
                                    "retrieval": {"model": "missing", "registry": str(tmp_path / "reg")}})
    app = create_app(cfg)
    try:
        assert not app.extensions["stratarank"].retriever.has_vectors
        assert app.test_client().post("/v1/retrieve", json={"text": "x"}).status_code == 503
    finally:
        app.extensions["stratarank"].close()


def test_the_service_retrieval_section_is_validated():
    from strategy import ValidationError

    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"retrieval": {"index": {"kind": "annoy", "ef_search": 0}, "sync_interval_s": 0,
                                                "modle": "x"}})
    assert {e.path for e in exc.value.errors} == {"retrieval.index.kind", "retrieval.index.ef_search",
                                                   "retrieval.sync_interval_s", "retrieval.modle"}
