"""The item corpus (online/corpus.py): upserts that merge, blocking (caller and risk rules), expiry,
durability across a restart and between processes, the reads retrieval needs, the HTTP endpoints,
and the ``items`` bus consumer on the embedded bus. Real SQLite files, a real bus log."""
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from online.app import create_app
from online.bus import open_bus
from online.config import ServiceConfig, service_config_from_dict
from online.corpus import Corpus, CorpusConfig, CorpusUnavailable, run_corpus
from online.nearline import BusConfig, NearlineConfig
from online.risk import load_risk
from strategy.errors import ValidationError
from strategy.items import ItemGenerator, parse_item, parse_items

ROOT = Path(__file__).resolve().parents[2]
NOW = 1.7e9
GEN = {"model": "gpt", "prior_score": 0.6}


class Clock:
    def __init__(self, t=NOW):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def corpus(tmp_path, clock):
    with Corpus(CorpusConfig(path=str(tmp_path / "corpus.db")), load_risk(ROOT / "conf/risk.yaml"), clock) as c:
        yield c


def write(corpus, *items, **kw):
    return corpus.upsert(parse_items({"items": list(items)}), **kw)


def test_create_then_merge_a_partial_update(corpus, clock):
    res = write(corpus, {"item_id": "i1", "source": "llm", "creator_id": "c1", "topic": "t1", "text": "hi",
                         "generator": {**GEN, "prompt_id": "p1"}})
    assert (res.created, res.updated, res.blocked) == (1, 0, [])
    first = corpus.get("i1")
    assert first.created_at == NOW and first.generator == ItemGenerator("gpt", 0.6, "p1") and first.seq == 1
    clock.t += 10
    res = write(corpus, {"item_id": "i1", "source": "llm", "topic": "t2", "text": None})
    assert (res.created, res.updated) == (0, 1)
    item = corpus.get("i1")
    # given fields replaced, absent ones kept, null cleared; created_at from the first write
    assert (item.topic, item.text, item.creator_id, item.generator.prompt_id) == ("t2", None, "c1", "p1")
    assert item.created_at == NOW and item.updated_at == NOW + 10 and item.seq == 2
    assert corpus.count() == 1


def test_a_merge_that_leaves_an_invalid_item_is_refused_whole_or_skipped(corpus):
    write(corpus, {"item_id": "h", "source": "human"})
    with pytest.raises(ValidationError) as info:
        write(corpus, {"item_id": "ok", "source": "human"}, {"item_id": "new", "source": "llm"},
              {"item_id": "h", "source": "llm"})
    assert [(e.path, e.code) for e in info.value.errors] == [("items[1].generator", "required"),
                                                            ("items[2].generator", "required")]
    assert corpus.get("ok") is None and corpus.count() == 1   # all or nothing
    res = write(corpus, {"item_id": "ok", "source": "human"}, {"item_id": "new", "source": "llm"}, atomic=False)
    assert res.created == 1 and [e.path for e in res.errors] == ["items[1].generator"]
    # an llm item turned human must drop its generator explicitly
    write(corpus, {"item_id": "l", "source": "llm", "generator": GEN})
    with pytest.raises(ValidationError, match="generator: null"):
        write(corpus, {"item_id": "l", "source": "human"})
    write(corpus, {"item_id": "l", "source": "human", "generator": None})
    assert corpus.get("l").source == "human" and corpus.get("l").generator is None


def test_blocked_items_stay_marked_and_out_of_candidate_reads(corpus):
    res = write(corpus,
                {"item_id": "spam", "source": "human", "creator_id": "c_spam_1"},
                {"item_id": "cure", "source": "llm", "text": "A Miracle Cure for all", "generator": GEN},
                {"item_id": "phone", "source": "llm", "text": "call 555-123-4567", "generator": GEN},
                {"item_id": "hand", "source": "human", "blocked": True},
                {"item_id": "fine", "source": "llm", "text": "a fine text", "generator": GEN})
    assert dict(res.blocked) == {"spam": "risk:blocked_creator", "cure": "risk:blocked_term",
                                 "phone": "risk:blocked_pattern(\\b\\d{3}-\\d{3}-\\d{4}\\b)", "hand": "blocked"}
    assert corpus.get("cure").blocked and corpus.get("cure").blocked_reason == "risk:blocked_term"
    assert [i.item_id for i in corpus.fresh(0)] == ["fine"]
    assert [i.item_id for b in corpus.iter_batches(2) for i in b] == ["fine"]
    assert corpus.count() == 5 and corpus.count(include_blocked=False) == 1
    assert set(corpus.get_many(["cure", "fine", "nope"])) == {"cure", "fine"}
    assert set(corpus.get_many(["cure", "fine"], include_blocked=False)) == {"fine"}
    # the text fixed: the risk block lifts; a caller's block stays until the caller lifts it
    write(corpus, {"item_id": "cure", "source": "llm", "text": "a plain text"},
          {"item_id": "hand", "source": "human", "topic": "t"})
    assert not corpus.get("cure").blocked and corpus.get("hand").blocked_reason == "blocked"
    write(corpus, {"item_id": "hand", "source": "human", "blocked": False})
    assert not corpus.get("hand").blocked


