"""bench/feed_recall_bench.py's information ceilings on a small living world.

In a world whose truth has no part the ceiling cannot know (no LLM items, item quality = the creator's,
no creator affinity, no LLM attitude), the true-affinity ceiling is the true click logit up to the
user's constant: it ranks the alive items exactly as the truth does. The estimated affinities are the
smoothed per-topic counts of the user's logged impressions.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from feed_recall_bench import CEILINGS, CLICK_PRIOR, EXPOSURE_PRIOR, ceiling_scorer  # noqa: E402 - bench/ is not a package
from world import World  # noqa: E402


@pytest.fixture(scope="module")
def logged():
    world = World.from_yaml(ROOT / "conf/sim/living.yaml", n_users=300, n_items=4000, n_creators=80,
                            llm_share=0.0, generators=[], impressions=20_000,
                            human={"quality_mean": 0.0, "quality_sd": 0.0, "creator_quality_sd": 0.5,
                                   "harm_rate": 0.05, "items_per_hour": 60},
                            effects={"creator_affinity": 0.0, "llm_attitude": 0.0})
    imp, _ = world.simulate_logs(20_000, progress=False)
    ts = float(imp["ts"].max())
    alive = np.flatnonzero((world.item_born_ts <= ts) & (world.item_expires_ts > ts))
    return world, imp, ts, alive


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_true_affinity_ceiling_is_the_truth_when_every_part_is_knowable(logged):
    world, imp, ts, alive = logged
    score = ceiling_scorer(world, alive, ts, imp)
    for user in imp["user_id"].unique()[:5]:
        p = world.true_probs(np.full(len(alive), user, dtype=object), alive, np.ones(len(alive)),
                             ts=np.full(len(alive), ts))["click"]
        gap = _logit(p) - score(user)[CEILINGS[0]]
        assert np.ptp(gap) < 1e-9   # the user's base rate and bias only


def test_estimated_affinities_are_the_users_smoothed_topic_counts(logged):
    world, imp, ts, alive = logged
    score = ceiling_scorer(world, alive, ts, imp)
    rate = imp["click"].mean()
    user = imp["user_id"].value_counts().index[0]
    mine = imp[imp["user_id"] == user]
    scores = score(user)
    topics = np.array(world.topic_names)[world.item_topic[alive]]
    affinity = world.config.effects.affinity * world.affinity(np.full(len(alive), world.user_index([user])[0]),
                                                              world.item_topic[alive], ts)
    item_part = scores[CEILINGS[0]] - affinity
    for topic in world.topic_names:
        at = topics == topic
        if not at.any():
            continue
        rows = mine[mine["topic"] == topic]
        n, c = len(rows), rows["click"].sum()
        clicks = np.log((c + CLICK_PRIOR * rate) / (n + CLICK_PRIOR) / rate)
        exposure = np.log((n + EXPOSURE_PRIOR) / (len(mine) + world.config.n_topics * EXPOSURE_PRIOR))
        np.testing.assert_allclose(scores[CEILINGS[1]][at] - item_part[at], clicks, atol=1e-9)
        np.testing.assert_allclose(scores[CEILINGS[2]][at] - item_part[at], exposure, atol=1e-9)
