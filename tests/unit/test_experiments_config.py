"""experiments.config: the experiments YAML, every error at once with file:line and key path."""
import textwrap

import pytest

from experiments.config import experiments_from_dict, load_experiments, validate_experiments_file
from strategy.errors import ValidationError

HEAD = """\
strategy: {strategy}
metrics:
  ctr: {{type: ratio, numerator: {{event: click}}, denominator: {{event: impression}}}}
  clicks: {{type: mean, event: click}}
  reports: {{type: mean, event: report}}
"""


def write(tmp_path, body, strategy=None, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(HEAD.format(strategy=strategy) + textwrap.dedent(body))
    return path


def errors_of(path):
    with pytest.raises(ValidationError) as info:
        load_experiments(path)
    return [str(e) for e in info.value.errors]


def test_shipped_like_up_loads(root):
    c = load_experiments(root / "conf/experiments/like_up.yaml")
    (e,) = c.experiments
    assert (e.name, e.layer, e.range, e.control) == ("like_up", "ranking_weights", (0.0, 0.5), "control")
    assert e.variant("treatment").overrides == {"objectives.like.weight": 8.0}
    assert e.metrics == ("ctr", "clicks_per_user", "watch_time") and e.guardrails == ("reports_per_user",)
    assert c.holdout.share == 0.02 and c.strategies == ("conf/objectives/feed.yaml",)
    assert c.analysis_experiments() == [{
        "name": "like_up", "control": "control", "metrics": ["ctr", "clicks_per_user", "watch_time"],
        "guardrails": ["reports_per_user"], "variants": ["control", "treatment"], "weights": [0.5, 0.5]}]
    assert set(c.analysis_metrics()) == {"clicks_per_user", "watch_time", "ctr", "reports_per_user"}
    assert validate_experiments_file(root / "conf/experiments/like_up.yaml").startswith(
        "experiments: 1 layers, 1 experiments (like_up 2 variants 50% of ranking_weights)")


def test_every_error_of_a_file_at_once_with_line_path_and_suggestion(tmp_path, feed_yaml):
    path = write(tmp_path, """\
        layers:
          - name: weights
            salt: w-1
            experiments:
              - name: like_up
                range: [0.0, 0.5]
                variants:
                  control:   {weight: 0.5}
                  treatment: {weight: 0.6, overrides: {objectives.lik.weight: 8.0, blend.formula: weighted_sumx}}
                metrics: [ctr, clikcs]
                guardrails: [reports]
              - name: share_up
                range: [0.4, 0.8]
                variants:
                  control:   {weight: 0.5, wieght: 1}
                  treatment: {weight: 0.5, overrides: {objectives.share.weight: abc}, model: "bad model"}
                allowlist: {qa-1: treatmnt}
                metrics: [ctr]
          - name: other
            salt: w-1
            experiments:
              - name: like_up
                range: [0, 1.5]
                variants: {a: {weight: 1}}
                metrics: [ctr]
        """, strategy=feed_yaml)
    f = str(path)
    errs = errors_of(path)
    expected = [
        f"{f}:14: layers[0].experiments[0].variants.treatment.overrides.objectives.lik.weight: "
        "unknown objective 'lik'; did you mean 'like'?",
        f"{f}:14: layers[0].experiments[0].variants.treatment.overrides.blend.formula: "
        "'weighted_sumx' is not allowed; did you mean 'weighted_sum'?",
        f"{f}:12: layers[0].experiments[0].variants: variant weights sum to 1.1, not 1",
        f"{f}:15: layers[0].experiments[0].metrics[1]: unknown metric 'clikcs'; did you mean 'clicks'?",
        f"{f}:20: layers[0].experiments[1].variants.control.wieght: unknown key 'wieght'; did you mean 'weight'?",
        f"{f}:21: layers[0].experiments[1].variants.treatment.model: 'bad model' is not a model reference",
        f"{f}:21: layers[0].experiments[1].variants.treatment.overrides.objectives.share.weight: "
        "expected a number, got string",
        f"{f}:22: layers[0].experiments[1].allowlist.qa-1: unknown variant 'treatmnt'; did you mean 'treatment'?",
        f"{f}:18: layers[0].experiments[1].range: range [0.4, 0.8] overlaps experiment 'like_up' [0, 0.5]",
        f"{f}:28: layers[1].experiments[0].range[1]: 1.5 is out of range [0, 1]",
        f"{f}:29: layers[1].experiments[0].variants: an experiment needs at least 2 variants",
        f"{f}:27: layers[1].experiments[0].name: duplicate experiment name 'like_up'",
        f"{f}:25: layers[1].salt: salt 'w-1' is also used by layers[0]",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected), errs


def test_touching_ranges_are_fine_and_weights_may_differ(tmp_path, feed_yaml):
    path = write(tmp_path, """\
        layers:
          - name: weights
            salt: w-1
            experiments:
              - {name: a, range: [0.0, 0.5], metrics: [ctr], variants: {control: {weight: 0.2}, t: {weight: 0.8}}}
              - {name: b, range: [0.5, 1.0], metrics: [clicks], control: base,
                 variants: {base: {weight: 0.5}, t: {weight: 0.5, overrides: {exploration.epsilon: 0.1}}}}
        """, strategy=feed_yaml)
    c = load_experiments(path)
    assert [e.control for e in c.experiments] == ["control", "base"]
    assert c.experiment("b").to_analysis()["variants"] == ["base", "t"]
    with pytest.raises(KeyError, match="did you mean 'a'"):
        c.experiment("aa")


def test_two_layers_may_not_override_the_same_key_or_both_pick_a_model(tmp_path, feed_yaml):
    path = write(tmp_path, """\
        layers:
          - name: one
            salt: s-1
            experiments:
              - name: a
                range: [0, 1]
                metrics: [ctr]
                variants: {control: {weight: 0.5}, t: {weight: 0.5, overrides: {objectives.like.weight: 8}, model: m@2}}
          - name: two
            salt: s-2
            experiments:
              - name: b
                range: [0, 1]
                metrics: [ctr]
                variants: {control: {weight: 0.5}, t: {weight: 0.5, overrides: {objectives.like.weight: 2}, model: m@3}}
        """, strategy=feed_yaml)
    errs = errors_of(path)
    assert any(":14: layers[1]: layer 'two' overrides 'objectives.like.weight', which layer 'one'" in e for e in errs)
    assert any(":14: layers[1]: layer 'two' picks a model, and layer 'one' does too" in e for e in errs)


def test_overrides_need_a_strategy_and_the_strategy_file_must_exist(tmp_path, feed_yaml):
    body = """\
        layers:
          - name: one
            salt: s-1
            experiments:
              - {name: a, range: [0, 1], metrics: [ctr],
                 variants: {control: {weight: 0.5}, t: {weight: 0.5, overrides: {objectives.like.weight: 8}}}}
        """
    path = tmp_path / "nostrat.yaml"
    path.write_text(HEAD.split("\n", 1)[1].format() + textwrap.dedent(body))
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:") and "strategy: variants override strategy keys" in err
    missing = write(tmp_path, body, strategy="conf/objectives/nope.yaml", name="missing.yaml")
    (err,) = errors_of(missing)
    assert err == f"{missing}:1: strategy: strategy file not found: conf/objectives/nope.yaml"


def test_overrides_are_checked_against_every_strategy_named(tmp_path, root):
    body = """\
        layers:
          - name: one
            salt: s-1
            experiments:
              - {name: a, range: [0, 1], metrics: [ctr],
                 variants: {control: {weight: 0.5}, t: {weight: 0.5, overrides: {objectives.share.weight: 9}}}}
        """
    both = "[conf/objectives/feed.yaml, conf/objectives/kuairand.yaml]"
    (err,) = errors_of(write(tmp_path, body, strategy=both))
    assert "overrides.objectives.share.weight: unknown objective 'share'" in err
    assert "(strategy conf/objectives/kuairand.yaml)" in err
    assert load_experiments(write(tmp_path, body, strategy="conf/objectives/feed.yaml", name="ok.yaml")).experiments


def test_unknown_keys_bad_holdout_and_types(tmp_path, feed_yaml):
    path = write(tmp_path, """\
        holdout: {salt: h, share: 1.0}
        layer: []
        layers:
          - name: Bad-Name
            salt: s
            experiments:
              - {name: a, range: [0.5, 0.2], metrics: [], variants: {control: {weight: 0.5}, t: {weight: 0.5}},
                 stauts: running}
        """, strategy=feed_yaml)
    errs = errors_of(path)
    f = str(path)
    for want in (f"{f}:6: holdout.share: 1.0 is out of range [0, 1)",
                 f"{f}:7: layer: unknown key 'layer'; did you mean 'layers'?",
                 f"{f}:9: layers[0].name: 'Bad-Name' must match",
                 f"{f}:12: layers[0].experiments[0].range: empty range: hi 0.2 must be above lo 0.5",
                 f"{f}:12: layers[0].experiments[0].metrics: list at least one goal metric",
                 f"{f}:13: layers[0].experiments[0].stauts: unknown key 'stauts'; did you mean 'status'?"):
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == 6, errs


def test_metric_declarations_are_validated(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent("""\
        metrics:
          ctr: {type: ratoi, numerator: {event: click}}
        layers:
          - name: l
            salt: s
            experiments:
              - {name: a, range: [0, 1], metrics: [ctr], variants: {control: {weight: 0.5}, t: {weight: 0.5}}}
        """))
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:2: metrics.ctr.type: unknown metric type 'ratoi'") and "did you mean 'ratio'" in err


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("metrics: {}\nlayers:\n  - name: [unclosed\n")
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:") and "YAML syntax error" in err


def test_from_dict_with_loaded_strategies(feed_yaml):
    from strategy import load_strategy
    data = {"metrics": {"c": {"type": "mean", "event": "click"}}, "layers": [
        {"name": "l", "salt": "s", "experiments": [{"name": "a", "range": [0, 1], "metrics": ["c"],
                                                   "variants": {"control": {"weight": 0.5},
                                                                "t": {"weight": 0.5, "overrides": {"slate_size": 0}}}}]}]}
    with pytest.raises(ValidationError) as info:
        experiments_from_dict(data, strategies=[load_strategy(feed_yaml)])
    (e,) = info.value.errors
    assert e.path == "layers[0].experiments[0].variants.t.overrides.slate_size" and "out of range" in e.message
