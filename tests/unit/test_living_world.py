"""The living world: births and expiry, freshness, drifting interests, topic trends, scale, and the
default (static) world's logs unchanged from the release before the living world existed."""
import hashlib

import numpy as np
import pandas as pd
import pytest

from strategy import ValidationError
from world import World, WorldConfig

HOUR, DAY = 3600.0, 86_400.0


def living_config(root, **living):
    base = WorldConfig.from_yaml(root / "conf" / "sim" / "small.yaml")
    gens = [{**g, "items_per_hour": 20.0} for g in base.to_dict()["generators"]]
    lv = {"enabled": True, "initial_age_hours": 48, "lifetime_hours": 24, "lifetime_sigma": 0.5,
          "max_lifetime_hours": 96, **living}
    return WorldConfig.from_dict({**base.to_dict(), "generators": gens, "duration_days": 2,
                                  "human": {**base.to_dict()["human"], "items_per_hour": 10.0}, "living": lv})


def frame_digest(frame: pd.DataFrame) -> str:
    """A digest of a frame's values, floats rounded to 9 decimals: numpy's exp and log differ in the
    last bits between CPUs (AVX-512 or not), which moved the digest of unrounded true probabilities."""
    frame = frame.copy()
    for column in frame.columns[frame.dtypes == np.float64]:
        frame[column] = frame[column].round(9)
    if "user_recent_items" in frame:
        frame["user_recent_items"] = frame["user_recent_items"].map(lambda items: ",".join(items))
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()[:16]


def test_the_default_world_serves_the_logs_of_the_release_before_the_living_world(root):
    """Digests of conf/sim/small.yaml's logs computed with the code before the world package existed
    (experiments/world.py at 6d05d91, rerun on an AVX-512 machine with this digest): the living options
    off, the same seed gives the same logs."""
    world = World.from_yaml(root / "conf" / "sim" / "small.yaml")
    imp, ev = world.simulate_logs(progress=False)
    assert (frame_digest(imp), frame_digest(ev), len(imp), len(ev)) == ("f2438da75a91f77b", "b60e5eb9351cdc7c",
                                                                        20000, 8107)
    assert not world.living and "age_hours" not in imp and "born_ts" not in world.catalog()


def test_items_are_born_at_the_configured_rates_and_only_alive_ones_are_served(root):
    cfg = living_config(root)
    world = World(cfg)
    start, end = cfg.start_ts, cfg.start_ts + cfg.duration_days * DAY
    born = world.item_born_ts[cfg.n_items:]
    assert world.n_items_total == len(world.item_ids) == cfg.n_items + len(born)
    assert np.all(np.diff(born) >= 0) and born.min() >= start and born.max() <= end  # ids in birth order
    hours = cfg.duration_days * 24
    llm_new = world.item_is_llm[cfg.n_items:]
    for n, rate in ((llm_new.sum(), 40.0), ((~llm_new).sum(), 10.0)):   # Poisson counts: mean +- 4 sd
        assert abs(n - rate * hours) < 4 * np.sqrt(rate * hours)
    gen_new = world.item_generator[cfg.n_items:][llm_new]
    assert set(np.unique(gen_new)) == {0, 1}
    life_h = (world.item_expires_ts - world.item_born_ts) / HOUR
    assert life_h[cfg.n_items:].max() <= 96 + 1e-9
    assert world.alive(np.arange(cfg.n_items), start).all()      # the initial catalogue is alive at the start

    imp, _ = world.simulate_logs(20_000, progress=False)
    i = world.item_index(imp["item_id"].to_numpy())
    ts = imp["ts"].to_numpy()
    assert np.all((world.item_born_ts[i] <= ts) & (ts < world.item_expires_ts[i]))
    assert np.allclose(imp["age_hours"], (ts - world.item_born_ts[i]) / HOUR, atol=1e-3)
    late = ts > start + DAY
    assert (i[late] >= cfg.n_items).mean() > 0.3              # fresh items reach the feed as time goes on
    cand = world.candidates("u3", 30, np.random.default_rng(0), ts=end - HOUR)
    assert world.alive([c["item_id"] for c in cand], end - HOUR).all()
    assert all("age_hours" in c["features"] for c in cand)


