"""The scorer follows the guarded-ramp controller's state file: steps and stops take effect without
a restart, assigned users never move, and a bad state file keeps the last good traffic split."""
import json

import pytest

from experiments import control as C
from online.app import create_app
from online.config import ServiceConfig, service_config_from_dict
from online.nearline import BusConfig, NearlineConfig
from strategy import ValidationError

USERS = [f"u{k}" for k in range(3000)]


@pytest.fixture
def ramp(tmp_path, root):
    path = tmp_path / "ramp.yaml"
    path.write_text(f"""experiments: {root / 'conf/experiments/like_up.yaml'}
experiment: like_up
state: {tmp_path / 'like_up.state.json'}
steps:
  - {{share: 0.1}}
  - {{share: 0.4}}
guardrails:
  - {{metric: reports_per_user, margin: 0.05}}
""")
    return path


@pytest.fixture
def app(tmp_path, ramp):
    config = ServiceConfig(experiments={"file": "conf/experiments/like_up.yaml", "ramps": (str(ramp),), "poll_s": 0},
                           nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}")))
    return create_app(config)


def _variants(app) -> dict:
    assigner = app.extensions["stratarank"].serving.assigner
    return {u: a.variant for u in USERS for a in assigner.assign(u) if a.experiment == "like_up" and not a.forced}


def _write_state(ramp, **changes):
    cfg = C.load_control(ramp)
    state = C.State("like_up", "running", 0, (0.0, 0.1), 0.0, 0.0)
    state = C.State(**{**state.__dict__, **changes})
    C.state_file(cfg).write_text(json.dumps(state.to_dict()))


def _rank(client, request_body, user):
    body = dict(request_body, user_id=user, request_id=f"r-{user}")
    for cand in body["candidates"]:
        cand.pop("predictions", None)
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200
    return [e["variant"] for e in r.get_json()["experiments"] if e["experiment"] == "like_up"]


@pytest.fixture
def request_body(root):
    return json.loads((root / "conf/examples/request.json").read_text())


def test_scorer_follows_ramp_steps_and_stops_without_restart(app, ramp, request_body, caplog):
    client = app.test_client()
    # before the controller has run: the ramp's first step, not the declared range [0, 0.5)
    first = _variants(app)
    assert 0.07 < len(first) / len(USERS) < 0.13
    # the controller advances: the range grows, nobody already assigned moves
    _write_state(ramp, step=1, range=(0.0, 0.4))
    early = next(iter(first))
    assert _rank(client, request_body, early) == [first[early]]  # this request picks up the new state
    grown = _variants(app)
    assert 0.35 < len(grown) / len(USERS) < 0.45
    assert all(grown[u] == v for u, v in first.items())
    newcomer = next(u for u in grown if u not in first)
    assert _rank(client, request_body, newcomer) == [grown[newcomer]]
    # a state the layer cannot take (a range past 1) is refused; the last good split stays
    _write_state(ramp, step=1, range=(0.0, 1.5))
    treated = next(u for u, v in grown.items() if v == "treatment")
    with caplog.at_level("ERROR", logger="stratarank.scorer"):
        assert _rank(client, request_body, treated) == ["treatment"]
    assert "ramp state not applied" in caplog.text and "like_up.state.json" in caplog.text
    assert _variants(app) == grown
    # the controller stops the experiment: everyone back to control, at once
    _write_state(ramp, status="stopped", step=1, range=(0.0, 0.4))
    assert _rank(client, request_body, treated) == []
    assert _variants(app) == {}


def test_ramp_configuration_is_validated(tmp_path, ramp):
    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"experiments": {"ramps": [str(ramp)], "poll_s": -1}})
    text = str(exc.value)
    assert "experiments.ramps: ramps need experiments.file" in text and "experiments.poll_s" in text
    bad = service_config_from_dict({"experiments": {"file": "conf/experiments/demo.yaml", "ramps": [str(ramp)]}})
    with pytest.raises(ValueError, match="experiment 'like_up' is not in the served experiments"):
        create_app(bad)
