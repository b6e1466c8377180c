"""The serving fast path encodes exactly like the training path (no train/serve skew).

``FeatureEncoder.transform_columns`` (plain Python columns, no DataFrame) must give the same tensors,
bit for bit, as ``FeatureEncoder.transform(pd.DataFrame(columns), allow_missing=True)``; the scorer's
``RequestRows`` through ``TorchRecRanker.predict`` the same predictions as ``LoadedModel.predict``.
"""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from world import World, WorldConfig
from online.app import Scorer
from online.predictor import RankerChain, RequestRows, TorchRecRanker, _model_input
from ranking import features as features_mod
from ranking.features import FeatureEncoder, feature_spec_from_dict, load_feature_spec
from ranking.models import ModelConfig, ObjectiveConfig, build_model
from ranking.artifacts import load_model, save_model
from strategy import load_strategy, parse_request

torch.set_num_threads(1)


def assert_same_batch(a, b):
    assert a.keys == b.keys
    assert a.dense.dtype == b.dense.dtype == torch.float32
    assert torch.equal(a.dense, b.dense)
    for key, va, vb, la, lb in zip(a.keys, a.values, b.values, a.lengths, b.lengths):
        assert va.dtype == vb.dtype == np.int64, key
        assert la.dtype == lb.dtype == np.int32, key
        np.testing.assert_array_equal(la, lb, err_msg=key)
        np.testing.assert_array_equal(va, vb, err_msg=key)
    ka, kb = a.kjt, b.kjt
    assert ka.keys() == kb.keys()
    assert torch.equal(ka.values(), kb.values()) and torch.equal(ka.lengths(), kb.lengths())


def both(enc, columns, n):
    fast = enc.transform_columns(columns, n)
    slow = enc.transform(pd.DataFrame(columns) if columns else pd.DataFrame(index=range(n)), allow_missing=True)
    assert_same_batch(fast, slow)
    return fast


@pytest.fixture(scope="module")
def world(root):
    return World(WorldConfig.from_yaml(root / "conf" / "sim" / "small.yaml"))


@pytest.fixture(scope="module")
def logs(world):
    imp, _ = world.simulate_logs(4_000, progress=False)
    return imp


@pytest.fixture(scope="module")
def enc(root, logs):
    return FeatureEncoder(load_feature_spec(root / "conf" / "features" / "sim.yaml")).fit(logs)


def request_rows(world, seed, n=120, recent=None, body_edit=None):
    rng = np.random.default_rng(seed)
    cands = world.candidates("u1", n, rng)
    body = json.loads(json.dumps({"user_id": "u1", "candidates": cands}))  # as it arrives over HTTP
    if body_edit:
        body_edit(body)
    req = parse_request(body)
    return Scorer._frame(req, list(req.candidates), {"recent_items": recent} if recent is not None else {})


def test_scorer_rows_encode_like_a_frame(world, enc, logs):
    known = [str(i) for i in logs["item_id"].iloc[:7]]
    histories = [None, [], known, known + ["never-seen", "", "i-oov"] * 4, ["only-oov"]]
    for seed, recent in enumerate(histories):
        rows = request_rows(world, seed, recent=recent)
        batch = both(enc, rows.columns, len(rows))
        assert len(batch) == len(rows)
    rows = request_rows(world, 9, recent=known)
    d = enc.transform_columns(rows.columns, len(rows)).kjt.to_dict()
    assert (d["position"].values() == enc.transform_columns({"position": [1]}, 1).kjt.to_dict()["position"]
            .values()[0]).all()                                  # absent column -> the fill (position 1)
    assert d["text_tokens"].lengths().min() > 0                  # every sim candidate has a text
    assert (d["recent_items"].lengths() == len(known)).all()


def test_training_rows_encode_alike(enc, logs):
    rows = logs.iloc[:800]
    columns = {c: rows[c].tolist() for c in rows.columns}   # NaN generators, ints, lists of ids, ...
    fast = enc.transform_columns(columns, len(rows))
    assert_same_batch(fast, enc.transform(pd.DataFrame(columns)))
    assert_same_batch(fast, enc.transform(rows.reset_index(drop=True)))