def test_rescreen_applies_changed_risk_rules(corpus):
    from online.risk import risk_from_dict

    write(corpus, {"item_id": "a", "source": "llm", "text": "buy crypto now", "generator": GEN},
          {"item_id": "b", "source": "human", "blocked": True})
    assert corpus.rescreen(risk_from_dict({"blocked_terms": ["crypto"]})) == 1
    assert corpus.get("a").blocked_reason == "risk:blocked_term" and corpus.get("b").blocked_reason == "blocked"
    assert corpus.rescreen(risk_from_dict({})) == 1 and not corpus.get("a").blocked


def test_expiry_hides_at_once_and_purge_deletes(corpus, clock):
    res = write(corpus, {"item_id": "ttl", "source": "human", "ttl_s": 100},
                {"item_id": "abs", "source": "human", "expires_at": NOW + 50},
                {"item_id": "old", "source": "human", "created_at": NOW - 100, "expires_at": NOW - 1},
                {"item_id": "forever", "source": "human"})
    assert res.created == 3 and res.expired == 1 and res.to_dict()["accepted"] == 4
    assert corpus.get("ttl").expires_at == NOW + 100 and corpus.get("old") is None
    clock.t = NOW + 60
    assert corpus.get("abs") is None and corpus.count() == 2
    assert {i.item_id for i in corpus.fresh(0)} == {"ttl", "forever"}
    assert corpus.purge() == 1 and corpus.purge() == 0
    clock.t = NOW + 100
    assert corpus.purge() == 1 and corpus.count() == 1
    # expires_at cleared by null; a write already past its expiry deletes the stored item
    write(corpus, {"item_id": "x", "source": "human", "ttl_s": 5})
    write(corpus, {"item_id": "x", "source": "human", "expires_at": None})
    clock.t += 10
    assert corpus.get("x") is not None
    res = write(corpus, {"item_id": "x", "source": "human", "expires_at": clock.t - 1})
    assert res.expired == 1 and corpus.get("x") is None


def test_default_ttl_applies_to_new_items_only(tmp_path, clock):
    with Corpus(CorpusConfig(path=str(tmp_path / "c.db"), default_ttl_s=10), None, clock) as corpus:
        write(corpus, {"item_id": "a", "source": "human"})
        assert corpus.get("a").expires_at == NOW + 10
        write(corpus, {"item_id": "b", "source": "human", "expires_at": None})
        assert corpus.get("b").expires_at is None


def test_reads_for_retrieval(corpus, clock):
    for i in range(25):
        clock.t = NOW + i
        write(corpus, {"item_id": f"i{i:02d}", "source": "llm" if i % 2 else "human",
                       **({"generator": GEN} if i % 2 else {})})
    clock.t = NOW + 100
    fresh = corpus.fresh(NOW + 19, source="llm")
    assert [i.item_id for i in fresh] == ["i23", "i21"]
    assert len(corpus.fresh(NOW + 19)) == 5 and len(corpus.fresh(0, limit=3)) == 3
    assert corpus.count(source="llm") == 12 and corpus.count(source="human") == 13
    batches = list(corpus.iter_batches(10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [i.item_id for b in batches for i in b] == sorted(f"i{i:02d}" for i in range(25))
    assert [i.item_id for i in corpus.changes_since(22)] == ["i22", "i23", "i24"]
    write(corpus, {"item_id": "i00", "source": "human", "blocked": True})
    assert [(i.item_id, i.blocked) for i in corpus.changes_since(25)] == [("i00", True)]
    assert len(corpus.get_many([f"i{i:02d}" for i in range(25)] * 2)) == 25


def test_survives_a_restart_and_is_shared_by_processes(tmp_path):
    path = tmp_path / "c.db"
    with Corpus(CorpusConfig(path=str(path))) as corpus:
        write(corpus, {"item_id": "a", "source": "llm", "text": "t", "generator": GEN})
    # another process writes and reads the same file while this one holds it open
    with Corpus(CorpusConfig(path=str(path))) as corpus:
        assert corpus.get("a").text == "t"
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from online.corpus import Corpus, CorpusConfig\nfrom strategy.items import parse_items\n"
                "c = Corpus(CorpusConfig(path=%r))\nassert c.get('a').generator.model == 'gpt'\n"
                "c.upsert(parse_items({'items': [{'item_id': 'b', 'source': 'human'}]}))\n") % (str(ROOT), str(path))
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert corpus.get("b") is not None and corpus.count() == 2
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_threads_write_concurrently_without_losing_one(tmp_path):
    corpus = Corpus(CorpusConfig(path=str(tmp_path / "c.db")))
    errors = []

    def run(k):
        try:
            for i in range(20):
                write(corpus, {"item_id": f"t{k}-{i}", "source": "human"})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and corpus.count() == 80
    assert sorted(i.seq for i in corpus.changes_since(0, limit=1000)) == list(range(1, 81))
    corpus.close()


def test_an_unwritable_corpus_raises_corpus_unavailable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CorpusUnavailable):
        Corpus(CorpusConfig(path=str(tmp_path / "file" / "c.db"))).count()


