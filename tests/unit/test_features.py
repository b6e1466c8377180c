"""Feature spec -> FeatureEncoder -> KeyedJaggedTensor: vocabularies, OOV, hashing, scaling, JSON state."""
import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from ranking.features import FeatureEncoder, feature_spec_from_dict, hash_token, load_feature_spec, tokenize
from strategy.errors import ValidationError

torch.set_num_threads(1)

SPEC = {
    "name": "t",
    "features": [
        {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
        {"name": "item_id", "type": "id", "column": "item_id", "dim": 4, "min_count": 2},
        {"name": "recent", "type": "id_list", "column": "recent", "table": "item_id", "max_len": 2},
        {"name": "text", "type": "text", "column": "text", "buckets": 32, "dim": 4},
        {"name": "score", "type": "dense", "column": "score"},
        {"name": "watch", "type": "dense", "column": "watch", "log1p": True},
    ],
}


def frame():
    return pd.DataFrame({
        "user_id": [1, 2, 3, 1, 2],
        "item_id": ["a", "b", "a", "c", "a"],
        "recent": [["a", "b", "c"], [], None, ["c"], np.array(["zz", "a"])],
        "text": ["Hello world", "hi", None, "hello", "HELLO, World!"],
        "score": [1.0, 2.0, np.nan, 4.0, 3.0],
        "watch": [0.0, 10.0, 100.0, 1000.0, 5.0],
    })


@pytest.fixture()
def enc():
    return FeatureEncoder(feature_spec_from_dict(SPEC)).fit(frame())


def test_vocab_oov_and_shared_table(enc):
    # counted on the truncated lists (max_len 2): a 3+2, b 1+1, c 1+1, zz 1 -> min_count 2 keeps a, b, c
    assert enc.vocabs["item_id"] == ["a", "b", "c"]
    assert "recent" not in enc.vocabs  # shares the item table
    rows = pd.DataFrame({"user_id": [1, 99], "item_id": ["c", "never"], "recent": [["a", "nope"], []],
                         "text": ["x", ""], "score": [0.0, 0.0], "watch": [0.0, 0.0]})
    kjt = enc.transform(rows).kjt
    d = kjt.to_dict()
    assert d["user_id"].values().tolist() == [1, 0]          # unknown user -> OOV row 0
    assert d["item_id"].values().tolist() == [3, 0]
    assert d["recent"].lengths().tolist() == [2, 0]
    assert d["recent"].values().tolist() == [1, 0]
    configs = {c.name: c for c in enc.embedding_bag_configs()}
    assert configs["t_item_id"].feature_names == ["item_id", "recent"]
    assert configs["t_item_id"].num_embeddings == 4           # 3 ids + OOV
    assert configs["t_text"].num_embeddings == 33


def test_id_list_truncation_and_missing(enc):
    d = enc.transform(frame()).kjt.to_dict()
    assert d["recent"].lengths().tolist() == [2, 0, 0, 1, 2]  # max_len 2; None -> empty


def test_text_tokens_are_stable_hashes(enc):
    assert tokenize("HELLO, World!") == ["hello", "world"]
    assert hash_token("hello", 32) == zlib.crc32(b"hello") % 32 + 1
    d = enc.transform(frame()).kjt.to_dict()["text"]
    rows = d.to_dense()
    assert sorted(rows[0].tolist()) == sorted({hash_token("hello", 32), hash_token("world", 32)})
    assert rows[0].tolist() == rows[4].tolist()               # same words, same ids
    assert rows[2].tolist() == []                             # missing text -> empty bag


def test_dense_standard_scaler_matches_sklearn(enc):
    from sklearn.preprocessing import StandardScaler

    f = frame()
    raw = np.stack([f["score"].fillna(f["score"].mean()).to_numpy(), np.log1p(f["watch"].to_numpy())], axis=1)
    expected = StandardScaler().fit(raw).transform(raw)
    got = enc.transform(f).dense.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(enc.scaler["mean"], list) and isinstance(enc.scaler["scale"][0], float)


def test_serving_rows_encode_like_training_rows(enc):
    """No train/serve skew: a request's rows encode exactly as the same rows inside the training frame."""
    f = frame()
    full = enc.transform(f)
    for idx in ([3], [4, 0, 2]):
        one = enc.transform(f.iloc[idx].reset_index(drop=True))
        sel = full.select(idx)
        assert torch.equal(one.dense, sel.dense)
        a, b = one.kjt, sel.kjt
        assert a.keys() == b.keys()
        assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())


def test_json_round_trip(enc, tmp_path):
    path = tmp_path / "enc.json"
    enc.save(path)
    state = json.loads(path.read_text())
    assert state["vocabs"]["item_id"] == ["a", "b", "c"]
    again = FeatureEncoder.load(path)
    a, b = enc.transform(frame()), again.transform(frame())
    assert torch.equal(a.dense, b.dense)
    assert torch.equal(a.kjt.values(), b.kjt.values())


