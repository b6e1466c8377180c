"""The streaming trainer on the real bus: new items get rows and learn, versions are published, pruned
and rolled back, a NaN-producing update is refused while the previous version keeps serving, and a
trainer SIGKILLed mid-stream resumes with no example applied twice or skipped uncounted."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from online.bus import encode_records, open_bus
from online.joiner import JoinerConfig, publish_synthetic, run_joiner, synthetic_served
from online.stream_train import StreamConfig, StreamTrainer, run_stream_trainer
from ranking.artifacts import load_model
from ranking.dynamic_ids import table_key
from ranking.registry import current_version, versions
from ranking.train import train_config_from_dict, train_from_config

ROOT = Path(__file__).resolve().parents[2]
START = 1_767_225_600.0


def renamed(records, prefix: str):
    """The same traffic on items nobody has seen: ``i42`` -> ``<prefix>i42``."""
    out = []
    for topic, published, value in records:
        value = dict(value)
        if "item_id" in value:
            value["item_id"] = prefix + value["item_id"]
        if "request_id" in value and value["request_id"]:
            value["request_id"] = prefix + value["request_id"]
        if "event_id" in value:
            value["event_id"] = prefix + value["event_id"]
        out.append((topic, published, value))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bus whose `joined` topic holds 8,000 examples of known items, then 8,000 of new items; a
    model trained on the first part, registered as `feed`."""
    folder = tmp_path_factory.mktemp("stream")
    url = f"embedded://{folder / 'bus'}"
    bus = open_bus(url)
    first = synthetic_served(800, seed=5, window_s=30.0, gap_s=1.0, start_ts=START, items=1500)
    publish_synthetic(bus, first)
    joiner = JoinerConfig(out=str(folder / "joined"), window_s=30.0, grace_s=1.0,
                          objectives=str(ROOT / "conf/objectives/feed.yaml"))
    run_joiner(joiner, bus=bus, max_idle_s=0.3, drain=True)
    cfg = train_config_from_dict({
        "name": "feed", "data": {"loader": "served", "path": str(folder / "joined")},
        "features": str(ROOT / "conf/features/sim.yaml"), "objectives": str(ROOT / "conf/objectives/feed.yaml"),
        "labels": {"watch_time": "watch_time"},
        "model": {"arch": "mmoe", "num_experts": 2, "expert": [16], "tower": [8], "bias_features": ["position"]},
        "training": {"epochs": 1, "batch_size": 512, "threads": 1}})
    train_from_config(cfg, registry=str(folder / "base-registry"), progress=False, log=lambda m: None)
    publish_synthetic(bus, renamed(synthetic_served(800, seed=6, window_s=30.0, gap_s=1.0, start_ts=START + 900,
                                                    items=1500), "n"))
    run_joiner(joiner, bus=bus, max_idle_s=0.3, drain=True)
    bus.close()
    return {"folder": folder, "url": url}


def fresh_registry(world, tmp_path) -> str:
    import shutil

    shutil.copytree(world["folder"] / "base-registry", tmp_path / "registry")
    return str(tmp_path / "registry")


def stream_config(world, tmp_path, **extra) -> StreamConfig:
    return StreamConfig.from_dict({
        "name": "feed", "start_from": "feed", "registry": fresh_registry(world, tmp_path),
        "bus": {"url": world["url"]}, "consumer": f"trainer-{tmp_path.name}", "publish_interval_s": 1,
        "checkpoint": str(tmp_path / "trainer.pt"), "keep_versions": 3,
        "training": {"batch_size": 128, "lr": 0.002, "embedding_lr": 0.05},
        "ids": {"item_id": {"capacity": 6000, "min_count": 2, "ttl_s": 86400}}, **extra})