def test_config_section_is_validated_with_paths():
    cfg = service_config_from_dict({"corpus": {"path": "x.db", "default_ttl_s": 60, "synchronous": "normal"}})
    assert (cfg.corpus.path, cfg.corpus.default_ttl_s, cfg.corpus.synchronous) == ("x.db", 60, "normal")
    assert service_config_from_dict({}).corpus == CorpusConfig()
    with pytest.raises(ValidationError) as info:
        service_config_from_dict({"corpus": {"paht": "x", "path": ":memory:", "synchronous": "off",
                                             "busy_timeout_s": 0, "topic": "Bad Topic", "default_ttl_s": -1}})
    paths = {e.path: e.message for e in info.value.errors}
    assert "did you mean 'path'" in paths["corpus.paht"]
    assert set(paths) == {"corpus.paht", "corpus.path", "corpus.synchronous", "corpus.busy_timeout_s",
                          "corpus.topic", "corpus.default_ttl_s"}
    with pytest.raises(ValidationError, match="corpus: expected an object"):
        service_config_from_dict({"corpus": ["x"]})


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def app(tmp_path):
    config = ServiceConfig(nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}")),
                           risk_file=str(ROOT / "conf/risk.yaml"), corpus=CorpusConfig(path=str(tmp_path / "c.db")),
                           api_keys=frozenset({"k1"}))
    app = create_app(config)
    yield app
    app.extensions["stratarank"].close()


def test_http_post_and_get(app):
    client, key = app.test_client(), {"X-API-Key": "k1"}
    items = [{"item_id": "a/b c?", "source": "llm", "text": "guaranteed returns!", "generator": GEN},
             {"item_id": "h", "source": "human", "topic": "t"}]
    resp = client.post("/v1/items", json={"items": items}, headers=key)
    assert resp.status_code == 200
    assert resp.get_json() == {"accepted": 2, "created": 2, "updated": 0, "expired": 0,
                               "blocked": [{"item_id": "a/b c?", "reason": "risk:blocked_term"}]}
    got = client.get("/v1/items/a%2Fb%20c%3F", headers=key).get_json()
    assert got["item_id"] == "a/b c?" and got["blocked"] and got["generator"]["model"] == "gpt"
    assert client.get("/v1/items/h", headers=key).get_json()["topic"] == "t"
    missing = client.get("/v1/items/nope", headers=key)
    assert missing.status_code == 404
    assert missing.get_json() == {"error": {"code": "unknown_item", "path": "item_id",
                                            "message": "no item 'nope' in the corpus (or it expired)"}}


def test_http_errors_name_the_field_and_the_guard_applies(app):
    client, key = app.test_client(), {"X-API-Key": "k1"}
    resp = client.post("/v1/items", json={"items": [{"item_id": "x", "source": "llm", "generator": GEN}] * 3
                                          + [{"item_id": "y", "source": "llm", "generator": {"model": "m",
                                                                                           "prior_score": 7}}]},
                       headers=key)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["path"] == "items[3].generator.prior_score" and error["code"] == "range"
    assert set(error) == {"code", "message", "path", "details"}
    assert client.post("/v1/items", json={"items": [{"item_id": "x", "source": "human"}]}).status_code == 401
    assert client.get("/v1/items/x").status_code == 401
    assert client.post("/v1/items", data="{}", headers=key).status_code == 415
    assert app.test_client().get("/openapi.json").get_json()["paths"]["/v1/items/{item_id}"]["get"]["security"]


# ---------------------------------------------------------------- the bus consumer


