"""The two-tower retrieval model (ranking/two_tower.py): trained on the small simulated world it beats
popularity on held-out recall, a brand-new item's content-only vector lands among its topic, the registry
round trip gives identical vectors, the logQ-corrected loss, the streaming frequency estimate, the
config's errors and the ``train-retrieval`` command."""
import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from ranking.registry import list_models
from ranking.features import hash_token
from ranking.two_tower import (StreamingFrequency, TwoTowerEncoder, in_batch_softmax_loss, load_two_tower,
                               load_two_tower_config, load_two_tower_frames, register_two_tower,
                               topic_affinity_from_recent, train_two_tower, two_tower_config_from_dict)
from strategy.config import read_yaml
from strategy.errors import ValidationError
from world import World
from world.core import GENERIC_WORDS, TOPIC_WORDS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world_logs(tmp_path_factory, root):
    """The small world's logs (20k impressions) in a folder, as ``stratarank simulate`` writes them."""
    world = World.from_yaml(root / "conf" / "sim" / "small.yaml")
    impressions, _ = world.simulate_logs(progress=False)
    out = tmp_path_factory.mktemp("small")
    impressions.to_parquet(out / "impressions.parquet", index=False)
    return world, out


def small_config(root, path, **sections):
    """conf/train/two_tower_small.yaml reading ``path``; ``sections`` update its sections."""
    data, lines = read_yaml(root / "conf" / "train" / "two_tower_small.yaml")
    data["data"]["path"] = str(path)
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return two_tower_config_from_dict(data, str(root / "conf" / "train" / "two_tower_small.yaml"), lines)


@pytest.fixture(scope="module")
def trained(world_logs, root):
    return train_two_tower(small_config(root, world_logs[1]), log=lambda *a: None, progress=False)


def test_beats_popularity_on_held_out_recall(trained):
    held = trained.metrics["held_out"]
    assert held["catalogue"] == 600 and held["queries"] > 500
    tt, pop = held["two_tower"], held["popularity"]
    assert tt["recall@50"] > pop["recall@50"] + 0.05, held
    assert tt["recall@100"] > pop["recall@100"], held
    assert held["cold"]["popularity"]["recall@50"] == 0.0   # items without a training positive rank last


def test_a_brand_new_item_gets_a_vector_of_its_topic_from_content_alone(trained, world_logs):
    world, _ = world_logs
    enc = TwoTowerEncoder(trained.model, "two_tower_small", "v0")
    catalogue = world.catalog()
    vectors = enc.encode_items(catalogue.to_dict("records"))
    trained_rows = {hash_token(i, enc.config.buckets.item_id) for i in catalogue["item_id"]}
    new_id = next(f"new-{k}" for k in range(1000) if hash_token(f"new-{k}", enc.config.buckets.item_id)
                  not in trained_rows)    # a row no catalogue item trained
    rng = np.random.default_rng(0)
    generic = list(GENERIC_WORDS)
    shares, text_shares = [], []
    for topic in world.topic_names:
        words = list(rng.choice(TOPIC_WORDS[topic].split(), 8)) + list(rng.choice(generic, 6))
        item = {"item_id": new_id, "source": "llm", "creator_id": None, "topic": topic, "text": " ".join(words),
                "generator": {"model": "sim-gpt-large", "prior_score": 0.7}}
        v = enc.encode_items([item])[0]
        assert v.shape == (enc.dim,) and abs(np.linalg.norm(v) - 1) < 1e-5
        np.testing.assert_array_equal(v, enc.encode_items([{**item, "item_id": None}])[0])  # unseen id adds nothing
        nearest = np.argsort(-(vectors @ v))[:20]
        shares.append((catalogue["topic"].to_numpy()[nearest] == topic).mean())
        nearest = np.argsort(-(vectors @ enc.encode_text(item["text"])))[:20]
        text_shares.append((catalogue["topic"].to_numpy()[nearest] == topic).mean())
    assert np.mean(shares) >= 0.8, shares
    assert np.mean(text_shares) >= 0.5, text_shares   # text alone (no topic, no id): still mostly its topic