def test_new_items_get_rows_and_learn_and_versions_are_kept_to_the_last_n(world, tmp_path):
    cfg = stream_config(world, tmp_path)
    base = load_model(cfg.registry, "feed")
    assert not any(k.startswith("ni") for k in base.encoder.vocabs["item_id"])
    stats = run_stream_trainer(cfg, max_idle_s=1.5, log_fn=lambda m: None)
    t = stats.trainer
    assert t.counters["applied"] + t.counters["held_out"] == 16_000 and t.counters["refused"] == 0
    assert t.counters["published"] >= 2 and len(versions(cfg.registry, "feed")) == 3   # pruned to the last 3
    served = load_model(cfg.registry, "feed")
    assert served.version == current_version(cfg.registry, "feed") == t.published
    vocab = served.encoder.vocabs["item_id"]
    new = [k for k in vocab if k is not None and k.startswith("ni")]
    assert len(vocab) == 6000 and len(new) > 1000
    weights = served.module.state_dict()[table_key("item_id")]
    rows = [vocab.index(k) + 1 for k in new[:200]]
    assert float(weights[rows].abs().sum(dim=1).min()) > 0          # they learnt (started at zero)
    metrics = json.loads((Path(cfg.registry) / "feed" / served.version / "metrics.json").read_text())
    assert metrics["stream"]["freshness_s"]["examples"] >= 0 and "click" in metrics["valid"]

    back = subprocess.run([sys.executable, "-m", "stratarank.cli", "models", "rollback", "feed", "--registry",
                           cfg.registry], capture_output=True, text=True, cwd=ROOT)
    assert back.returncode == 0, back.stderr
    assert current_version(cfg.registry, "feed") == versions(cfg.registry, "feed")[-2]


def test_a_corrupt_or_nan_producing_update_is_refused_and_the_previous_version_keeps_serving(world, tmp_path):
    cfg = stream_config(world, tmp_path, guard={"min_holdout": 300, "patience": 2})
    trainer = StreamTrainer(cfg, log_fn=lambda m: None)
    bus = open_bus(world["url"])
    consumer = bus.consumer(cfg.consumer, [cfg.topic])
    for _ in range(20):
        for r in consumer.poll(500, 1.0):
            trainer.add(r.topic, r.partition, r.offset, r.next_offset, r.value)
    consumer.close()
    bus.close()
    trainer.step()
    good = trainer.publish()["published"]
    assert good == current_version(cfg.registry, "feed") and len(trainer.holdout) >= cfg.guard.min_holdout
    serving = {k: v.clone() for k, v in trainer.reference.state_dict().items()}

    tower = next(p for name, p in trainer.module.named_parameters() if "tower" in name and name.endswith("weight"))
    with torch.no_grad():
        tower.mul_(300.0)                              # an update that wrecks the predictions
    assert "holdout loss" in trainer.publish()["refused"]
    assert not torch.equal(tower, trainer.reference.state_dict()[name_of(trainer, tower)])   # patience: not yet back
    with torch.no_grad():
        next(trainer.module.parameters()).fill_(float("nan"))   # an update that produced NaN
    assert trainer.publish()["refused"] == "non-finite weights or loss"
    assert trainer.counters["refused"] == 2 and current_version(cfg.registry, "feed") == good
    assert versions(cfg.registry, "feed")[-1] == good
    for key, value in trainer.module.state_dict().items():   # the trainer went back to the serving weights
        assert torch.equal(value, serving[key]), key
    assert trainer.publish()["published"] is not None      # and goes on from there


def name_of(trainer, param) -> str:
    return next(name for name, p in trainer.module.named_parameters() if p is param)


