"""Objectives YAML loader: types, ranges, unknown keys, line numbers, overrides."""
import textwrap

import pytest

from strategy import ValidationError, load_strategy, parse_override
from strategy.config import apply_overrides


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_feed_yaml_loads(feed_yaml):
    s = load_strategy(feed_yaml)
    assert s.name == "feed_v1"
    assert s.objective_names == ("click", "like", "share", "watch_time", "report")
    assert s.weights.tolist() == [1.0, 4.0, 8.0, 0.5, -50.0]
    assert s.objectives[3].transform == "log1p"
    assert s.guardrails[0].objective == "report" and s.guardrails[0].max == 0.05
    assert s.sources["llm"].max_share == 0.3 and s.sources["llm"].min_slots == 1
    assert s.diversity.key == "topic" and s.diversity.window == 5
    assert s.epsilon == 0.05 and s.slate_size == 20


def test_shipped_kuairand_yaml_loads(root):
    s = load_strategy(root / "conf/objectives/kuairand.yaml")
    assert s.objective_names == ("click", "long_view", "like", "comment", "profile_enter")


def test_typo_suggests_the_key_with_file_and_line(tmp_path):
    path = write(tmp_path, """\
        strategy: s
        objectives:
          click: {event: click, type: binary, weight: 1}
          like:
            event: like
            type: binary
            wieght: 4
        """)
    with pytest.raises(ValidationError) as exc:
        load_strategy(path)
    messages = [str(e) for e in exc.value.errors]
    assert any(
        m.startswith(f"{path}:7: objectives.like.wieght: unknown key 'wieght'; did you mean 'weight'?") for m in messages
    ), messages
    assert any(f"{path}:4: objectives.like.weight: required" in m for m in messages), messages


def test_all_errors_of_a_file_are_reported_at_once(tmp_path):
    path = write(tmp_path, """\
        strategy: Bad Name
        objectives:
          click: {event: click, type: binary, weight: one}
          watch: {event: watch, type: regresion, weight: 1, transform: log2}
        blend: {formula: weighted_max}
        guardrails:
          - {objective: reprt, max: 0.1, action: hide}
        sources:
          llm: {max_share: 1.5, min_slots: -1}
        exploration: {epsilon: 1.0}
        slate_size: 0
        """)
    with pytest.raises(ValidationError) as exc:
        load_strategy(path)
    paths = {e.path for e in exc.value.errors}
    assert {
        "strategy", "objectives.click.weight", "objectives.watch.type", "objectives.watch.transform",
        "blend.formula", "guardrails[0].objective", "guardrails[0].action", "sources.llm.max_share",
        "sources.llm.min_slots", "exploration.epsilon", "slate_size",
    } <= paths
    by_path = {e.path: e for e in exc.value.errors}
    assert "did you mean 'regression'" in by_path["objectives.watch.type"].message
    assert "allowed: binary, regression" in by_path["objectives.watch.type"].message
    assert by_path["guardrails[0].objective"].line == 7
    assert "did you mean 'weighted_sum'" in by_path["blend.formula"].message
    assert "(objectives: click, watch)" in by_path["guardrails[0].objective"].message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "strategy: s\nobjectives:\n  click: {event: click, type: binary\n")
    with pytest.raises(ValidationError) as exc:
        load_strategy(path)
    err = exc.value.errors[0]
    assert err.code == "syntax" and err.file == str(path) and err.line is not None


def test_quota_consistency_is_checked(tmp_path):
    path = write(tmp_path, """\
        strategy: s
        objectives: {click: {event: click, type: binary, weight: 1}}
        sources: {llm: {max_share: 0.1, min_slots: 3}}
        slate_size: 10
        """)
    with pytest.raises(ValidationError, match="min_slots 3 exceeds max_share 0.1"):
        load_strategy(path)


def test_calibration_map_must_be_monotone(tmp_path):
    path = write(tmp_path, """\
        strategy: s
        objectives:
          click: {event: click, type: binary, weight: 1, calibration: {x: [0, 0.5, 0.4], y: [0, 0.2, 0.3]}}
        """)
    with pytest.raises(ValidationError, match="strictly increasing"):
        load_strategy(path)


def test_overrides_by_dotted_path(feed_yaml):
    s = load_strategy(feed_yaml, dict([parse_override("objectives.like.weight=8")]))
    assert s.weights.tolist()[1] == 8.0
    s2 = s.with_overrides({"exploration.epsilon": 0.0, "rerank.diversity.window": 3, "guardrails.0.max": 0.1})
    assert s2.epsilon == 0.0 and s2.diversity.window == 3 and s2.guardrails[0].max == 0.1


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("objectives.lik.weight", 8, "unknown objective 'lik'; did you mean 'like'?"),
        ("objectives.like.wieght", 8, "did you mean 'weight'?"),
        ("objectives.like.weight", "heavy", "expected a number"),
        ("exploration.epsilon", 2, "out of range"),
        ("slat_size", 5, "did you mean 'slate_size'?"),
        ("guardrails.3.max", 1, "no list entry"),
    ],
)
def test_bad_overrides_are_rejected_with_the_path(feed_yaml, key, value, fragment):
    s = load_strategy(feed_yaml)
    with pytest.raises(ValidationError) as exc:
        s.with_overrides({key: value})
    assert fragment in str(exc.value)


def test_override_does_not_mutate_the_base(feed_yaml):
    s = load_strategy(feed_yaml)
    raw = apply_overrides(s.raw, {"objectives.like.weight": 9})
    assert raw["objectives"]["like"]["weight"] == 9
    assert s.raw["objectives"]["like"]["weight"] == 4.0


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=8") == ("a.b", 8)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=drop") == ("a.b", "drop")
    with pytest.raises(ValidationError):
        parse_override("no-equals-sign")