def test_freshness_decays_the_click_probability_with_age(root):
    cfg = living_config(root, freshness_weight=1.5, freshness_half_life_hours=6, drift_share=0, trend_amplitude=0)
    world = World(cfg)
    item = cfg.n_items + 5
    born = world.item_born_ts[item]
    p = [world.true_probs("u1", item, 1, born + h * HOUR)["click"][0] for h in (0, 6, 48)]
    assert p[0] > p[1] > p[2]
    # the boost halves every half-life: logit(p) - (base logit) is 1.5, 0.75, ~0 (no other term moves)
    logit = np.log(np.array(p) / (1 - np.array(p)))
    assert logit[0] - logit[2] == pytest.approx(1.5 * (1 - 2 ** -8), abs=1e-6)
    assert logit[1] - logit[2] == pytest.approx(1.5 * (0.5 - 2 ** -8), abs=1e-6)


def test_drifting_users_move_between_personas_and_the_others_stay(root):
    cfg = living_config(root, drift_share=0.5, drift_days=2, trend_amplitude=0, freshness_weight=0)
    world = World(cfg)
    users = np.arange(cfg.n_users)
    topics = np.arange(cfg.n_topics)
    at = lambda t: world.affinity(users[:, None], topics[None, :], np.full((cfg.n_users, 1), cfg.start_ts + t))
    moved = np.abs(at(1 * DAY) - at(0)).max(axis=1)
    drifting = world._drift_on
    assert 0.35 < drifting.mean() < 0.65
    assert np.all(moved[~drifting] == 0) and np.median(moved[drifting]) > 0.1
    # a full cycle (2 x drift_days) brings every user back
    assert np.allclose(at(4 * DAY), at(0))


def test_topic_trends_rise_and_fall_with_their_periods(root):
    cfg = living_config(root, drift_share=0, trend_amplitude=0.7, trend_period_min_days=1, trend_period_max_days=3)
    world = World(cfg)
    t = cfg.start_ts + np.linspace(0, 3 * DAY, 200)
    trend = world.affinity(np.zeros(200, dtype=int), np.zeros(200, dtype=int), t) - world.user_affinity[0, 0]
    assert trend.max() == pytest.approx(0.7, abs=0.02) and trend.min() == pytest.approx(-0.7, abs=0.02)
    period = world._trend_period[0]
    assert DAY <= period <= 3 * DAY
    assert world.affinity(np.array([0]), np.array([0]), np.array([cfg.start_ts + period]))[0] == pytest.approx(
        world.affinity(np.array([0]), np.array([0]), np.array([cfg.start_ts]))[0])


def test_the_living_world_is_reproducible_from_its_seed(root):
    cfg = living_config(root)
    a, _ = World(cfg).simulate_logs(3_000, progress=False)
    b, _ = World(cfg).simulate_logs(3_000, progress=False)
    pd.testing.assert_frame_equal(a, b)
    c, _ = World(cfg.replace(seed=cfg.seed + 1)).simulate_logs(3_000, progress=False)
    assert not a["item_id"].equals(c["item_id"])


def test_the_shipped_living_world_holds_100k_items_and_10k_users(root):
    world = World.from_yaml(root / "conf" / "sim" / "living.yaml")
    cfg = world.config
    assert cfg.n_items == 100_000 and cfg.n_users == 10_000
    alive = [world.alive(np.arange(world.n_items_total), cfg.start_ts + d * DAY).sum() for d in (0, 1, 2, 3)]
    assert all(80_000 < n < 120_000 for n in alive)       # births keep the catalogue near its size
    imp, _ = world.simulate_logs(50_000, progress=False)          # 5,000 requests
    assert imp["user_id"].nunique() > 2_000 and imp["item_id"].nunique() > 30_000


@pytest.mark.parametrize("living, path, message", [
    ({"enabled": "yes"}, "living.enabled", "true or false"),
    ({"enabled": True, "lifetime_hours": 0}, "living.lifetime_hours", "out of range (0, 87600]"),
    ({"enabled": True, "trend_period_min_days": 5, "trend_period_max_days": 2}, "living.trend_period_min_days",
     "<= living.trend_period_max_days"),
    ({"enabled": True, "drift_shar": 0.5}, "living.drift_shar", "drift_share"),
])
def test_living_config_errors_name_the_key(living, path, message):
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_dict({"living": living})
    assert any(e.path == path and message in e.message for e in exc.value.errors), exc.value.errors


def test_a_catalogue_that_would_outgrow_the_limit_is_refused():
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_dict({"duration_days": 1000, "human": {"items_per_hour": 1_000_000},
                               "living": {"enabled": True}})
    assert exc.value.errors[0].path == "living" and "exceed" in exc.value.errors[0].message
