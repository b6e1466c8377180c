"""The two-tower model's item bias, learnt freshness and impression loss (ranking/two_tower.py) on a
small living world: the served vectors' inner product is the model's whole logit at any reference
time, freshness is learnt from the logs' ages, the retriever re-bases its index without changing what
it retrieves, and the config's new fields are validated."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from online.corpus import Corpus, CorpusConfig
from online.retrieval import RetrievalConfig, Retriever, item_payload
from ranking.two_tower import (TwoTowerEncoder, encode_jagged_items, item_parts, load_two_tower_config,
                               train_two_tower, two_tower_config_from_dict)
from strategy.config import read_yaml
from strategy.errors import ValidationError
from strategy.items import parse_items
from strategy.retrieval import RetrievalPlan, RetrievalSource
from world import World, WorldConfig

torch.set_num_threads(1)
HOUR = 3600.0
EXTRAS = {"item_bias": True, "prior_score": True, "freshness_half_life_hours": 24, "impression_loss": 5.0}


def living_world(root) -> World:
    base = WorldConfig.from_yaml(root / "conf" / "sim" / "small.yaml").to_dict()
    gens = [{**g, "items_per_hour": 20.0} for g in base["generators"]]
    lv = {"enabled": True, "initial_age_hours": 48, "lifetime_hours": 24, "lifetime_sigma": 0.5,
          "max_lifetime_hours": 96, "freshness_weight": 1.5, "freshness_half_life_hours": 12}
    return World(WorldConfig.from_dict({**base, "generators": gens, "duration_days": 2,
                                        "human": {**base["human"], "items_per_hour": 10.0}, "living": lv}))


def config(root, path, **model):
    data, lines = read_yaml(root / "conf" / "train" / "two_tower_small.yaml")
    data["data"] = {**data["data"], "path": str(path), "loader": "table"}
    data["model"] = {**data["model"], **model}
    data["training"] = {**data["training"], "epochs": 3}
    return two_tower_config_from_dict(data, str(root / "conf" / "train" / "two_tower_small.yaml"), lines)


@pytest.fixture(scope="module")
def living(tmp_path_factory, root):
    world = living_world(root)
    logs, _ = world.simulate_logs(30_000, progress=False)
    folder = tmp_path_factory.mktemp("living-two-tower")
    logs.to_parquet(folder / "logs.parquet")
    trained = train_two_tower(config(root, folder / "logs.parquet", **EXTRAS), log=lambda *a: None, progress=False)
    return {"world": world, "logs": logs, "trained": trained, "T": float(logs["ts"].max()),
            "encoder": TwoTowerEncoder(trained.model, "living", "v1")}


def alive_writes(world: World, ts: float) -> list[dict]:
    cat = world.catalog()
    cat = cat[(cat["born_ts"] <= ts) & (cat["expires_ts"] > ts)]
    return [{"item_id": r.item_id, "source": "llm" if r.source == "llm" else "human", "creator_id": r.creator_id,
             "topic": r.topic, "text": r.text, "created_at": float(r.born_ts), "expires_at": float(r.expires_ts),
             **({"generator": {"model": r.generator, "prior_score": float(r.prior_score)}} if r.source == "llm"
                else {})} for r in cat.itertuples(index=False)]


def test_freshness_is_learnt_from_the_logged_ages(living):
    fresh = living["trained"].metrics["freshness"]
    assert fresh["weight"] > 0.2, fresh           # the world's truth gives a new item +1.5 on the click logit
    assert 1.0 < fresh["half_life_hours"] < 500, fresh
    assert living["trained"].metrics["history"][-1]["train_loss"] < living["trained"].metrics["history"][0]["train_loss"]


def test_served_inner_product_is_the_models_logit_at_any_reference_time(living):
    enc, model, T = living["encoder"], living["trained"].model, living["T"]
    items = alive_writes(living["world"], T)[:300]
    users = [{"user_id": u, "recent_items": list(r)[:5]} for u, r in
             living["logs"][["user_id", "user_recent_items"]].drop_duplicates("user_id").head(4).itertuples(index=False)]
    assert enc.dim == enc.config.output_dim + 2
    cfg = enc.config
    cols = {key: [it.get(key) for it in items] for key in ("item_id", "source", "creator_id", "topic", "text",
                                                           "generator", "prior_score")}
    from ranking.two_tower import Jagged

    parts, dense = item_parts(cfg, cols, len(items))
    v, b = encode_jagged_items(model, Jagged(len(items), parts), dense)
    u = enc.encode_users(users, T, T)[:, : cfg.output_dim] * cfg.temperature   # the unit user vectors back
    age = (T - np.array([it["created_at"] for it in items])) / HOUR
    with torch.no_grad():
        fresh = model.freshness(torch.from_numpy(age).float()).numpy()
    expected = u @ v.T / cfg.temperature + b[None, :] + fresh[None, :]
    for t0 in (T, T - 40 * HOUR, T + 10 * HOUR):
        got = enc.encode_users(users, T, t0) @ enc.encode_items(items, t0).T
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="reference_ts"):
        enc.encode_items(items)


def test_an_item_without_a_creation_time_gets_no_freshness_term(living):
    enc, T = living["encoder"], living["T"]
    item = alive_writes(living["world"], T)[0]
    young, undated = enc.encode_items([{**item, "created_at": T}, {**item, "created_at": None}], T)
    assert young[-1] == pytest.approx(1.0) and undated[-1] == 0.0
    np.testing.assert_allclose(young[:-1], undated[:-1], atol=1e-6)


def test_the_retriever_rebases_its_index_without_changing_what_it_retrieves(living, tmp_path):
    enc, world, T = living["encoder"], living["world"], living["T"]
    clock = {"now": T}
    corpus = Corpus(CorpusConfig(path=str(tmp_path / "corpus.db"), synchronous="normal"), clock=lambda: clock["now"])
    writes = [{k: v for k, v in w.items() if k != "expires_at"} for w in alive_writes(world, T)]   # no expiry
    for start in range(0, len(writes), 1000):
        corpus.upsert(parse_items({"items": writes[start:start + 1000]}))
    r = Retriever(RetrievalConfig(), corpus, enc, clock=lambda: clock["now"])
    r.sync()
    plan = RetrievalPlan((RetrievalSource("ann", 20),), 20)
    user = {"user_id": living["logs"]["user_id"].iloc[0]}
    clock["now"] = T + (4 * enc.model.half_life_hours + 1) * HOUR   # the newest item's factor passed 2^4
    before = [it.item_id for it in r.retrieve(plan, user).items]
    assert r.rebase()
    r._rebuilding.join(60)
    assert r._state.reference_ts == clock["now"] and r.rebuilds == 1 and len(r._state.index) == len(writes)
    after = [it.item_id for it in r.retrieve(plan, user).items]
    assert len(set(before) & set(after)) >= 19, (before, after)
    assert not r.rebase()     # just re-based (or not due at all)
    corpus.close()


def test_item_payload_carries_what_the_item_tower_reads(living, tmp_path):
    corpus = Corpus(CorpusConfig(path=str(tmp_path / "c.db")), clock=lambda: living["T"])
    w = next(x for x in alive_writes(living["world"], living["T"]) if x["source"] == "llm")
    corpus.upsert(parse_items({"items": [w]}))
    payload = item_payload(corpus.get_many([w["item_id"]])[w["item_id"]])
    assert payload["created_at"] == w["created_at"] and payload["prior_score"] == w["generator"]["prior_score"]
    corpus.close()


def test_learning_freshness_needs_the_age_column(root, tmp_path, living):
    logs = living["logs"].drop(columns=["age_hours"])
    logs.to_parquet(tmp_path / "no-age.parquet")
    with pytest.raises(ValidationError, match="model.freshness_half_life_hours.*age_hours"):
        train_two_tower(config(root, tmp_path / "no-age.parquet", freshness_half_life_hours=12), log=lambda *a: None,
                        progress=False)


@pytest.mark.parametrize("field,value,message", [
    ("item_bias", "yes", "expected true or false"), ("prior_score", 1, "expected true or false"),
    ("freshness_half_life_hours", 0, r"out of range \[0.01, "), ("freshness_half_life_hours", "12h", "number"),
    ("impression_loss", -1, r"out of range \[0, ")])
def test_the_new_model_fields_are_validated(root, tmp_path, field, value, message):
    with pytest.raises(ValidationError, match=message) as err:
        config(root, tmp_path / "x.parquet", **{field: value})
    assert f"model.{field}" in str(err.value)


def test_the_living_config_loads_with_every_extra(root):
    cfg = load_two_tower_config(root / "conf" / "train" / "two_tower_living.yaml")
    m = cfg.model
    assert m.item_bias and m.prior_score and m.freshness_half_life_hours and m.impression_loss > 0
    assert replace(m, item_bias=False, freshness_half_life_hours=None).extras == 0 and m.extras == 2
