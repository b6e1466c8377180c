"""LightGBM boosters compiled to native code (ranking/compiled_trees.py): the same predictions as
``Booster.predict`` on any input (missing values, zeros, infinities, values off the training range), the
cache, the fallback to LightGBM's own predict, and the scorer's ``model.compile_trees``."""
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ranking.compiled_trees as compiled_trees
from online.config import service_config_from_dict
from online.predictor import RankerChain
from ranking.artifacts import load_registered_lgbm, register_lgbm
from ranking.compiled_trees import CompiledForest, CompileError
from ranking.lgbm import LGBMMultiObjective
from strategy.errors import ValidationError

COLUMNS = ["with_nan", "dense", "count", "flag"]


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"with_nan": rng.normal(size=n), "dense": rng.uniform(-3, 3, n),
                       "count": rng.poisson(3, n).astype(float), "flag": rng.integers(0, 2, n).astype(float)})
    df.loc[rng.random(n) < 0.3, "with_nan"] = np.nan   # trained with missing values: NaN goes its learnt way
    logit = 0.8 * df["dense"] - 0.3 * df["count"] + df["flag"] + np.nan_to_num(df["with_nan"].to_numpy())
    df["click"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    df["watch"] = np.maximum(0.0, 2 * df["dense"] + df["count"] + rng.normal(size=n))
    return df


@pytest.fixture(scope="module")
def model():
    train = _frame(4000, 0)
    return LGBMMultiObjective({"click": "binary", "watch": "regression"}, num_boost_round=40).fit(train, COLUMNS)


@pytest.fixture(scope="module")
def compiled(model, tmp_path_factory):
    twin = LGBMMultiObjective({"click": "binary", "watch": "regression"})
    twin.boosters, twin.feature_columns = model.boosters, model.feature_columns
    return twin.compile(tmp_path_factory.mktemp("trees"))


VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, -0.0, 1e-36, -1e-36, 1.0, 3.0, np.nan]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=arrays(np.float64, st.tuples(st.integers(1, 40), st.just(len(COLUMNS))), elements=VALUES))
def test_compiled_predictions_equal_lightgbm_on_any_input(model, compiled, x):
    frame = pd.DataFrame(x, columns=COLUMNS)
    want, got = model.predict(frame), compiled.predict(frame)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_predictions_equal_on_held_out_rows(model, compiled):
    frame = _frame(2000, 1)[COLUMNS]
    assert set(compiled.forests) == {"click", "watch"} and not model.forests
    np.testing.assert_allclose(compiled.predict(frame), model.predict(frame), rtol=1e-12, atol=1e-12)


def test_cache_is_keyed_by_the_model_text(model, tmp_path):
    text = model.boosters["click"].model_to_string()
    first = CompiledForest.compile(text, tmp_path)
    again = CompiledForest.compile(text, tmp_path)
    assert not first.cached and again.cached
    other = CompiledForest.compile(model.boosters["watch"].model_to_string(), tmp_path)
    assert not other.cached
    objects = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".o")
    assert len(objects) == 2 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    x = _frame(50, 2)[COLUMNS].to_numpy()
    np.testing.assert_array_equal(first.predict(x), again.predict(x))
    with pytest.raises(ValueError, match=r"expected a \(N, 4\) matrix, got shape \(50, 3\)"):
        first.predict(x[:, :3])


def test_registered_fallback_compiles_or_says_why(model, tmp_path, monkeypatch):
    register_lgbm(tmp_path / "reg", "fb", model, {})
    vdir = tmp_path / "reg" / "fb" / "v1"
    rows = _frame(300, 3)
    plain = load_registered_lgbm(vdir)
    fast = load_registered_lgbm(vdir, compile_trees=True, trees_cache=tmp_path / "cache")
    assert not plain.compiled_trees and fast.compiled_trees and fast.load_warning is None
    np.testing.assert_allclose(fast.predict(rows), plain.predict(rows), rtol=1e-12, atol=1e-12)

    def no_lleaves():
        raise CompileError("lleaves is not installed (No module named 'lleaves')")

    monkeypatch.setattr(compiled_trees, "_toolchain", no_lleaves)
    chain = RankerChain.load(str(tmp_path / "reg"), "fb", compile_trees=True, trees_cache=str(tmp_path / "cache"))
    assert chain.primary_loaded and not chain.models[0].compiled_trees
    assert chain.load_errors == ["fb: trees not compiled, serving LightGBM's own predict: lleaves is not "
                                 "installed (No module named 'lleaves')"]
    np.testing.assert_array_equal(chain.models[0].predict(rows), plain.predict(rows))


def test_unwritable_cache_is_a_clear_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CompileError, match=r"cannot use the compiled-trees cache .*file"):
        CompiledForest.compile(model.boosters["click"].model_to_string(), blocker / "trees")


def test_service_config_and_readyz(model, tmp_path):
    from online.app import create_app
    from online.nearline import BusConfig, NearlineConfig

    config = service_config_from_dict({"model": {"fallback": "fb", "registry": str(tmp_path / "reg"),
                                                 "compile_trees": True, "trees_cache": str(tmp_path / "c")}})
    assert config.compile_trees and config.trees_cache == str(tmp_path / "c")
    assert not service_config_from_dict({}).compile_trees
    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"model": {"compile_trees": "yes"}}, source="service.yaml",
                                 lines={"model.compile_trees": 7})
    (err,) = exc.value.errors
    assert (err.path, err.line) == ("model.compile_trees", 7) and err.message == "expected true or false, got string"

    register_lgbm(tmp_path / "reg", "fb", model, {})
    from dataclasses import replace
    config = replace(config, nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}")))
    ready = create_app(config).test_client().get("/readyz").get_json()
    assert ready["compiled_trees"] == {"fb@v1": True} and ready["load_errors"] == []
    assert json.loads(json.dumps(ready))["model_quantized"] is None
