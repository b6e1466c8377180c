"""Weight tuning (experiments/tune.py, stratarank tune) in the simulated world."""
import json
from pathlib import Path

import pytest
import yaml

from experiments import tune as T
from strategy import ValidationError, load_strategy

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "conf/tune/feed_weights.yaml"


def test_shipped_config_loads():
    cfg = T.load_tune(SHIPPED)
    assert [p.key for p in cfg.params] == ["objectives.like.weight", "objectives.watch_time.weight"]
    assert cfg.metrics == ["watch", "like", "click", "report"] and cfg.strategy.epsilon == 0.0
    assert cfg.budget_requests == 2_400_000


def test_validation_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""strategy: {ROOT / 'conf/objectives/feed.yaml'}
search:
  - {{key: objectives.lik.weight, min: 0, max: 4}}
  - {{key: objectives.share.weight, min: 3, max: 1}}
goal: {{watchtime: 1}}
guardrails:
  - {{metric: like}}
online: {{budget_requests: 100, batch_requests: 50, colour: red}}
""")
    with pytest.raises(ValidationError) as exc:
        T.load_tune(bad)
    text = str(exc.value)
    assert "bad.yaml:3: search[0].key: not a settable strategy key: unknown objective 'lik'" in text
    assert "search[1]: empty box" in text
    assert "goal.watchtime: unknown outcome 'watchtime'" in text and "allowed: click, like" in text
    assert "guardrails[0]: a guardrail needs 'min_relative' or 'max_relative'" in text
    assert "online.colour: unknown key 'colour'" in text
    assert "online.budget_requests: 100 leaves no room for a variant" in text


def test_tune_cli_reaches_98_percent_of_the_true_optimum(tmp_path):
    """The shipped search (conf/tune/feed_weights.yaml, seed 7: 2.4M simulated requests in batches of
    80k after 12 offline candidates scored on 800 logged requests): the proposal reaches >= 98% of the
    true 9x9-grid optimum with every guardrail truly held. Measured: 100.1% (seeds 1-8: 98.9%-100.1%,
    guardrails held in 8/8)."""
    from stratarank.cli import main

    d = yaml.safe_load(SHIPPED.read_text())
    d.update(strategy=str(ROOT / "conf/objectives/feed.yaml"), world=str(ROOT / "conf/sim/small.yaml"),
             output=str(tmp_path / "ignored.yaml"))
    conf = tmp_path / "tune.yaml"
    conf.write_text(yaml.safe_dump(d))
    out, rep = tmp_path / "proposed.yaml", tmp_path / "report.json"
    before = (ROOT / "conf/objectives/feed.yaml").read_text()
    assert main(["tune", "--config", str(conf), "--out", str(out), "--report", str(rep), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    print({k: report[k] for k in ("pick", "fraction_of_optimum", "guardrails_held", "requests_used", "optimum")})
    assert report["requests_used"] <= 2_400_000
    assert report["guardrails_held"] is True
    assert report["fraction_of_optimum"] >= 0.98
    assert len(report["offline"]) == 12 and all("reliable" in r for r in report["offline"])
    assert {e["why"] for e in report["evaluations"]} >= {"bo"}
    # the proposal is a valid strategy file with the picked weights; the base file is untouched
    proposed = load_strategy(out)
    assert proposed.name == "feed_v1_tuned"
    w = dict(zip(proposed.objective_names, proposed.weights))
    assert w["like"] == pytest.approx(report["pick"][0], abs=1e-3)
    assert w["watch_time"] == pytest.approx(report["pick"][1], abs=1e-3)
    assert "NOT applied" in out.read_text()
    assert (ROOT / "conf/objectives/feed.yaml").read_text() == before
