"""GBDT leaf features (ranking/leaves.py): fit/transform/save/load, the ``leaves:`` train config section,
and no train/serve skew: training, the registry round trip (weights_only) and the online ranker's
plain-column path give the same leaf ids and the same predictions."""
import numpy as np
import pandas as pd
import pytest
import torch

from ranking.leaves import LeafFeatures, earliest
from ranking.train import synthetic_impressions
from strategy.errors import ValidationError

torch.set_num_threads(1)

DENSE = ["prior_score", "duration", "creator_followers", "text_len"]
SPEC = {"name": "t", "features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
    {"name": "prior_score", "type": "dense", "column": "prior_score"},
    {"name": "duration", "type": "dense", "column": "duration", "log1p": True},
    {"name": "creator_followers", "type": "dense", "column": "creator_followers", "log1p": True},
    {"name": "gbdt_leaves", "type": "id_list", "column": "gbdt_leaves", "dim": 4, "max_len": 64},
]}


# one id_list per objective + the GBDT raw scores as dense inputs (leaves.per_objective / leaves.scores)
SPEC_SPLIT = {"name": "t", "features": SPEC["features"][:-1] + [
    {"name": f"gbdt_leaves_{k}", "type": "id_list", "column": f"gbdt_leaves_{k}", "dim": 4, "max_len": 32}
    for k in ("click", "like")] + [
    {"name": f"gbdt_score_{k}", "type": "dense", "column": f"gbdt_score_{k}"} for k in ("click", "like")]}


@pytest.fixture(scope="module")
def frame():
    return synthetic_impressions(1500, seed=5)


@pytest.fixture(scope="module")
def fitted(frame):
    return LeafFeatures(["click", "like"], DENSE, n_trees=5, num_leaves=7, min_data_in_leaf=20).fit(frame)


def test_leaf_ids_one_per_tree_and_deterministic(frame, fitted):
    ids = fitted.transform(frame.iloc[:50])
    assert len(ids) == 50 and all(len(r) == 10 for r in ids)
    assert ids[0][0].startswith("click:t0:l") and ids[0][5].startswith("like:t0:l")
    assert len({i for r in ids for i in r}) > 10
    again = LeafFeatures(["click", "like"], DENSE, n_trees=5, num_leaves=7, min_data_in_leaf=20).fit(frame)
    assert again.transform(frame.iloc[:50]) == ids
    # labels may be passed apart from the frame
    apart = LeafFeatures(["click", "like"], DENSE, n_trees=5, num_leaves=7, min_data_in_leaf=20)
    apart.fit(frame[DENSE], frame[["click", "like"]].to_numpy())
    assert apart.transform(frame.iloc[:50]) == ids


def test_save_load_round_trip_uses_lightgbm_text(tmp_path, frame, fitted):
    fitted.save(tmp_path / "leaves")
    assert (tmp_path / "leaves" / "leaves.json").exists()
    assert (tmp_path / "leaves" / "trees" / "click.txt").read_text().startswith("tree")
    assert not list((tmp_path / "leaves").rglob("*.pkl"))
    back = LeafFeatures.load(tmp_path / "leaves")
    assert back.transform(frame) == fitted.transform(frame)
    assert back.column == "gbdt_leaves" and back.feature_columns == DENSE


def test_plain_columns_equal_the_frame_path(frame, fitted):
    rows = frame.iloc[:40].reset_index(drop=True)
    cols = {c: rows[c].tolist() for c in DENSE}
    cols["prior_score"] = [None if v != v else v for v in cols["prior_score"]]     # JSON: null, not NaN
    cols["creator_followers"] = [int(v) for v in cols["creator_followers"]]           # JSON ints
    assert fitted.transform(cols, len(rows)) == fitted.transform(rows)
    # an absent column is missing in every row, on both paths
    del cols["duration"]
    assert fitted.transform(cols, len(rows)) == fitted.transform(rows.drop(columns=["duration"]))
    cols["text_len"] = [str(v) for v in rows["text_len"]] + []                        # numeric strings
    assert fitted.transform(cols, len(rows)) == fitted.transform(rows.drop(columns=["duration"]))


