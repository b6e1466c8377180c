"""ranking.datasets: the KuaiRand loader (real file + synthetic folders) and the simulated-log loader."""
import numpy as np
import pandas as pd
import pytest

from ranking.baselines import SmoothedItemPopularity
from ranking.datasets import (
    KUAIRAND_OBJECTIVES,
    add_history_features,
    encode_user_features,
    kuairand_dir,
    load_kuairand,
    load_sim_logs,
)
from strategy.errors import ValidationError

OBJECTIVES = list(KUAIRAND_OBJECTIVES)


def _write_kuairand(folder, n=600, seed=0, drop=()):
    """A small folder in the KuaiRand layout: dates 20220408..20220421."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    dates = np.array([20220408 + d for d in range(11)] + [20220419, 20220420, 20220421])
    df = pd.DataFrame({
        "user_id": rng.integers(0, 20, n), "video_id": rng.integers(100, 160, n),
        "date": rng.choice(dates, n), "hourmin": rng.integers(0, 24, n) * 100,
        "time_ms": np.arange(n) * 1000 + 1_649_000_000_000,
        "is_click": rng.integers(0, 2, n), "is_follow": 0, "is_comment": rng.integers(0, 2, n),
        "is_forward": 0, "long_view": rng.integers(0, 2, n), "play_time_ms": 1000,
        "duration_ms": rng.choice([0, 15000, 60000], n), "comment_stay_time": 0,
        "is_profile_enter": rng.integers(0, 2, n), "label": rng.integers(0, 2, n), "timestamp": "x",
    })
    df.drop(columns=list(drop)).to_csv(folder / "interactions.tsv", sep="\t", index=False)
    users = pd.DataFrame({
        "user_id": np.arange(20), "user_active_degree": ["full_active", "low_active"] * 10,
        "follow_user_num": np.arange(20) * 10,
        "follow_user_num_range": ["0", "(0,10]", "(10,50]", "500+"] * 5, "register_days": 100,
    })
    users.to_csv(folder / "user_features.csv", index=False)
    return df


# ------------------------------------------------------------------------------ real file


@pytest.fixture(scope="module")
def real():
    folder = kuairand_dir()
    if not (folder / "interactions.tsv").exists():
        pytest.skip(f"KuaiRand data not found at {folder}")
    return load_kuairand(folder)


def test_real_split_counts_and_columns(real):
    assert len(real.train) == 35_716
    assert len(real.test) == 6_112
    assert real.train["date"].between(20220408, 20220418).all()
    assert real.test["date"].between(20220419, 20220421).all()
    assert real.objectives == OBJECTIVES
    assert real.id_columns == ["user_id", "item_id"]
    for col in [*OBJECTIVES, *real.dense_columns, *real.id_columns]:
        assert col in real.train.columns and col in real.test.columns
    assert set(np.unique(real.train[OBJECTIVES].to_numpy())) == {0, 1}
    # README base rates over all rows: click 65.7%, like 80.7%
    both = pd.concat([real.train, real.test])
    assert both["click"].mean() == pytest.approx(0.657, abs=0.001)
    assert both["like"].mean() == pytest.approx(0.807, abs=0.001)
    assert {"user_click_rate", "item_like_rate", "user_n_past", "item_n_past", "hour", "duration_s",
            "u_user_active_degree", "u_fans_user_num_range"} <= set(real.dense_columns)
    assert real.train[real.dense_columns].dtypes.eq(np.float64).all()
    assert real.train["duration_s"].isna().any() and (real.train["duration_s"].dropna() > 0).all()


def test_real_history_is_point_in_time(real):
    """Brute force on sampled rows: counts and rates use only days before the row's day."""
    train = real.train
    prior = train[OBJECTIVES].mean()
    sample = train.sample(25, random_state=0)
    for _, row in sample.iterrows():
        past = train[(train["user_id"] == row["user_id"]) & (train["date"] < row["date"])]
        assert row["user_n_past"] == len(past)
        expected = (past["click"].sum() + 20 * prior["click"]) / (len(past) + 20)
        assert row["user_click_rate"] == pytest.approx(expected, rel=1e-9)
        past_i = train[(train["item_id"] == row["item_id"]) & (train["date"] < row["date"])]
        assert row["item_n_past"] == len(past_i)
    # test rows see the whole train period and no test day
    row = real.test.iloc[-1]
    assert row["user_n_past"] == int((train["user_id"] == row["user_id"]).sum())