def test_killed_mid_stream_it_resumes_with_every_example_counted_once(world, tmp_path):
    cfg = stream_config(world, tmp_path)
    config = tmp_path / "stream.json"
    config.write_text(json.dumps({
        "name": "feed", "start_from": "feed", "registry": cfg.registry, "bus": {"url": world["url"]},
        "consumer": cfg.consumer, "publish_interval_s": 1, "checkpoint_interval_s": 0.2,
        "checkpoint": cfg.checkpoint, "training": {"batch_size": 64}}))
    # the joiner re-publishing a flush after a crash: 300 examples arrive twice
    bus = open_bus(world["url"])
    reader = bus.consumer(f"dup-{tmp_path.name}", ["joined"])
    dup = []
    while len(dup) < 300:
        dup += [r.value for r in reader.poll(300 - len(dup), 1.0)]
    reader.close()
    bus.publish("joined", dup)
    bus.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stratarank.cli", "train-stream", "--config", str(config)]
    for _ in range(2):   # each run is killed at its first checkpoint (0.2 s of training): mid-stream on any CPU
        stamp = Path(cfg.checkpoint).stat().st_mtime_ns if Path(cfg.checkpoint).exists() else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not Path(cfg.checkpoint).exists()
                                               or Path(cfg.checkpoint).stat().st_mtime_ns == stamp):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    ckpt = torch.load(cfg.checkpoint, weights_only=True)
    counters = ckpt["ranks"][0]["counters"]
    assert counters["applied"] + counters["held_out"] < 16_000, "no kill landed mid-stream"
    done = subprocess.run(cmd + ["--max-idle", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["applied"] + final["held_out"] == 16_000          # each unique example once
    assert final["duplicates"] == 300 and final["invalid"] == 0
    assert final["records"] == 16_300 + final["replayed"]           # every record read is accounted for


def test_the_scorer_serves_each_published_version_without_a_restart_or_a_failed_request(world, tmp_path, root):
    from test_serve_gunicorn import call, start_scorer

    cfg = stream_config(world, tmp_path)
    config = tmp_path / "service.yaml"
    config.write_text(json.dumps({
        "strategies": {"files": [str(root / "conf/objectives/feed.yaml")]},
        "bus": {"url": f"embedded://{tmp_path / 'scorer-bus'}"}, "store": {"url": "memory://"},
        "model": {"registry": cfg.registry, "name": "feed", "follow_current": True, "poll_s": 0.2}}))
    proc, port = start_scorer(config, root)
    body = json.loads((root / "conf/examples/request.json").read_text())
    for cand in body["candidates"]:
        cand.pop("predictions")
    statuses, served, done = [], [], threading.Event()

    def load():
        while not done.is_set():
            status, out = call(port, "POST", "/v1/rank", body)
            statuses.append(status)
            if status == 200:
                served.append(out["model_version"])

    threads = [threading.Thread(target=load) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        stats = run_stream_trainer(cfg, max_idle_s=1.5, log_fn=lambda m: None)
        final = f"feed@{stats.trainer.published}"
        assert stats.trainer.counters["published"] >= 2
        workers, deadline = {}, time.monotonic() + 30
        while time.monotonic() < deadline and (len(workers) < 2 or set(workers.values()) != {final}):
            _, ready = call(port, "GET", "/readyz")
            workers[ready["worker"]] = ready["model_version"]
            time.sleep(0.05)
        assert set(workers.values()) == {final} and len(workers) == 2
    finally:
        done.set()
        for t in threads:
            t.join(30)
        proc.terminate()
        proc.wait(30)
    assert statuses and set(statuses) == {200}
    assert served[0] == "feed@v1" and final in served and len(set(served)) >= 3


def test_two_ranks_of_distributed_model_parallel_share_the_stream(world, tmp_path):
    """train-stream --nproc 2: each rank trains on its share, the ranks agree on the new ids' rows, and
    every example is counted once across them."""
    cfg = stream_config(world, tmp_path)
    config = tmp_path / "stream.json"
    config.write_text(json.dumps({
        "name": "feed", "start_from": "feed", "registry": cfg.registry, "bus": {"url": world["url"]},
        "consumer": cfg.consumer, "publish_interval_s": 2, "checkpoint": cfg.checkpoint,
        "training": {"batch_size": 128, "threads": 1},
        "ids": {"item_id": {"capacity": 6000, "min_count": 2, "ttl_s": 86400}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stratarank.cli", "train-stream", "--config", str(config),
                           "--nproc", "2", "--max-idle", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ranks = summary["ranks"]
    assert len(ranks) == 2 and all(r["applied"] > 3000 for r in ranks)
    ckpt = torch.load(cfg.checkpoint, weights_only=True)
    waiting = sum(len(r["buffer"]) for r in ckpt["ranks"])
    assert sum(r["applied"] + r["held_out"] for r in ranks) + waiting == 16_000
    assert all(r["other_ranks"] + r["applied"] + r["held_out"] + r["duplicates"] + r["invalid"] + len(b["buffer"])
               == r["records"] for r, b in zip(ranks, ckpt["ranks"]))
    served = load_model(cfg.registry, "feed")
    assert served.version == summary["published_version"] != "v1"
    vocab = served.encoder.vocabs["item_id"]
    new = [k for k in vocab if k is not None and k.startswith("ni")]
    assert len(new) > 1000
    weights = served.module.state_dict()[table_key("item_id")]
    rows = [vocab.index(k) + 1 for k in new[:200]]
    assert float(weights[rows].abs().sum(dim=1).min()) > 0     # new items learnt on whichever rank holds the table