def test_unknown_column_names_the_spec_line(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: t\nfeatures:\n  - {name: user_id, type: id, column: user_id}\n"
                         "  - {name: topic, type: id, column: topik}\n")
    spec = load_feature_spec(spec_file)
    with pytest.raises(ValidationError) as exc:
        FeatureEncoder(spec).fit(pd.DataFrame({"user_id": [1], "topic": ["x"]}))
    err = exc.value.errors[0]
    assert err.path == "features[1].column" and err.code == "unknown_column"
    assert err.file == str(spec_file) and err.line == 4
    assert "topik" in str(err) and "did you mean 'topic'" in str(err)


def test_spec_validation_reports_every_problem(tmp_path):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text("features:\n  - {name: a, type: idd}\n  - {name: b, type: id_list, table: nope}\n"
                         "  - {name: c, type: dense, dimm: 3}\n")
    with pytest.raises(ValidationError) as exc:
        load_feature_spec(spec_file)
    paths = {e.path for e in exc.value.errors}
    assert {"features[0].type", "features[1].table", "features[2].dimm"} <= paths
    assert all(e.line for e in exc.value.errors)


def test_kjt_feeds_an_embedding_bag_collection(enc):
    from torchrec import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(enc.embedding_bag_configs())
    out = ebc(enc.transform(frame()).kjt)
    assert out.values().shape == (5, 4 * 4)


def test_serving_may_lack_columns_only_when_allowed(enc):
    """An LLM candidate with no history: absent columns encode as missing values (OOV, empty, mean)."""
    rows = pd.DataFrame({"item_id": ["new-llm-item"], "text": ["hello world"]})
    with pytest.raises(ValidationError, match="user_id"):
        enc.transform(rows)
    got = enc.transform(rows, allow_missing=True)
    same = enc.transform(pd.DataFrame({"user_id": [None], "item_id": ["new-llm-item"], "recent": [None],
                                       "text": ["hello world"], "score": [None], "watch": [None]}))
    assert torch.equal(got.dense, same.dense)
    assert torch.equal(got.kjt.values(), same.kjt.values()) and torch.equal(got.kjt.lengths(), same.kjt.lengths())
    d = got.kjt.to_dict()
    assert d["user_id"].values().tolist() == [0] and d["item_id"].values().tolist() == [0]
    assert d["text"].lengths().tolist() == [2]                  # content features still there


def test_fill_serves_an_absent_training_only_column():
    spec = feature_spec_from_dict({"features": [
        {"name": "item_id", "type": "id", "column": "item_id"},
        {"name": "position", "type": "id", "column": "position", "dim": 2, "fill": 1},
        {"name": "x", "type": "dense", "column": "x"},
    ]})
    train = pd.DataFrame({"item_id": ["a", "b", "c"], "position": [1, 2, 3], "x": [0.0, 1.0, 2.0]})
    enc = FeatureEncoder(spec).fit(train)
    served = enc.transform(train.drop(columns=["position"]))          # no position column at serving
    pos = served.values[served.keys.index("position")]
    assert (pos == enc.transform(train.iloc[[0]]).values[1][0]).all() and (pos > 0).all()
    missing = enc.transform(train.assign(position=[None, 2, None]))   # missing values take the fill too
    assert missing.values[1][0] == pos[0] and missing.values[1][2] == pos[0]
    with pytest.raises(ValidationError, match="'x'"):                  # columns without a fill stay required
        enc.transform(train.drop(columns=["x"]))
    again = FeatureEncoder.from_state(json.loads(json.dumps(enc.state_dict())))
    assert (again.transform(train.drop(columns=["position"])).values[1] == pos).all()


def test_lookup_maps_recent_items_to_their_topics():
    spec = feature_spec_from_dict({"features": [
        {"name": "item_id", "type": "id", "column": "item_id"},
        {"name": "topic", "type": "id", "column": "topic"},
        {"name": "recent_topics", "type": "id_list", "column": "recent", "lookup": ["item_id", "topic"],
         "table": "topic"},
    ]})
    train = pd.DataFrame({"item_id": ["a", "b", "c", "a"], "topic": ["cats", "dogs", "cats", "cats"],
                          "recent": [["a", "b"], [], ["c", "zzz"], ["b"]]})
    enc = FeatureEncoder(spec).fit(train)
    assert enc.maps["recent_topics"] == {"a": "cats", "b": "dogs", "c": "cats"}
    assert enc.vocabs["topic"] == ["cats", "dogs"]                     # counted from the topic column only
    b = enc.transform(pd.DataFrame({"item_id": ["x"], "topic": ["dogs"], "recent": [["b", "a", "nope"]]}))
    assert b.values[2].tolist() == [2, 1, 0]                           # dogs, cats, unknown item -> OOV
    again = FeatureEncoder.from_state(json.loads(json.dumps(enc.state_dict())))
    assert again.maps == enc.maps
    direct = FeatureEncoder.from_state(enc.state_dict())               # no JSON round trip needed
    assert direct.spec.features == enc.spec.features and direct.maps == enc.maps
    with pytest.raises(ValidationError, match="table"):
        feature_spec_from_dict({"features": [{"name": "t", "type": "id", "column": "t"},
                                             {"name": "r", "type": "id_list", "column": "r", "lookup": ["i", "t"]}]})
