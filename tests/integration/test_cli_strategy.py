"""`stratarank validate` and `stratarank rank` as a product team runs them (real files, real process)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "stratarank.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_validate_ok_prints_one_summary_line_per_file(root):
    out = run("validate", "conf/objectives/feed.yaml", "conf/objectives/kuairand.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("conf/objectives/feed.yaml: OK strategy feed_v1: 5 objectives")


def test_validate_reports_every_error_with_file_line_and_path(tmp_path, root):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        strategy: s
        objectives:
          click: {event: click, type: binary, wieght: 1}
          like: {event: like, type: binray, weight: 2}
        """))
    out = run("validate", str(bad), "conf/objectives/feed.yaml", cwd=root)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert f"{bad}:3: objectives.click.wieght: unknown key 'wieght'; did you mean 'weight'?" in out.stderr
    assert f"{bad}:4: objectives.like.type: 'binray' is not allowed; did you mean 'binary'?" in out.stderr
    assert len(err) == 3  # wieght, the then-missing weight, binray
    assert "feed.yaml: OK" in out.stdout  # the valid file is still summarised


def test_validate_rejects_a_file_that_is_not_an_objectives_file(tmp_path, root):
    other = tmp_path / "other.yaml"
    other.write_text("hello: world\n")
    out = run("validate", str(other), cwd=root)
    assert out.returncode == 1 and "not an objectives file" in out.stderr


def test_rank_prints_the_v1_rank_response(root):
    out = run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", "conf/examples/request.json", cwd=root)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    request = json.loads((root / "conf/examples/request.json").read_text())
    assert body["request_id"] == "demo-req-1" and body["strategy"] == "feed_v1"
    assert len(body["items"]) == request["slate_size"]
    assert [i["rank"] for i in body["items"]] == list(range(1, 11))
    for item in body["items"]:
        assert set(item) >= {"item_id", "rank", "score", "source", "predictions", "reasons"}
        assert item["predictions"]["report"] <= 0.05 and item["reasons"]
    assert sum(i["source"] == "llm" for i in body["items"]) <= 3
    reasons = {d["reason"] for d in body["dropped"]}
    assert "duplicate" in reasons and "guardrail:report>0.05" in reasons


def test_rank_override_changes_the_slate(root):
    base = json.loads(run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", "conf/examples/request.json",
                          cwd=root).stdout)
    out = run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", "conf/examples/request.json",
              "--override", "objectives.click.weight=100", "--override", "exploration.epsilon=0", cwd=root)
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)["items"]
    assert [i["item_id"] for i in items] != [i["item_id"] for i in base["items"]]
    clicks = [i["predictions"]["click"] for i in items if i["source"] != "llm"]
    assert clicks[0] == max(clicks)


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"user_id": "u", "candidates": [{"source": "llm", "predictions": {}}]}, "candidates[0].item_id: required"),
        ({"user_id": "u", "candidates": [{"item_id": "a", "source": "x"}]},
         "candidates[0].predictions: required"),
        ({"user_id": "u", "strategy": "other", "candidates": []}, "strategy: request asks for strategy 'other'"),
    ],
)
def test_rank_bad_input_exits_1_with_the_field_path(tmp_path, root, body, fragment):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(body))
    out = run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", str(path), cwd=root)
    assert out.returncode == 1
    assert fragment in out.stderr


def test_rank_invalid_json_and_bad_override(tmp_path, root):
    path = tmp_path / "req.json"
    path.write_text("{not json")
    out = run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", str(path), cwd=root)
    assert out.returncode == 1 and "invalid JSON" in out.stderr
    out = run("rank", "--strategy", "conf/objectives/feed.yaml", "--input", "conf/examples/request.json",
              "--override", "objectives.lik.weight=3", cwd=root)
    assert out.returncode == 1 and "did you mean 'like'?" in out.stderr