def test_encoders_take_missing_keys_and_both_generator_shapes(trained):
    enc = TwoTowerEncoder(trained.model, "two_tower_small", "v0")
    items = [{}, {"item_id": None, "text": None}, {"item_id": "i3", "generator": "sim-gpt-large"},
             {"item_id": "i3", "generator": {"model": "sim-gpt-large"}}]
    v = enc.encode_items(items)
    assert v.dtype == np.float32 and v.shape == (4, enc.dim) and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(v[2], v[3])
    u = enc.encode_users([{}, {"user_id": "u1", "recent_items": ["i1", "i2"], "topic_affinity": {"music": 3.0}},
                          {"user_id": "u1", "recent_items": ["i1", "i2"], "topic_affinity": {"music": 1.0, "x": -5}}])
    assert u.dtype == np.float32 and u.shape == (3, enc.dim)
    np.testing.assert_allclose(u[1], u[2], atol=1e-6)   # weights are normalised, non-positive ones ignored
    assert enc.encode_items([]).shape == (0, enc.dim)
    many = [{"item_id": f"i{k % 700}", "topic": "music", "text": f"song {k} guitar", "source": "retrieval",
             "creator_id": f"c{k % 40}"} for k in range(10_000)]
    t0 = time.perf_counter()
    assert enc.encode_items(many).shape == (10_000, enc.dim)
    assert time.perf_counter() - t0 < 10.0   # ~0.1 s on one core; generous for a shared machine


def test_training_topic_affinity_is_the_recent_items_topic_shares():
    topics = {"a": "music", "b": "music", "c": "travel"}
    got = topic_affinity_from_recent([np.array(["a", "zz", "c", "b", "c"]), None, []], topics, max_recent=4)
    assert got == [{"music": pytest.approx(2 / 3), "travel": pytest.approx(1 / 3)}, {}, {}]   # zz: unknown topic


def test_register_load_round_trip_and_list_models(trained, tmp_path, capsys):
    from stratarank.cli import main

    path = register_two_tower(tmp_path, "two_tower_small", trained)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "two_tower" and manifest["model"]["config"]["arch"] == "two_tower"
    assert torch.load(path / "weights.pt", weights_only=True).keys() == trained.model.state_dict().keys()
    fresh = TwoTowerEncoder(trained.model, "two_tower_small", "v1")
    items = [{"item_id": f"i{k}", "topic": "music", "text": "guitar song", "source": "llm", "creator_id": "c1",
              "generator": "sim-gpt-large"} for k in range(50)]
    users = [{"user_id": f"u{k}", "recent_items": [f"i{k}", "i7"], "topic_affinity": {"music": 1.0}} for k in range(20)]
    for ref in ("two_tower_small", "two_tower_small@v1", str(path)):
        enc = load_two_tower(tmp_path, ref)
        assert enc.version == "two_tower_small@v1" and enc.dim == trained.config.model.output_dim
        np.testing.assert_array_equal(enc.encode_items(items), fresh.encode_items(items))
        np.testing.assert_array_equal(enc.encode_users(users), fresh.encode_users(users))
        np.testing.assert_array_equal(enc.encode_text("guitar song"), fresh.encode_text("guitar song"))
    rows = list_models(tmp_path)
    assert [(r["name"], r["version"], r["arch"], r["objectives"], r["current"]) for r in rows] == [
        ("two_tower_small", "v1", "two_tower", ["click"], True)]
    assert rows[0]["metrics"] == trained.metrics["held_out"]["two_tower"] and rows[0]["metric_split"] == "held_out"
    assert main(["models", "list", "--registry", str(tmp_path)]) == 0
    assert "two_tower_small" in capsys.readouterr().out


def test_loss_subtracts_log_q_and_masks_accidental_hits():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    items = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    keys = torch.tensor([7, 8, 7])          # rows 0 and 2 hold the same item: not each other's negatives
    log_q = torch.tensor([-1.0, -2.0, -1.0])
    t = 0.5
    s = (users @ items.T).numpy() / t - log_q.numpy()[None, :]
    expected = np.mean([
        -s[0, 0] + math.log(math.exp(s[0, 0]) + math.exp(s[0, 1])),            # column 2 masked
        -s[1, 1] + math.log(sum(math.exp(x) for x in s[1])),
        -s[2, 2] + math.log(math.exp(s[2, 1]) + math.exp(s[2, 2]))])          # column 0 masked
    got = in_batch_softmax_loss(users, items, keys, log_q, t)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    uncorrected = in_batch_softmax_loss(users, items, keys, torch.zeros(3), t)
    assert float(uncorrected) != pytest.approx(expected, rel=1e-3)
    # a popular item (high q) is a weaker negative: raising its log q lowers the other rows' loss
    popular = in_batch_softmax_loss(users, items, keys, log_q + torch.tensor([0.0, 3.0, 0.0]), t)
    assert float(popular) < float(got)


def test_streaming_frequency_estimates_occurrences_per_batch():
    rng = np.random.default_rng(1)
    p = 1.0 / np.arange(1, 51) ** 1.1
    p /= p.sum()
    ids = np.array([f"i{k}" for k in range(50)])
    est = StreamingFrequency(buckets=1 << 16, alpha=0.02)
    batch = 32
    for step in range(3000):
        log_q = est.update(ids[rng.choice(50, batch, p=p)], step)
    probe = est.update(ids[:10], 3000)   # one more sighting each of the 10 most frequent items
    q = np.exp(probe)
    expected = batch * p[:10]             # expected occurrences per batch
    assert np.all(np.abs(q / expected - 1) < 0.25), (q, expected)
    assert log_q.shape == (batch,)