def test_per_objective_columns_and_scores(frame):
    split = LeafFeatures(["click", "like"], DENSE, n_trees=5, num_leaves=7, min_data_in_leaf=20,
                         per_objective=True, scores=True).fit(frame)
    assert split.columns == ["gbdt_leaves_click", "gbdt_leaves_like", "gbdt_score_click", "gbdt_score_like"]
    rows = frame.iloc[:40].reset_index(drop=True)
    out = split.compute(rows)
    ids = split.transform(rows)
    assert out["gbdt_leaves_click"] == [r[:5] for r in ids] and out["gbdt_leaves_like"] == [r[5:] for r in ids]
    assert all(i.startswith("click:") for r in out["gbdt_leaves_click"] for i in r)
    x = rows[DENSE].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(out["gbdt_score_like"], split.model.boosters["like"].predict(x, raw_score=True))
    # the serving path (plain JSON-like columns) gives the very same values
    cols = {c: [None if v != v else v for v in rows[c].tolist()] for c in DENSE}
    plain = split.compute(cols, len(rows))
    assert plain.keys() == out.keys()
    for c in out:
        if c.startswith("gbdt_score_"):
            np.testing.assert_array_equal(plain[c], out[c])
        else:
            assert plain[c] == out[c]
    added = split.add_column(rows)
    assert added["gbdt_score_click"].dtype == np.float64 and added["gbdt_leaves_like"].tolist() == out["gbdt_leaves_like"]
    # the default: one column of all ids, no scores
    assert LeafFeatures(["click", "like"], DENSE).columns == ["gbdt_leaves"]


def test_per_objective_and_scores_round_trip(tmp_path, frame):
    split = LeafFeatures(["click", "like"], DENSE, n_trees=3, num_leaves=7, min_data_in_leaf=20,
                         per_objective=True, scores=True).fit(frame)
    back = LeafFeatures.load(split.save(tmp_path / "leaves"))
    assert back.per_objective and back.scores and back.columns == split.columns
    a, b = split.compute(frame), back.compute(frame)
    assert a["gbdt_leaves_like"] == b["gbdt_leaves_like"]
    np.testing.assert_array_equal(a["gbdt_score_click"], b["gbdt_score_click"])


def test_earliest_fraction_by_time():
    df = pd.DataFrame({"ts": [5.0, 1.0, 4.0, 2.0, 3.0]})
    assert earliest(df, 0.4).tolist() == [False, True, False, True, False]
    assert earliest(df, 1.0).all()


@pytest.mark.parametrize("leaves, path, words", [
    ({"n_tree": 5}, "leaves.n_tree", ["n_trees"]),
    ({"n_trees": 0}, "leaves.n_trees", ["[1, 10000]"]),
    ({"fit_fraction": 1.5}, "leaves.fit_fraction", ["1"]),
    ({"objectives": ["clik"]}, "leaves.objectives[0]", ["click", "like"]),
    ({"objectives": ["watch_time"]}, "leaves.objectives[0]", ["binary"]),
    ({"column": "bad column"}, "leaves.column", []),
    ({"per_objective": "yes"}, "leaves.per_objective", ["true or false"]),
    ({"scores": 1}, "leaves.scores", ["true or false"]),
    ("yes", "leaves", []),
])
def test_leaves_section_is_validated(small_train_config, leaves, path, words):
    from ranking.train import load_train_config

    _, cfg_path = small_train_config(SPEC, rows=1200, name="hyb", leaves=leaves)
    with pytest.raises(ValidationError) as exc:
        load_train_config(cfg_path)
    errors = {e.path: e.message for e in exc.value.errors}
    assert path in errors, errors
    for w in words:
        assert w in errors[path], errors[path]


def test_spec_must_read_the_leaf_column(small_train_config):
    from ranking.train import load_train_config, prepare

    spec = {"name": "t", "features": SPEC["features"][:-1]}
    _, cfg_path = small_train_config(spec, rows=1200, name="hyb", leaves={"n_trees": 5})
    with pytest.raises(ValidationError) as exc:
        prepare(load_train_config(cfg_path), log=lambda *a: None)
    assert [e.path for e in exc.value.errors] == ["leaves.column"]
    short = {"name": "t", "features": SPEC["features"][:-1] + [dict(SPEC["features"][-1], max_len=8)]}
    _, cfg_path = small_train_config(short, rows=1200, name="hyb", leaves={"n_trees": 5})
    with pytest.raises(ValidationError) as exc:
        prepare(load_train_config(cfg_path), log=lambda *a: None)
    assert [e.path for e in exc.value.errors] == ["leaves.n_trees"]
    # per_objective: one id_list per objective; scores: a dense feature per objective
    _, cfg_path = small_train_config(SPEC, rows=1200, name="hyb",
                                     leaves={"n_trees": 5, "per_objective": True, "scores": True})
    with pytest.raises(ValidationError) as exc:
        prepare(load_train_config(cfg_path), log=lambda *a: None)
    errors = [(e.path, e.message) for e in exc.value.errors]
    assert [p for p, _ in errors] == ["leaves.column", "leaves.column", "leaves.scores", "leaves.scores"], errors
    assert "gbdt_leaves_click" in errors[0][1] and "gbdt_score_like" in errors[3][1]
    bad = {"name": "t", "features": [dict(f, type="id_list", max_len=4, dim=4) if f["name"] == "gbdt_score_like"
                                     else f for f in SPEC_SPLIT["features"]]}
    _, cfg_path = small_train_config(bad, rows=1200, name="hyb",
                                     leaves={"n_trees": 5, "per_objective": True, "scores": True})
    with pytest.raises(ValidationError) as exc:
        prepare(load_train_config(cfg_path), log=lambda *a: None)
    assert [e.path for e in exc.value.errors] == ["leaves.scores"]


