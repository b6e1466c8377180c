"""`stratarank demo --scenario retrieval` at a tiny scale: the world's candidate generator (/v1/rank) vs the
engine's own retrieval (/v1/feed) on a small living world, checked on the bus the scorer wrote."""
import re
import subprocess
import sys

from experiments.assignment import Assigner
from experiments.config import load_experiments
from online.bus import open_bus

# a small living world whose items live half an hour and are born 10 a second, so a few seconds of
# closed loop see new items written to the corpus
TINY_WORLD = """
seed: 3
n_users: 60
n_items: 2000
n_creators: 120
n_topics: 8
llm_share: 0.3
slate_size: 10
start_ts: 1767225600
duration_days: 0.125   # the scenario keeps the first hour (its T: 2 h before the end)
generators:
  - {name: sim-gpt-large, share: 0.6, quality_mean: 0.3, quality_sd: 0.5, harm_rate: 0.02, items_per_hour: 9000}
  - {name: sim-llama-small, share: 0.4, quality_mean: -0.6, quality_sd: 0.8, harm_rate: 0.08, items_per_hour: 9000}
human: {quality_mean: 0.0, quality_sd: 0.4, creator_quality_sd: 0.5, harm_rate: 0.01, items_per_hour: 18000}
living: {enabled: true, initial_age_hours: 0.5, lifetime_hours: 0.5, max_lifetime_hours: 2}
"""


def impressions(bus_dir):
    bus = open_bus(f"embedded://{bus_dir}")
    consumer = bus.consumer("test-retrieval", ["impressions"])
    rows, idle = [], 0
    while idle < 2:
        batch = consumer.poll(10_000, 0.5)
        idle = 0 if batch else idle + 1
        rows += [rec.value for rec in batch]
    consumer.close()
    bus.close()
    return rows


def test_the_retrieval_scenario_serves_both_arms_from_their_own_candidates(tmp_path, root):
    world = tmp_path / "tiny_living.yaml"
    world.write_text(TINY_WORLD)
    out = tmp_path / "retrieval"
    proc = subprocess.run(
        [sys.executable, "-m", "stratarank.cli", "demo", "--scenario", "retrieval", "--world", str(world),
         "--out", str(out), "--impressions", "90000", "--epochs", "3", "--users", "60", "--requests", "2",
         "--concurrency", "2"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "Closed-loop A/B test retrieval: own_retrieval vs generator" in text
    for metric in ("likes_per_user", "clicks_per_user", "ctr", "reports_per_user"):
        assert re.search(rf"^{metric} .*(covers truth|MISSES truth|not significant|PASS|better|worse)", text, re.M)
    users = re.search(r"^users: generator (\d+), own_retrieval (\d+);", text, re.M)
    assert users and int(users[1]) > 0 and int(users[2]) > 0 and int(users[1]) + int(users[2]) == 60
    assert "arms: the scorer's assignment equals the client's in all 120 answers" in text
    assert re.search(r"^impressions on fresh LLM items \(LLM, younger than 24 h\): generator [\d.]+%, "
                     r"own_retrieval [\d.]+%", text, re.M)
    assert re.search(r"^latency /v1/feed, own_retrieval \(client side\): p50 [\d.]+ ms, p99", text, re.M)
    assert re.search(r"^latency /v1/rank, generator \(client side\): p50 [\d.]+ ms, p99", text, re.M)
    assert "errors 0" in text
    # items born during the loop went into the corpus (the loop waits until both workers indexed them)
    born = re.search(r"then ([\d,]+) born during the loop written by POST /v1/items before each round "
                     r"\(indexed by both workers\); [\d,]+ of those served", text)
    assert born and int(born[1].replace(",", "")) > 0
    assert (out / "dashboard.html").stat().st_size > 10_000 and (out / "report.txt").exists()
    for model in ("feed_mmoe", "two_tower_living"):
        assert (out / "registry" / model / "current").exists()

    # on the bus: both arms served, each user under the arm the assignment gives them, the feed's items found
    # by the retrieval sources, and the generator's candidates carried what a corpus candidate carries
    rows = impressions(out / "bus")
    assert len(rows) == 120 * 20
    assigner = Assigner(load_experiments(root / "conf/experiments/retrieval.yaml"))
    arms = set()
    for row in rows:
        arm = [e["variant"] for e in row["experiments"] if e["experiment"] == "retrieval"]
        assert arm == [a.variant for a in assigner.assign(row["user_id"])]
        arms.add(arm[0])
        features = set(row["features"]) - {"creator_id", "topic", "text", "generator", "prior_score",
                                           "user_recent_items"}
        if arm == ["own_retrieval"]:
            assert features == {"age_hours", "text_len", "retrieved_by"} and row["features"]["retrieved_by"]
        else:
            assert features == {"age_hours", "text_len"}
    assert arms == {"generator", "own_retrieval"}