def test_bus_records_enter_the_corpus_and_invalid_ones_are_skipped(tmp_path, clock):
    cfg = CorpusConfig(path=str(tmp_path / "c.db"), batch_size=3, poll_timeout_s=0.01)
    records = [{"item_id": "b1", "source": "human", "topic": "t"},
               {"item_id": 5, "source": "human"},                                  # invalid: a number id
               {"item_id": "b2", "source": "llm", "text": "miracle cure", "generator": GEN},
               {"item_id": "b3", "source": "llm"},                                 # invalid after the merge
               {"item_id": "b1", "source": "human", "topic": "t2"},                # an update
               {"item_id": "b4", "source": "human", "expires_at": NOW - 1, "created_at": NOW - 10}]
    with open_bus(f"embedded://{tmp_path / 'bus'}") as bus:
        bus.publish("items", records)
        with Corpus(cfg, load_risk(ROOT / "conf/risk.yaml"), clock) as corpus:
            stats = run_corpus(cfg, bus, corpus, max_idle_s=0.2, startup_grace_s=0.2)
            assert (stats.records, stats.written, stats.invalid, stats.blocked, stats.expired) == (6, 3, 2, 1, 1)
            assert stats.commits == stats.batches == 2
            assert corpus.get("b1").topic == "t2" and corpus.get("b2").blocked_reason == "risk:blocked_term"
            assert corpus.get("b3") is None and corpus.count() == 2
            # offsets were committed: a restart reads only what came after
            bus.publish("items", [{"item_id": "b5", "source": "human"}])
            again = run_corpus(cfg, bus, corpus, max_idle_s=0.2, startup_grace_s=0.2)
            assert (again.records, again.written) == (1, 1) and corpus.count() == 3


def test_nothing_is_committed_while_the_corpus_cannot_be_written(tmp_path):
    cfg = CorpusConfig(path=str(tmp_path / "c.db"), poll_timeout_s=0.01, busy_timeout_s=0.05)
    with open_bus(f"embedded://{tmp_path / 'bus'}") as bus:
        bus.publish("items", [{"item_id": "z", "source": "human"}])
        corpus = Corpus(cfg)
        corpus.count()   # creates the file
        blocker = sqlite3.connect(cfg.path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")   # another writer holds the lock
        stop = threading.Event()
        thread = threading.Thread(target=run_corpus, args=(cfg, bus, corpus), kwargs={"stop": stop})
        thread.start()
        threading.Event().wait(0.8)
        stop.set()
        thread.join(10)
        blocker.execute("ROLLBACK")
        assert corpus.get("z") is None
        stats = run_corpus(cfg, bus, corpus, max_idle_s=0.2, startup_grace_s=0.2)   # delivered again
        assert stats.records == 1 and corpus.get("z") is not None


def test_the_corpus_command_consumes_the_topic(tmp_path):
    config = tmp_path / "service.yaml"
    config.write_text(f"bus: {{url: 'embedded://{tmp_path / 'bus'}'}}\n"
                      f"corpus: {{path: '{tmp_path / 'c.db'}', poll_timeout_s: 0.01}}\n"
                      f"risk: '{ROOT / 'conf/risk.yaml'}'\n")
    with open_bus(f"embedded://{tmp_path / 'bus'}") as bus:
        bus.publish("items", [{"item_id": "c1", "source": "human", "creator_id": "c_spam_2"}, {"item_id": ""}])
    out = subprocess.run([sys.executable, "-m", "stratarank.cli", "corpus", "--config", str(config),
                          "--max-idle", "0.3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert (stats["records"], stats["written"], stats["invalid"], stats["blocked"]) == (2, 1, 1, 1)
    assert Corpus(CorpusConfig(path=str(tmp_path / "c.db"))).get("c1").blocked_reason == "risk:blocked_creator"
    config.write_text("corpus: {synchronous: off}\n")
    bad = subprocess.run([sys.executable, "-m", "stratarank.cli", "corpus", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "corpus.synchronous" in bad.stderr


def test_items_topic_records_are_keyed_by_item_id(tmp_path):
    with open_bus(f"embedded://{tmp_path / 'bus'}") as bus:
        bus.publish("items", [{"item_id": "k1", "source": "human"}])
        got = bus.consumer("c", ["items"]).poll(10, 0.1)
    assert [(r.topic, r.key) for r in got] == [("items", "k1")]
    assert parse_item(got[0].value).item_id == "k1"


def test_http_answers_503_while_the_corpus_is_locked(tmp_path):
    config = ServiceConfig(nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}")),
                           corpus=CorpusConfig(path=str(tmp_path / "c.db"), busy_timeout_s=0.05))
    app = create_app(config)
    client = app.test_client()
    assert client.post("/v1/items", json={"items": [{"item_id": "a", "source": "human"}]}).status_code == 200
    blocker = sqlite3.connect(config.corpus.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")   # another writer holds the lock past busy_timeout
    try:
        resp = client.post("/v1/items", json={"items": [{"item_id": "b", "source": "human"}]})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.get_json()["error"]["code"] == "corpus_unavailable"
        assert client.get("/v1/items/a").status_code == 200   # WAL: readers do not wait for the writer
    finally:
        blocker.execute("ROLLBACK")
        app.extensions["stratarank"].close()
    assert client.post("/v1/items", json={"items": [{"item_id": "b", "source": "human"}]}).status_code == 200