@pytest.mark.parametrize("extra, spec, added", [
    ({}, SPEC, ["gbdt_leaves"]),
    ({"per_objective": True, "scores": True}, SPEC_SPLIT,
     ["gbdt_leaves_click", "gbdt_leaves_like", "gbdt_score_click", "gbdt_score_like"]),
])
def test_train_register_serve_without_skew(tmp_path, small_train_config, extra, spec, added):
    """Training, ``load_model`` (weights_only) and the scorer's plain-column path predict the same."""
    from online.predictor import RequestRows, TorchRecRanker
    from ranking.models import build_model, to_natural
    from ranking.artifacts import load_model, save_model
    from ranking.train import (fit, load_train_config, predict_outputs, prepare, seed_everything,
                               train_from_config)

    df, cfg_path = small_train_config(spec, rows=1200, name="hyb", leaves={
        "n_trees": 5, "num_leaves": 7, "min_data_in_leaf": 20, "fit_fraction": 0.7, **extra})
    cfg = load_train_config(cfg_path)
    assert cfg.leaves.objectives == ("click", "like")            # default: the binary objectives
    lines = []
    prep = prepare(cfg, log=lines.append)
    assert prep.leaves is not None and prep.leaves.fit_rows < len(prep.train)
    assert any(ln.startswith("leaves: 5 trees x 2 objectives") for ln in lines)
    assert prep.leaves.columns == added
    for c in added:
        if c.startswith("gbdt_leaves"):
            assert c in prep.encoder.sparse_keys and len(prep.encoder.vocabs[c]) > 10
        else:
            assert c in prep.encoder.spec.columns
    seed_everything(0)
    model = build_model(prep.encoder, cfg.objectives, cfg.model)
    result = fit(model, prep, cfg.training, log=lambda *a: None, progress=False)
    model.load_state_dict(result["best_state"])
    model.eval()
    trained = to_natural(torch.from_numpy(predict_outputs(model, prep.test, 4096)), cfg.objectives).double().numpy()

    path = save_model(tmp_path / "reg2", "hyb", model.state_dict(), prep.encoder, cfg.model, prep.objectives, {},
                      leaves=prep.leaves)
    assert (path / "leaves" / "leaves.json").exists()
    loaded = load_model(tmp_path / "reg2", "hyb")
    assert loaded.leaves is not None and not set(added) & set(loaded.columns) and "duration" in loaded.columns
    n_test = len(prep.test)
    test_rows = df.sort_values("ts", kind="mergesort").iloc[len(df) - n_test:].reset_index(drop=True)
    served = loaded.predict(test_rows)                        # raw rows: the leaves are computed on load
    np.testing.assert_allclose(served, trained, rtol=1e-6, atol=1e-7)

    ranker = TorchRecRanker(loaded)
    spec_cols = sorted(loaded.columns)
    rows = test_rows.iloc[:60]
    columns = {c: [None if isinstance(v, float) and v != v else v for v in rows[c].tolist()] for c in spec_cols}
    fast = ranker.predict(RequestRows(columns, len(rows)))
    np.testing.assert_array_equal(fast, ranker.predict(pd.DataFrame(columns)))
    np.testing.assert_allclose(fast, served[:60], rtol=1e-6, atol=1e-7)

    summary = train_from_config(cfg, log=lambda *a: None, progress=False)   # end to end: registered with leaves
    reg = load_model(tmp_path / "reg", "hyb")
    assert reg.leaves is not None and reg.manifest["leaves"]["column"] == "gbdt_leaves"
    assert 0 <= summary["metrics"]["valid"]["click"]["auc"] <= 1
    assert reg.predict(test_rows.iloc[:5]).shape == (5, 3)
