"""The item corpus behind a real `stratarank serve` (2 gunicorn workers): items posted through any
worker are read back from both, survive a restart of the server, and the ``items`` topic reaches
the corpus through `stratarank corpus` on the real Kafka-compatible broker. Real processes, real
HTTP, real files."""
import json
import subprocess
import sys
import time

from online.bus import open_bus
from online.client import Client
from online.corpus import Corpus, CorpusConfig, run_corpus
from scorer_process import call, start_scorer, stop_scorer
from scorer_process import write_config as service_config

GEN = {"model": "gpt", "prior_score": 0.5}


def write_config(tmp_path, root, extra: str = ""):
    """The shared test service config, with the shipped risk rules, a corpus file and JSON access logs."""
    return service_config(tmp_path, root, f"risk: '{root / 'conf/risk.yaml'}'\n"
                          f"corpus: {{path: '{tmp_path / 'corpus.db'}'}}\n"
                          "logging: {format: json, access: true}\n" + extra)


def access_pids(log_path, prefix: str) -> set:
    """Pids of the workers whose access lines show a request to a path starting with ``prefix``."""
    pids = set()
    for line in open(log_path):
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "stratarank.access" and rec.get("path", "").startswith(prefix):
                pids.add(rec["pid"])
    return pids


def test_items_are_shared_by_the_workers_and_survive_a_restart(tmp_path, root):
    config = write_config(tmp_path, root)
    ids = [f"item/{i}" for i in range(40)]   # a "/" in the id: the GET path carries it percent-encoded
    log1 = tmp_path / "serve1.log"
    proc, port = start_scorer(config, root, workers=2, log_path=log1)
    try:
        for i, item_id in enumerate(ids):   # a new connection per call: the workers take turns accepting
            body = {"item_id": item_id, "source": "llm" if i % 2 else "human", "topic": f"t{i % 3}"}
            if i % 2:
                body["generator"] = GEN
            if i == 7:
                body["text"] = "get rich quick"
            assert call(port, "POST", "/v1/items", {"items": [body]})[0] == 200
        for _ in range(2):
            for i, item_id in enumerate(ids):
                with Client(f"http://127.0.0.1:{port}") as client:
                    got = client.item(item_id)
                assert got["item_id"] == item_id and got["topic"] == f"t{i % 3}"
                assert got["blocked"] == (i == 7)
        with Client(f"http://127.0.0.1:{port}") as client:
            assert client.item("nope") is None
            answer = client.items([{"item_id": "item/3", "source": "llm", "blocked": True}])
            assert answer["updated"] == 1 and answer["blocked"] == [{"item_id": "item/3", "reason": "blocked"}]
        status, error = call(port, "POST", "/v1/items", {"items": [{"item_id": "x", "source": "llm",
                                                                     "generator": {"model": "m", "prior_scor": 1}}]})
        assert status == 400 and error["error"]["path"] == "items[0].generator.prior_scor"
    finally:
        stop_scorer(proc)
    # both workers wrote and both read (their access lines say so): one corpus for all of them
    assert len(access_pids(log1, "/v1/items/")) == 2 and len(access_pids(log1, "/v1/items")) == 2

    proc, port = start_scorer(config, root, workers=2, log_path=tmp_path / "serve2.log")
    try:
        for i, item_id in enumerate(ids):
            status, got = call(port, "GET", "/v1/items/" + item_id.replace("/", "%2F"))
            assert status == 200 and got["item_id"] == item_id
            assert got["blocked_reason"] == {7: "risk:blocked_term", 3: "blocked"}.get(i)
            assert (got["generator"] is not None) == bool(i % 2)
    finally:
        stop_scorer(proc)
    with Corpus(CorpusConfig(path=str(tmp_path / "corpus.db"))) as corpus:
        assert corpus.count() == 40 and corpus.count(include_blocked=False) == 38


def test_items_topic_on_kafka_reaches_the_corpus(tmp_path, root, kafka_broker):
    """The same consumer on the real broker: records in, invalid ones skipped, offsets committed
    only after the corpus write (a second run reads only the new record)."""
    cfg = CorpusConfig(path=str(tmp_path / "corpus.db"), consumer="corpus-test", poll_timeout_s=0.2)
    records = [{"item_id": f"k{i}", "source": "llm", "generator": GEN, "text": f"text {i}"} for i in range(20)]
    records.insert(5, {"item_id": "bad", "source": "robot"})
    with open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool")) as bus:
        bus.publish("items", records)
        assert bus.flush(30)
        with Corpus(cfg) as corpus:
            stats = run_corpus(cfg, bus, corpus, max_idle_s=2.0)
            assert (stats.records, stats.written, stats.invalid) == (21, 20, 1)
            assert corpus.count() == 20 and corpus.get("k19").text == "text 19"
            bus.publish("items", [{"item_id": "k0", "source": "llm", "blocked": True}])
            assert bus.flush(30)
            again = run_corpus(cfg, bus, corpus, max_idle_s=2.0)
            assert (again.records, again.written, again.blocked) == (1, 1, 1)
            assert corpus.get("k0").blocked_reason == "blocked" and corpus.get("k0").text == "text 0"


def test_the_corpus_command_against_a_running_scorer(tmp_path, root):
    """`stratarank corpus` and the scorer's workers write the one file side by side."""
    config = write_config(tmp_path, root)
    proc, port = start_scorer(config, root, workers=2, log_path=tmp_path / "serve.log")
    try:
        with open_bus(f"embedded://{tmp_path / 'bus'}") as bus:
            bus.publish("items", [{"item_id": f"b{i}", "source": "human"} for i in range(10)])
        consumer = subprocess.Popen([sys.executable, "-m", "stratarank.cli", "corpus", "--config", str(config),
                                     "--max-idle", "1"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        for i in range(10):   # the workers write while the consumer does
            assert call(port, "POST", "/v1/items", {"items": [{"item_id": f"h{i}", "source": "human"}]})[0] == 200
        out, err = consumer.communicate(timeout=120)
        assert consumer.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["written"] == 10
        deadline = time.time() + 10
        while call(port, "GET", "/v1/items/b9")[0] != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert all(call(port, "GET", f"/v1/items/{p}{i}")[0] == 200 for p in "bh" for i in range(10))
    finally:
        stop_scorer(proc)