def test_real_test_item_rates_equal_popularity_baseline(real):
    pop = SmoothedItemPopularity(OBJECTIVES).fit(real.train)
    pred = pop.predict(real.test)
    expected = real.test[[f"item_{k}_rate" for k in OBJECTIVES]].to_numpy()
    np.testing.assert_allclose(pred, expected, rtol=1e-12)


# ------------------------------------------------------------------------------ synthetic folders


def test_history_features_never_see_same_or_later_days():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"u": rng.integers(0, 5, 400), "d": rng.integers(0, 6, 400), "y": rng.integers(0, 2, 400)})
    base = add_history_features(df, "u", ["y"], "d", {"y": 0.5}, strength=4.0)
    changed = df.copy()
    changed.loc[changed["d"] == 3, "y"] = 1 - changed.loc[changed["d"] == 3, "y"]
    after = add_history_features(changed, "u", ["y"], "d", {"y": 0.5}, strength=4.0)
    upto = df["d"] <= 3
    np.testing.assert_array_equal(base.loc[upto, "u_y_rate"], after.loc[upto, "u_y_rate"])
    assert (base.loc[df["d"] > 3, "u_y_rate"] != after.loc[df["d"] > 3, "u_y_rate"]).any()
    # first day of each user: n_past 0 and the prior
    first = df["d"] == df.groupby("u")["d"].transform("min")
    assert (base.loc[first, "u_n_past"] == 0).all()
    np.testing.assert_allclose(base.loc[first, "u_y_rate"], 0.5)
    assert list(base.index) == list(df.index)


def test_history_all_lets_test_rows_see_earlier_test_days(tmp_path):
    _write_kuairand(tmp_path)
    std = load_kuairand(tmp_path, history="train")
    live = load_kuairand(tmp_path, history="all")
    last = std.test["date"] == 20220421
    assert (live.test.loc[last, "user_n_past"].to_numpy() > std.test.loc[last, "user_n_past"].to_numpy()).any()
    first = std.test["date"] == 20220419
    np.testing.assert_array_equal(live.test.loc[first, "user_n_past"], std.test.loc[first, "user_n_past"])
    pd.testing.assert_frame_equal(live.train[std.dense_columns], std.train[std.dense_columns])


def test_missing_column_names_file_and_column(tmp_path):
    _write_kuairand(tmp_path, drop=("is_click", "label"))
    with pytest.raises(ValidationError) as info:
        load_kuairand(tmp_path)
    errors = info.value.errors
    assert {e.path for e in errors} == {"is_click", "label"}
    assert all(e.file.endswith("interactions.tsv") and e.code == "missing_column" for e in errors)
    assert "interactions.tsv" in str(info.value) and "is_click" in str(info.value)


def test_missing_file_and_bad_labels(tmp_path):
    with pytest.raises(ValidationError) as info:
        load_kuairand(tmp_path / "nowhere")
    assert any(e.file.endswith("interactions.tsv") and e.code == "missing_file" for e in info.value.errors)
    df = _write_kuairand(tmp_path)
    df.loc[5, "is_click"] = 7
    df.to_csv(tmp_path / "interactions.tsv", sep="\t", index=False)
    with pytest.raises(ValidationError) as info:
        load_kuairand(tmp_path)
    assert info.value.errors[0].path == "is_click" and "row 6" in info.value.errors[0].message


def test_env_var_overrides_data_folder(tmp_path, monkeypatch):
    _write_kuairand(tmp_path / "kuairand", n=300)
    monkeypatch.setenv("STRATARANK_DATA", str(tmp_path))  # a data root holding kuairand/
    ds = load_kuairand()
    assert len(ds.train) + len(ds.test) == 300
    assert ds.train["u_follow_user_num_range"].notna().all()