def write_yaml(tmp_path, text: str):
    path = tmp_path / "tt.yaml"
    path.write_text(text)
    return path


def test_config_errors_name_file_line_field_and_allowed_values(tmp_path):
    path = write_yaml(tmp_path, """name: tt
data:
  loader: parquet
  path: runs/small
positive: []
model:
  logq: counts
  temperature: -1
  tower: [8]
training: {epochs: 0}
eval: {catalogue: all}
""")
    with pytest.raises(ValidationError) as info:
        load_two_tower_config(path)
    text = str(info.value)
    for expected in (f"{path}:3: data.loader: 'parquet' is not allowed (allowed: table, sim, served)",
                     f"{path}:5: positive: at least one label column is required",
                     f"{path}:7: model.logq: 'counts' is not allowed; did you mean 'count'? "
                     "(allowed: count, stream, none)",
                     f"{path}:8: model.temperature: -1 is out of range (0, 10]",
                     f"{path}:9: model.tower: unknown key 'tower'",
                     f"{path}:10: training.epochs: 0 is out of range",
                     f"{path}:11: eval.catalogue: 'all' is not allowed (allowed: frame, held_out)"):
        assert expected in text, text
    assert len(info.value.errors) == 7


def test_a_positive_label_missing_from_the_data_names_the_config_line(world_logs, tmp_path):
    path = write_yaml(tmp_path, f"name: tt\ndata: {{loader: sim, path: {world_logs[1]}}}\npositive: [click, clicks]\n")
    cfg = load_two_tower_config(path)
    with pytest.raises(ValidationError) as info:
        load_two_tower_frames(cfg)
    assert len(info.value.errors) == 1
    err = str(info.value.errors[0])
    assert err.startswith(f"{path}:3: positive[1]: label column 'clicks' is not in the data") and "like" in err


def test_held_out_rows_are_the_latest(world_logs, root):
    cfg = small_config(root, world_logs[1])
    train, held, desc = load_two_tower_frames(cfg)
    assert train["ts"].max() < held["ts"].min()
    assert len(held) / (len(train) + len(held)) == pytest.approx(0.2, abs=0.01)
    assert desc["absent_columns"] == [] and desc["dropped_rows"] == 0


def test_rows_without_time_user_or_item_are_dropped_and_counted(world_logs, root, tmp_path):
    frame = pd.read_parquet(world_logs[1] / "impressions.parquet")
    frame.loc[[3, 4], "ts"] = np.nan
    frame.loc[5, "item_id"] = None
    frame.to_parquet(tmp_path / "impressions.parquet")
    train, held, desc = load_two_tower_frames(small_config(root, tmp_path))
    assert desc["dropped_rows"] == 3 and len(train) + len(held) == len(frame) - 3


def test_train_retrieval_command(world_logs, tmp_path, capsys, root):
    from stratarank.cli import main

    data, _ = read_yaml(root / "conf" / "train" / "two_tower_small.yaml")
    data["data"]["path"] = str(world_logs[1])
    data["training"]["epochs"] = 1
    data["eval"]["catalogue"] = "held_out"
    config = tmp_path / "tt.yaml"
    config.write_text(json.dumps(data))   # JSON is YAML
    assert main(["train-retrieval", "--config", str(config), "--registry", str(tmp_path / "reg"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "two_tower  popularity" in out and "(the items of the held-out rows)" in out
    assert "registered two_tower_small@v1" in out and (tmp_path / "reg" / "two_tower_small" / "v1").is_dir()
    metrics = json.loads((tmp_path / "reg" / "two_tower_small" / "v1" / "metrics.json").read_text())
    assert metrics["held_out"]["catalogue"] < 600 and set(metrics["held_out"]["two_tower"]) == {
        "recall@10", "recall@50", "recall@100"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tt\ndata: {path: x}\npositive: click\nmodel: {layers: [0]}\n")
    assert main(["train-retrieval", "--config", str(bad)]) == 1
    assert f"{bad}:4: model.layers[0]: 0 is out of range [1, 8192]" in capsys.readouterr().err


def test_a_requests_few_ids_hash_as_a_batch_does():
    from ranking import two_tower

    values = ["i1", None, float("nan"), "", "u7", 42, "i1", pd.NA, np.str_("x")] * 3
    small = two_tower._hash_values(values, 1000)
    batch = two_tower._hash_values(values * (two_tower.SMALL // len(values) + 1), 1000)[: len(values)]
    np.testing.assert_array_equal(small, batch)
    assert small[1] == small[2] == small[3] == small[7] == 0 and small[0] == small[6] > 0
