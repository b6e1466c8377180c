"""experiments.dashboard HTML: names from a results bundle (which may come from any tool, not only a
validated experiments YAML) are escaped wherever the page shows them, in text and in attributes."""
import json
from html.parser import HTMLParser

from flask import Flask

from experiments.dashboard import dashboard_blueprint, render_static, write_results

ATTACK = "<script>alert(1)</script>\"'"
EXP, VARIANT, METRIC, LAYER = f"exp{ATTACK}", f"v{ATTACK}", f"m{ATTACK}", f"layer{ATTACK}"
DAY0 = 1_793_491_200.0


def bundle() -> dict:
    record = {"experiment": EXP, "variant": VARIANT, "metric": METRIC, "role": "guardrail", "control_mean": 0.1,
              "treatment_mean": 0.12, "abs_lift": 0.02, "rel_lift": 0.2, "rel_ci_low": 0.05, "rel_ci_high": 0.35,
              "p_value": 0.01, "p_value_adjusted": 0.02, "control_users": 1000, "users": 990, "guardrail": "fail",
              "harmful": f"increase{ATTACK}", "srm_p": 1e-05, "srm_alarm": True}
    experiment = {"name": EXP, "layer": LAYER, "status": f"running{ATTACK}", "range": [0.0, 0.5],
                  "control": "control", "description": f"why{ATTACK}", "srm_p": 1e-05, "srm_alarm": True,
                  "variants": {"control": {"weight": 0.5},
                               VARIANT: {"weight": 0.5, "overrides": {f"key{ATTACK}": f"value{ATTACK}"},
                                         "model": f"model{ATTACK}"}},
                  "users": {"control": 1000, VARIANT: 990}}
    decision = {"time": DAY0, "experiment": EXP, "action": "stop", "reasons": [f"reason{ATTACK}"],
                "range_before": [0.0, 0.5], "range_after": [0.0, 0.5], "status": "stopped", "step_before": 0,
                "step_after": 0, "evidence": [{"metric": METRIC, "variant": VARIANT, "estimate": 0.2, "ci_low": 0.05,
                                               "ci_high": 0.35, "margin": 0.02, "verdict": f"harm{ATTACK}"}]}
    return {"records": [record], "experiments": [experiment], "cumulative": [], "decisions": [decision],
            "problems": [f"log.jsonl:3: not a decision record ({ATTACK})"],
            "meta": {"generated_at": "2026-11-09 10:00 UTC", "config": f"conf{ATTACK}.yaml", "alpha": 0.05}}


class Parsed(HTMLParser):
    """The tags, attribute values and text a browser sees (entities decoded)."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(k, v) for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def test_names_are_escaped_in_text_and_attributes():
    page = render_static(bundle())
    assert "<script" not in page and ATTACK not in page  # nothing of a name reaches the page raw
    seen = Parsed(page)
    assert "script" not in seen.tags and "img" in seen.tags
    # each attribute holds the whole name, quotes included: nothing broke out of its quoting
    for attr in (("id", f"row-{EXP}"), ("href", f"#exp-{EXP}"), ("id", f"exp-{EXP}"), ("data-metric", METRIC),
                 ("data-variant", VARIANT), ("class", f"pill running{ATTACK}")):
        assert attr in seen.attrs, attr
    text = "".join(seen.text)
    for shown in (f"{EXP} (p < 0.0001, users control 1,000 / {VARIANT} 990)",  # the SRM banner
                  f"layer {LAYER} · traffic [0, 0.5)", f"why{ATTACK}", f"key{ATTACK} = value{ATTACK}, model model{ATTACK}",
                  f"{VARIANT} vs control", f"(harmful: increase{ATTACK})", f"FAIL {METRIC} ({VARIANT}): +20.00%",
                  f"reason{ATTACK}", f"{METRIC} ({VARIANT}) +20.00% [+5.00%, +35.00%] vs margin 2.00%: harm{ATTACK}",
                  f"log.jsonl:3: not a decision record ({ATTACK})", f"config conf{ATTACK}.yaml"):
        assert shown in text, shown


def test_served_pages_escape_names_and_the_missing_folder(tmp_path):
    res = tmp_path / "res"
    write_results(res, bundle())
    (res / "ramp.decisions.jsonl").write_text(json.dumps(bundle()["decisions"][0]) + "\n")
    app = Flask(__name__)
    app.register_blueprint(dashboard_blueprint(res))
    app.register_blueprint(dashboard_blueprint(tmp_path / f"gone{ATTACK}"), url_prefix="/gone", name="gone")
    client = app.test_client()
    index = client.get("/dashboard/").get_data(as_text=True)
    assert "<script" not in index and ("href", f"experiment/{EXP}") in Parsed(index).attrs
    missing = client.get("/gone/")
    assert missing.status_code == 404
    page = missing.get_data(as_text=True)
    assert "<script" not in page and f"gone{ATTACK}" in "".join(Parsed(page).text)