def test_edge_values_encode_alike(world, enc, logs):
    n = 9
    known_item, known_creator = str(logs["item_id"].iloc[0]), str(logs["creator_id"].iloc[0])
    base = request_rows(world, 3, n=n, recent=[known_item]).columns
    cases = {
        "oov and missing ids": {"item_id": ["nope", None, known_item, "", "x", None, "y", known_item, "z"],
                                "creator_id": [known_creator, None] * 4 + ["oov"], "user_id": ["never"] * n},
        "integer ids": {"item_id": [1, 2, 3, 4, 5, 6, 7, 8, 9], "creator_id": [1.0, 2.5, np.nan] * 3},
        "mixed ids": {"item_id": [1, "2", None, 4.0, known_item, True, "a", "b", "c"]},
        "lists": {"user_recent_items": [[], None, [known_item], [known_item, "oov"] * 30, ["oov"],
                                        f"{known_item},,oov", (known_item,), [known_item], []]},
        "lists shared": {"user_recent_items": [[known_item, "oov"]] * n},
        "equal lists": {"user_recent_items": [[known_item, "oov"] for _ in range(n)]},
        "all None lists": {"user_recent_items": [None] * n},
        "lists of ints": {"user_recent_items": [[1, 2], [known_item]] + [[]] * (n - 2)},
        "array lists": {"user_recent_items": [np.array([known_item, "oov"])] * n},
        "texts": {"text": ["", None, "Hello, WORLD hello", "a " * 500, "ünïcode wörds 42", "x", "", "y", "z"]},
        "non-str texts": {"text": [1, None, "a b", 2.5, "", "c", "d", "e", "f"]},
        "dense ints and nan": {"duration": [1, 2, np.nan, 4.5, 0, -3, 7, 8, 2 ** 60],
                               "prior_score": [np.nan] * n},
        "dense odd": {"duration": ["3.5", None, "x", True, 1, 2, 3, 4, 2 ** 70],
                      "creator_followers": [None] * n},
        "position given": {"position": [1, 2, 3, None, 5, 6, 7, 8, 9]},
        "position strings": {"position": ["1", "2", None, "4", "5", "6", "7", "8", "oov"]},
    }
    for name, change in cases.items():
        columns = dict(base, **change)
        both(enc, columns, n)
        for col in change:   # and with the column absent altogether
            both(enc, {k: v for k, v in columns.items() if k != col}, n)
    both(enc, {}, n)                                       # every column absent
    both(enc, {k: v[:1] for k, v in base.items()}, 1)
    with pytest.raises(ValueError, match="expected 9"):
        enc.transform_columns(dict(base, item_id=["a"]), n)


def test_token_cache_is_a_bounded_lru(enc, monkeypatch):
    monkeypatch.setattr(features_mod, "TOKEN_CACHE_SIZE", 3)
    f = next(f for f in enc.spec.features if f.type == "text")
    fresh = FeatureEncoder.from_state(json.loads(json.dumps(enc.state_dict())))  # as saved and loaded
    for text in ("a", "b", "c", "a", "d"):
        fresh._tokens(text, f)
    assert list(fresh._token_cache(f)) == ["c", "a", "d"]   # "b" least recently used
    got = fresh.transform_columns({"text": ["a b", "a b", "e"]}, 3).kjt.to_dict()["text_tokens"]
    assert got.lengths().tolist() == [2, 2, 1] and len(fresh._token_cache(f)) == 3


OBJECTIVES = (ObjectiveConfig("click"), ObjectiveConfig("like"), ObjectiveConfig("share"),
              ObjectiveConfig("watch_time", "regression", "log1p", 0.5), ObjectiveConfig("report"))


def test_ranker_predicts_request_rows_like_loaded_model(tmp_path, world, enc, root):
    torch.manual_seed(0)
    model = build_model(enc, OBJECTIVES, ModelConfig(arch="mmoe", expert=(8,), num_experts=2, tower=(4,))).eval()
    save_model(tmp_path, "ranker", model.state_dict(), enc, ModelConfig(arch="mmoe", expert=(8,), num_experts=2,
               tower=(4,)), OBJECTIVES, {"valid": {}}, data={"rows": 1})
    loaded = load_model(tmp_path, "ranker")
    ranker = TorchRecRanker(loaded)
    for seed, recent in enumerate((None, ["i1", "i2", "oov"])):
        rows = request_rows(world, seed, n=60, recent=recent)
        fast = ranker.predict(rows)
        assert fast.dtype == np.float64 and fast.shape == (60, len(OBJECTIVES))
        np.testing.assert_array_equal(fast, loaded.predict(rows.frame(), allow_missing=True))
        np.testing.assert_array_equal(fast, ranker.predict(rows.frame()))
    assert ranker.predict(RequestRows({}, 0)).shape == (0, len(OBJECTIVES))
    # the chain hands RequestRows to the TorchRec ranker and a DataFrame to any other model
    assert _model_input(ranker, rows) is rows
    assert isinstance(_model_input(object(), rows), pd.DataFrame)
    strategy = load_strategy(root / "conf" / "objectives" / "feed.yaml")
    req = parse_request({"user_id": "u1", "candidates": world.candidates("u1", 30, np.random.default_rng(5))})
    rows = Scorer._frame(req, list(req.candidates), {})
    pred = RankerChain([ranker]).predict(strategy, req.candidates, lambda: rows)
    assert pred.degraded is None
    cols = [loaded.objectives.index(o) for o in strategy.objective_names]
    np.testing.assert_array_equal(pred.matrix, loaded.predict(rows.frame(), allow_missing=True)[:, cols])