def test_user_feature_ranges_are_ordinal():
    users = pd.DataFrame({"user_id": [1, 2, 3, 4, 5],
                          "fans_user_num_range": ["[1k,5k)", "0", "[10,100)", "[1w,10w)", "[1,10)"],
                          "register_days_range": ["730+", "8-14", "181-365", "15-30", "61-90"],
                          "user_active_degree": ["full_active", "day_new", "UNKNOWN", "low_active", "high_active"]})
    enc = encode_user_features(users).set_index("user_id")
    assert list(enc["u_fans_user_num_range"].sort_values().index) == [2, 5, 3, 1, 4]
    assert list(enc["u_register_days_range"].sort_values().index) == [2, 4, 5, 3, 1]
    assert np.isnan(enc.loc[3, "u_user_active_degree"])
    assert enc.loc[1, "u_user_active_degree"] > enc.loc[5, "u_user_active_degree"] > enc.loc[4, "u_user_active_degree"]


# ------------------------------------------------------------------------------ simulated logs


def _sim_frame(n_req=300, slate=5, seed=0):
    rng = np.random.default_rng(seed)
    n = n_req * slate
    req = np.repeat(np.arange(n_req), slate)
    return pd.DataFrame({
        "request_id": [f"r{r}" for r in req], "ts": np.sort(rng.random(n_req))[req] * 1000.0,
        "user_id": [f"u{x}" for x in rng.integers(0, 30, n_req)[req]],
        "item_id": [f"i{x}" for x in rng.integers(0, 50, n)], "position": np.tile(np.arange(1, slate + 1), n_req),
        "source": rng.choice(["llm", "retrieval"], n), "creator_id": "c1", "topic": "t1",
        "prior_score": np.where(rng.random(n) < 0.5, np.nan, rng.random(n)),
        "click": rng.integers(0, 2, n).astype(np.int8), "like": rng.integers(0, 2, n).astype(np.int8),
        "share": rng.integers(0, 2, n).astype(np.int8), "watch_time": rng.exponential(5, n),
        "report": rng.integers(0, 2, n).astype(np.int8), "p_click": rng.random(n),
    })


def test_sim_logs_split_by_time(tmp_path):
    frame = _sim_frame()
    frame.to_parquet(tmp_path / "impressions.parquet", index=False)
    for path in (tmp_path, tmp_path / "impressions.parquet"):
        ds = load_sim_logs(path)
        assert len(ds.train) + len(ds.valid) + len(ds.test) == len(frame)
        assert ds.train["ts"].max() < ds.valid["ts"].min() <= ds.valid["ts"].max() < ds.test["ts"].min()
        assert abs(len(ds.test) - 150) <= 5 and abs(len(ds.valid) - 150) <= 5
        assert ds.objectives == ["click", "like", "share", "watch_time", "report"]
        assert ds.objective_types["watch_time"] == "regression"
        assert {"position", "prior_score", "is_llm", "user_click_rate", "item_watch_time_rate"} <= set(ds.dense_columns)
        assert "p_click" not in ds.dense_columns
    # a request's slate never sees its own labels
    first = ds.train.groupby("user_id")["ts"].transform("min") == ds.train["ts"]
    assert (ds.train.loc[first, "user_n_past"] == 0).all()


def test_sim_logs_missing_label_is_named(tmp_path):
    _sim_frame().drop(columns=["share"]).to_parquet(tmp_path / "impressions.parquet", index=False)
    with pytest.raises(ValidationError) as info:
        load_sim_logs(tmp_path)
    assert [e.path for e in info.value.errors] == ["share"]
    assert "label column 'share'" in str(info.value) and "impressions.parquet" in str(info.value)
    ds = load_sim_logs(tmp_path, objectives={"click": "binary", "watch_time": "regression"})
    assert ds.objectives == ["click", "watch_time"]
    with pytest.raises(ValidationError):
        load_sim_logs(tmp_path / "missing")
