"""Model registry (versions, atomic current pointer), saved-model artifacts (load/predict), the registry's
imports, and the trainer's input checks."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ranking
from ranking.features import FeatureEncoder, feature_spec_from_dict
from ranking.models import ModelConfig, ObjectiveConfig, build_model, to_natural
from ranking.artifacts import load_model, save_model
from ranking.registry import current_version, list_models, resolve, set_current, versions
from ranking.train import clean_labels, label_columns, load_train_config, synthetic_impressions, train_from_config
from strategy.errors import ValidationError

torch.set_num_threads(1)

OBJECTIVES = (ObjectiveConfig("click"), ObjectiveConfig("watch_time", "regression", "log1p", 0.5))
SPEC = {"name": "t", "features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
    {"name": "item_id", "type": "id", "column": "item_id", "dim": 4},
    {"name": "recent_items", "type": "id_list", "column": "user_recent_items", "table": "item_id"},
    {"name": "text_tokens", "type": "text", "column": "text", "buckets": 64, "dim": 4},
    {"name": "prior_score", "type": "dense", "column": "prior_score"},
]}
CFG = ModelConfig(arch="mmoe", expert=(8,), num_experts=2, tower=(4,))


@pytest.fixture(scope="module")
def trained():
    df = synthetic_impressions(300, seed=3)
    enc = FeatureEncoder(feature_spec_from_dict(SPEC)).fit(df)
    torch.manual_seed(0)
    model = build_model(enc, OBJECTIVES, CFG).eval()
    return df, enc, model


def save(tmp_path, trained, **kw):
    _, enc, model = trained
    return save_model(tmp_path, "ranker", model.state_dict(), enc, CFG, OBJECTIVES,
                      {"valid": {"click": {"auc": 0.7}, "watch_time": {"rmse": 1.0}}}, data={"rows": 300}, **kw)


def test_versions_and_atomic_current(tmp_path, trained):
    v1 = save(tmp_path, trained)
    assert v1.name == "v1" and current_version(tmp_path, "ranker") == "v1"
    for f in ("weights.pt", "features.json", "objectives.json", "metrics.json", "manifest.json"):
        assert (v1 / f).exists()
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert manifest["name"] == "ranker" and manifest["version"] == "v1" and manifest["created"]
    assert manifest["model"]["config"]["arch"] == "mmoe"
    assert manifest["objectives"][1] == {"name": "watch_time", "type": "regression", "transform": "log1p"}
    v2 = save(tmp_path, trained)
    assert v2.name == "v2" and current_version(tmp_path, "ranker") == "v2"
    assert versions(tmp_path, "ranker") == ["v1", "v2"]
    set_current(tmp_path, "ranker", "v1")
    assert current_version(tmp_path, "ranker") == "v1"
    assert not [p for p in (tmp_path / "ranker").iterdir() if p.name.startswith(".")]  # no temp leftovers
    rows = list_models(tmp_path)
    assert [(r["version"], r["current"]) for r in rows] == [("v1", True), ("v2", False)]
    with pytest.raises(ValidationError, match="no version 'v9'"):
        set_current(tmp_path, "ranker", "v9")


def test_weights_load_without_pickle(tmp_path, trained):
    v = save(tmp_path, trained)
    state = torch.load(v / "weights.pt", weights_only=True)
    assert "ebc.embedding_bags.t_item_id.weight" in state
    json.loads((v / "features.json").read_text())  # plain JSON


def test_load_model_refs_and_predict_natural_units(tmp_path, trained):
    df, enc, model = trained
    save(tmp_path, trained)
    save(tmp_path, trained)
    for ref in ("ranker", "ranker@v1", str(tmp_path / "ranker" / "v2")):
        loaded = load_model(tmp_path, ref)
        assert loaded.name == "ranker" and loaded.objectives == ("click", "watch_time")
    assert load_model(tmp_path, "ranker@v1").version == "v1"
    loaded = load_model(tmp_path, "ranker")
    rows = df.iloc[:50].drop(columns=["click", "watch_time"])
    p = loaded.predict(rows)
    assert p.shape == (50, 2)
    assert ((p[:, 0] > 0) & (p[:, 0] < 1)).all() and (p[:, 1] >= 0).all()
    batch = enc.transform(rows)
    with torch.no_grad():
        expected = to_natural(model(batch.dense, batch.kjt), OBJECTIVES).numpy()
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
    assert loaded.predict(rows.iloc[:0]).shape == (0, 2)


def test_unknown_model_or_version(tmp_path, trained):
    save(tmp_path, trained)
    with pytest.raises(ValidationError, match="no model 'nope'"):
        resolve(tmp_path, "nope")
    with pytest.raises(ValidationError, match=r"versions: v1"):
        load_model(tmp_path, "ranker@v7")


# ---------------------------------------------------------------- the registry's imports

LIST_AND_RESOLVE = """
import sys
from ranking.registry import current_version, list_models, resolve, versions
root = sys.argv[1]
assert versions(root, "ranker") == ["v1"] and current_version(root, "ranker") == "v1"
assert resolve(root, "ranker").name == "v1" and [r["version"] for r in list_models(root)] == ["v1"]
heavy = ("torch", "torchrec", "lightgbm", "ranking.artifacts", "ranking.leaves", "ranking.lgbm", "ranking.models")
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_registry_lists_and_resolves_without_model_code(tmp_path, trained):
    """A fresh interpreter lists and resolves a registered model without importing torch, LightGBM or
    the modules that save and load models."""
    save(tmp_path, trained)
    out = subprocess.run([sys.executable, "-c", LIST_AND_RESOLVE, str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _ranking_imports() -> dict[str, set[str]]:
    """ranking module -> the ranking modules it imports, at module level or inside a function."""
    graph = {}
    for path in sorted(Path(ranking.__file__).parent.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ranking."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ranking.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_ranking_modules_import_no_circle():
    graph = _ranking_imports()
    assert graph["registry"] == set()
    assert "registry" in graph["artifacts"] and "artifacts" not in graph["registry"]

    def circle_from(module, trail):
        if module in trail:
            return trail[trail.index(module):] + [module]
        for dep in sorted(graph.get(module, ())):
            if found := circle_from(dep, trail + [module]):
                return found
        return None

    circles = [c for m in graph if (c := circle_from(m, []))]
    assert circles == []


# ---------------------------------------------------------------- trainer input checks


def test_missing_label_column_is_named():
    df = pd.DataFrame({"click": [1, 0]})
    objs = (ObjectiveConfig("click"), ObjectiveConfig("watch_time", "regression", "log1p", event="watch"))
    with pytest.raises(ValidationError) as exc:
        label_columns(objs, df, source="conf.yaml", lines={"objectives.watch_time": 7})
    err = exc.value.errors[0]
    assert err.path == "objectives.watch_time" and err.code == "missing_label" and err.line == 7
    assert "'watch_time', 'watch'" in err.message


def test_dropped_rows_are_counted_by_reason():
    df = pd.DataFrame({"click": [1, 0, None, 2, 1], "watch_time": [1.0, -1.0, 3.0, 0.0, "x"]})
    y, keep, reasons = clean_labels(df, OBJECTIVES, ["click", "watch_time"])
    assert keep.tolist() == [True, False, False, False, False]
    assert reasons == {"missing label 'click'": 1, "label 'click' not 0/1": 1,
                       "non-numeric label 'watch_time'": 1, "negative label 'watch_time' (log1p needs >= 0)": 1}


def test_train_config_errors_carry_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndata: {loader: tabel, path: a.parquet}\nfeatures: f.yaml\n"
                   "objectives: {click: {type: binary}}\nloss_weights: {clik: 1}\n"
                   "model: {arch: moe}\ntraining: {epochs: 0}\n")
    with pytest.raises(ValidationError) as exc:
        load_train_config(cfg)
    got = {e.path: e.line for e in exc.value.errors}
    assert got == {"data.loader": 2, "loss_weights.clik": 5, "model.arch": 6, "training.epochs": 7}


def test_train_in_process_and_register(tmp_path, root):
    df = synthetic_impressions(600, seed=2)
    df.loc[:4, "click"] = np.nan                              # 5 rows must be dropped, loudly
    df.to_parquet(tmp_path / "imp.parquet")
    (tmp_path / "spec.yaml").write_text(json.dumps(SPEC))
    (tmp_path / "train.yaml").write_text(json.dumps({
        "name": "tiny", "data": {"loader": "table", "path": str(tmp_path / "imp.parquet")},
        "features": str(tmp_path / "spec.yaml"),
        "objectives": {"click": {"type": "binary"}, "watch_time": {"type": "regression", "transform": "log1p"}},
        "model": {"arch": "ple", "expert": [8], "tower": [4]},
        "training": {"epochs": 2, "batch_size": 128, "threads": 1}, "registry": str(tmp_path / "reg")}))
    lines = []
    summary = train_from_config(load_train_config(tmp_path / "train.yaml"), log=lines.append, progress=False)
    assert any("dropped 5 of" in ln and "missing label 'click'" in ln for ln in lines)
    assert summary["version"] == "v1"
    m = summary["metrics"]
    assert set(m["valid"]) == {"click", "watch_time"} and 0 <= m["valid"]["click"]["auc"] <= 1
    loaded = load_model(tmp_path / "reg", "tiny")
    assert loaded.predict(df.iloc[:10]).shape == (10, 2)

    again = train_from_config(load_train_config(tmp_path / "train.yaml"), log=lambda *a: None, progress=False)
    assert again["version"] == "v2"                            # deterministic seeds: the same model again
    assert again["metrics"]["valid"] == m["valid"]
    w1 = torch.load(tmp_path / "reg" / "tiny" / "v1" / "weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "reg" / "tiny" / "v2" / "weights.pt", weights_only=True)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    from ranking.train import evaluate_registered

    ev = evaluate_registered(loaded, load_train_config(tmp_path / "train.yaml"), split="valid", log=lines.append)
    # the registered model, re-scored through its own encoder, reproduces the trainer's valid AUC
    assert ev["metrics"]["click"]["auc"] == pytest.approx(m["valid"]["click"]["auc"], abs=1e-6)
    assert {"gauc", "logloss", "ece"} <= set(ev["metrics"]["click"]) and "mae" in ev["metrics"]["watch_time"]
    assert "predictions" not in ev
    kept = evaluate_registered(loaded, load_train_config(tmp_path / "train.yaml"), split="valid", log=lines.append,
                               keep_predictions=True)
    # the kept rows are the scored ones: their AUC is the reported one
    assert kept["predictions"].shape == kept["labels"].shape == (kept["rows"], 2)
    from ranking.metrics import auc

    assert auc(kept["labels"][:, 0], kept["predictions"][:, 0]) == pytest.approx(ev["metrics"]["click"]["auc"], abs=1e-12)