def test_request_rows_frame_matches_the_columns(world):
    rows = request_rows(world, 1, n=20, recent=["i1"])
    frame = rows.frame()
    assert rows.frame() is frame and len(frame) == len(rows) == 20
    assert list(frame.columns) == list(rows.columns)
    assert frame["prior_score"].dtype == np.float64
    assert frame["user_recent_items"].iloc[0] == ["i1"]
    # the frame models other than TorchRec read is built as the scorer built it before (base
    # columns, then the candidates' extra features one by one, sorted)
    base = ["user_id", "item_id", "creator_id", "topic", "source", "generator", "prior_score", "text",
            "user_recent_items"]
    before = pd.DataFrame({c: rows.columns[c] for c in base})
    for key in [c for c in rows.columns if c not in base]:
        before[key] = rows.columns[key]
    pd.testing.assert_frame_equal(frame, before)


def test_spec_with_two_text_features_keeps_their_caches_apart():
    spec = feature_spec_from_dict({"name": "t", "features": [
        {"name": "short", "type": "text", "column": "text", "buckets": 64, "max_len": 1},
        {"name": "long", "type": "text", "column": "text", "buckets": 64, "max_len": 8}]})
    enc = FeatureEncoder(spec).fit(pd.DataFrame({"text": ["a b c", "d"]}))
    cols = {"text": ["a b c d e", "a b c d e", None]}
    d = both(enc, cols, 3).kjt.to_dict()
    assert d["short"].lengths().tolist() == [1, 1, 0] and d["long"].lengths().tolist() == [5, 5, 0]


class CountingStore:
    """A memory store that records each lookup's item ids (and can be made to fail)."""

    def __init__(self, store, fail=False):
        self.store, self.calls, self.fail = store, [], fail

    def lookup(self, user_id, item_ids, creator_ids=None, now=None):
        from online.features import StoreUnavailable

        self.calls.append(list(item_ids))
        if self.fail:
            raise StoreUnavailable("down")
        return self.store.lookup(user_id, item_ids, creator_ids, now=1.7e9)

    def close(self):
        pass


def test_item_counters_are_read_only_when_the_prior_serves(tmp_path, world, root):
    from online.app import build_serving
    from online.config import ServiceConfig
    from online.features import open_store

    mem = open_store("memory://")
    mem.apply([{"request_id": "r", "item_id": "i1", "user_id": "u1", "ts": 1.7e9, "position": 0},
               {"event_id": "e", "type": "click", "item_id": "i1", "user_id": "u1", "ts": 1.7e9}])
    config = ServiceConfig(strategy_files=(str(root / "conf/objectives/feed.yaml"),))
    serving = build_serving(config, chain=RankerChain())          # no model: the prior serves
    body = {"user_id": "u1", "candidates": [{"item_id": "i1", "source": "retrieval"},
                                            {"item_id": "i2", "source": "retrieval"}]}
    store = CountingStore(mem)
    out = Scorer(config, serving, None, store).rank(body)
    assert store.calls == [[], ["i1", "i2"]]                      # history, then the prior's counters
    full = mem.lookup("u1", ["i1", "i2"], [None, None], now=1.7e9).item_counters
    strategy = serving.strategies[serving.default_strategy]
    req = parse_request(body)
    expect = RankerChain().prior.predict(strategy, req.candidates, full)
    got = {i["item_id"]: i["predictions"] for i in out["items"]}
    for row, item in zip(expect, ("i1", "i2")):
        assert [got[item][o] for o in strategy.objective_names] == pytest.approx(list(row), rel=1e-12)
    # a store that fails: ranked anyway, on the prior without counters, and counted as degraded
    down = Scorer(config, serving, None, CountingStore(mem, fail=True))
    assert len(down.rank(body)["items"]) == 2
    assert down.metrics.render().count('degraded_responses_total{reason="feature_store_unavailable"} 1') == 1


def test_a_model_served_request_reads_the_users_history_only(tmp_path, world, enc, root):
    from online.app import build_serving
    from online.config import ServiceConfig
    from online.features import open_store

    torch.manual_seed(0)
    cfg = ModelConfig(arch="mmoe", expert=(8,), num_experts=2, tower=(4,))
    save_model(tmp_path, "ranker", build_model(enc, OBJECTIVES, cfg).eval().state_dict(), enc, cfg, OBJECTIVES,
               {"valid": {}}, data={"rows": 1})
    ranker = TorchRecRanker(load_model(tmp_path, "ranker"))
    config = ServiceConfig(strategy_files=(str(root / "conf/objectives/feed.yaml"),))
    serving = build_serving(config, chain=RankerChain([ranker]))
    store = CountingStore(open_store("memory://"))
    body = json.loads(json.dumps({"user_id": "u1", "candidates": world.candidates("u1", 40, np.random.default_rng(2))}))
    out = Scorer(config, serving, None, store).rank(body)
    assert store.calls == [[]] and out["degraded"] is False and out["model_version"] == "ranker@v1"
