"""Serving variants with row-wise quantized embedding tables (ranking/quantize.py): the train option, the
registry round trip, closeness to fp32, sizes, the scorer's fallback on a missing or corrupt variant, the
config checks and ``stratarank quantize``."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from online.config import service_config_from_dict
from online.predictor import RankerChain, RequestRows, load_ranker
from ranking.artifacts import add_serving_variant, load_model
from ranking.quantize import VariantError, embedding_bytes, quantize_module, row_bytes
from ranking.registry import list_models
from ranking.train import load_train_config, synthetic_impressions, train_from_config
from strategy.errors import ValidationError
from stratarank.cli import main

torch.set_num_threads(1)

SPEC = {"name": "t", "features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 8},
    {"name": "item_id", "type": "id", "column": "item_id", "dim": 8},
    {"name": "recent_items", "type": "id_list", "column": "user_recent_items", "table": "item_id"},
    {"name": "topic", "type": "id", "column": "topic", "dim": 4},
    {"name": "text_tokens", "type": "text", "column": "text", "buckets": 64, "dim": 4},
    {"name": "prior_score", "type": "dense", "column": "prior_score"},
    {"name": "duration", "type": "dense", "column": "duration", "log1p": True}]}
OBJECTIVES = {"click": {"type": "binary"}, "like": {"type": "binary"},
              "watch_time": {"type": "regression", "transform": "log1p"}}
# Measured on this fixture with seeds 0-4 (3,000 rows, 4 epochs): max |p_quantized - p_fp32| over the binary
# objectives of 400 rows 0.5e-4..2.3e-4 (int8) and 0.7e-3..3.1e-3 (int4). An int8 row has 256 levels between its
# min and max, int4 16 (17x coarser steps); the tolerances leave about 4x the worst seed.
TOLERANCE = {"int8": 1e-3, "int4": 1e-2}


def _config(tmp_path, **extra) -> dict:
    return {"name": "tiny", "data": {"loader": "table", "path": str(tmp_path / "imp.parquet")},
            "features": str(tmp_path / "spec.yaml"), "objectives": OBJECTIVES,
            "model": {"arch": "mmoe", "num_experts": 2, "expert": [16], "tower": [8]},
            "training": {"epochs": 4, "batch_size": 64, "threads": 1}, "registry": str(tmp_path / "reg"), **extra}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tiny MMoE trained with ``serving: {quantize: int8}``, and its int4 variant added afterwards."""
    tmp = tmp_path_factory.mktemp("quant")
    df = synthetic_impressions(3000, seed=0)
    df.to_parquet(tmp / "imp.parquet")
    (tmp / "spec.yaml").write_text(json.dumps(SPEC))
    (tmp / "train.yaml").write_text(json.dumps(_config(tmp, serving={"quantize": "int8"})))
    lines = []
    train_from_config(load_train_config(tmp / "train.yaml"), log=lines.append, progress=False)
    assert any("with its int8 serving variant" in ln for ln in lines)
    add_serving_variant(tmp / "reg", "tiny", "int4")
    return tmp / "reg", df


def _copy(registry, tmp_path):
    reg, df = registry
    shutil.copytree(reg, tmp_path / "reg")
    return tmp_path / "reg", df


def test_train_option_and_quantize_register_variants_beside_fp32(registry):
    reg, _ = registry
    vdir = reg / "tiny" / "v1"
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert set(manifest["serving"]) == {"int8", "int4"}
    assert {"weights.pt", "weights.int8.pt", "weights.int4.pt"} <= set(manifest["files"])
    fp32 = torch.load(vdir / "weights.pt", weights_only=True)
    assert fp32["ebc.embedding_bags.t_item_id.weight"].dtype == torch.float32   # training keeps fp32
    tables = load_model(reg, "tiny").encoder.embedding_bag_configs()
    for to in ("int8", "int4"):
        state = torch.load(vdir / f"weights.{to}.pt", weights_only=True)
        assert all(type(v) is torch.Tensor for v in state.values())
        for t in tables:
            rows = state[f"ebc.embedding_bags.{t.name}.weight"]
            assert rows.dtype == torch.uint8 and tuple(rows.shape) == (t.num_embeddings, row_bytes(t.embedding_dim, to))
        assert {k for k in state if not k.startswith("ebc.")} == {k for k in fp32 if not k.startswith("ebc.")}
        assert manifest["serving"][to]["bytes"] == (vdir / f"weights.{to}.pt").stat().st_size
    assert [r["serving"] for r in list_models(reg)] == [["int4", "int8"]]


@pytest.mark.parametrize("to", ["int8", "int4"])
def test_quantized_predictions_close_to_fp32(registry, to):
    reg, df = registry
    rows = df.iloc[-400:]
    fp32 = load_model(reg, "tiny").predict(rows)
    quant = load_model(reg, "tiny", quantized=to)
    assert quant.quantized == to and isinstance(quant.module.ebc, QuantEmbeddingBagCollection)
    p = quant.predict(rows)
    diff = np.abs(p[:, :2] - fp32[:, :2]).max()
    assert 0 < diff < TOLERANCE[to]
    # the scorer's order of each request's 10 candidates by click: pairs keep their order (near-ties aside),
    # and with int8 most requests keep exactly the fp32 order (measured: 95-97% of requests, seeds 0-4;
    # the tiny model's scores of a request spread over ~1-3%, so int4 swaps near-ties in about half of them)
    same_order, pairs = [], []
    for s in range(0, 400, 10):
        a, b = fp32[s:s + 10, 0], p[s:s + 10, 0]
        same_order.append(np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable")))
        off = ~np.eye(10, dtype=bool)
        pairs.append((np.sign(a[:, None] - a[None, :]) == np.sign(b[:, None] - b[None, :]))[off].mean())
        far = np.abs(a[:, None] - a[None, :]) > 2 * diff   # a gap above twice the error cannot flip
        assert (np.sign(a[:, None] - a[None, :]) == np.sign(b[:, None] - b[None, :]))[far].all()
    assert np.mean(pairs) >= (0.99 if to == "int8" else 0.97)
    if to == "int8":
        assert np.mean(same_order) >= 0.9
    # the regression objective (log1p watch time) within a few percent
    np.testing.assert_allclose(p[:, 2], fp32[:, 2], rtol=0.1 if to == "int4" else 0.01)


@pytest.mark.parametrize("to", ["int8", "int4"])
def test_registry_round_trip_equals_in_memory_quantization(registry, to):
    reg, df = registry
    fp32, loaded = load_model(reg, "tiny"), load_model(reg, "tiny", quantized=to)
    batch = fp32.encoder.transform(df.iloc[:300])
    in_memory = quantize_module(fp32.module, to)
    with torch.inference_mode():
        assert torch.equal(in_memory(batch.dense, batch.kjt), loaded.module(batch.dense, batch.kjt))
    # sizes: scale + bias (4 bytes) and dim x bits / 8 per row, no padding
    tables = fp32.encoder.embedding_bag_configs()
    assert embedding_bytes(fp32.module) == sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    assert embedding_bytes(loaded.module) == sum(t.num_embeddings * row_bytes(t.embedding_dim, to) for t in tables)
    entry = loaded.manifest["serving"][to]
    assert entry["embedding_bytes"] == embedding_bytes(loaded.module)
    assert entry["fp32_embedding_bytes"] == embedding_bytes(fp32.module)


def test_serving_rows_score_like_frames(registry):
    """The scorer's path (RequestRows, columns a request lacks encoded as missing) on the int8 tables."""
    reg, df = registry
    ranker = load_ranker(str(reg), "tiny", "int8")
    assert ranker.quantized == "int8" and ranker.load_warning is None
    rows = df.iloc[:50].drop(columns=["click", "like", "watch_time"])
    columns = {c: rows[c].tolist() for c in rows.columns}
    np.testing.assert_allclose(ranker.predict(RequestRows(columns, len(rows))), ranker.predict(rows), rtol=1e-6)


def test_missing_or_corrupt_variant_falls_back_to_fp32_with_a_clear_error(registry, tmp_path):
    reg, df = _copy(registry, tmp_path)
    vdir = reg / "tiny" / "v1"
    rows = df.iloc[:40].drop(columns=["click", "like", "watch_time"])
    fp32 = load_model(reg, "tiny").predict(rows)

    data = bytearray((vdir / "weights.int8.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (vdir / "weights.int8.pt").write_bytes(bytes(data))
    with pytest.raises(VariantError, match=r"tiny@v1: the int8 variant's file .*weights.int8.pt is corrupt"):
        load_model(reg, "tiny", quantized="int8")
    chain = RankerChain.load(str(reg), "tiny", quantized="int8")
    assert chain.primary_loaded and chain.models[0].quantized == "none"
    assert chain.load_errors and "int8 variant not loaded, serving the fp32 weights" in chain.load_errors[0] \
        and "corrupt" in chain.load_errors[0]
    np.testing.assert_allclose(chain.models[0].predict(rows), fp32)

    (vdir / "weights.int4.pt").unlink()
    with pytest.raises(VariantError, match="int4 variant's file .* is missing"):
        load_model(reg, "tiny", quantized="int4")
    ranker = load_ranker(str(reg), "tiny", "int4")
    assert ranker.quantized == "none" and "missing" in ranker.load_warning

    manifest = json.loads((vdir / "manifest.json").read_text())
    del manifest["serving"]
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VariantError, match=r"tiny@v1 has no int8 serving variant \(variants: none\); add one with "
                                           r"`stratarank quantize --model tiny@v1 --to int8`"):
        load_model(reg, "tiny", quantized="int8")


def test_variant_that_does_not_fit_the_model_is_refused(registry, tmp_path):
    reg, _ = _copy(registry, tmp_path)
    vdir = reg / "tiny" / "v1"
    state = torch.load(vdir / "weights.int8.pt", weights_only=True)
    key = "ebc.embedding_bags.t_item_id.weight"
    state[key] = state[key][:, :-1].contiguous()
    torch.save(state, vdir / "weights.int8.pt")
    manifest = json.loads((vdir / "manifest.json").read_text())
    manifest["serving"]["int8"]["sha256"] = hashlib.sha256((vdir / "weights.int8.pt").read_bytes()).hexdigest()
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VariantError, match=r"weights.int8.pt: table 't_item_id': expected uint8 rows of shape"):
        load_model(reg, "tiny", quantized="int8")


def test_quantize_command(registry, tmp_path, capsys):
    reg, _ = _copy(registry, tmp_path)
    (reg / "tiny" / "v1" / "weights.int4.pt").unlink()
    assert main(["quantize", "--model", "tiny@v1", "--registry", str(reg), "--to", "int4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny@v1: weights.int4.pt (") and "of fp32" in out
    assert load_model(reg, "tiny", quantized="int4").quantized == "int4"   # the checksum is the new file's
    assert main(["quantize", "--model", "tiny@v9", "--registry", str(reg), "--to", "int8"]) == 1
    assert "no version 'v9' of model 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", "tiny", "--registry", str(reg), "--to", "int3"])


def test_serving_and_service_config_errors_name_file_and_line(tmp_path):
    for section, message in (({"quantize": "int3"}, "'int3' is not allowed; did you mean 'int8'? (allowed: none, int8, int4)"),
                             ({"quantise": "int8"}, "unknown key 'quantise'; did you mean 'quantize'?")):
        text = json.dumps(_config(tmp_path, serving=section), indent=1)   # JSON is YAML: one key a line
        (tmp_path / "t.yaml").write_text(text)
        with pytest.raises(ValidationError) as exc:
            load_train_config(tmp_path / "t.yaml")
        (err,) = exc.value.errors
        key = next(iter(section))
        assert err.path == f"serving.{key}" and err.message.startswith(message)
        assert err.file == str(tmp_path / "t.yaml")
        assert err.line == 1 + text.splitlines().index(f'  "{key}": "{section[key]}"')
    (tmp_path / "ok.yaml").write_text(json.dumps(_config(tmp_path, serving={"quantize": "int4"})))
    assert load_train_config(tmp_path / "ok.yaml").serving.quantize == "int4"
    assert service_config_from_dict({"model": {"name": "m", "quantized": "int8"}}).model_quantized == "int8"
    assert service_config_from_dict({}).model_quantized == "none"
    with pytest.raises(ValidationError) as exc:
        service_config_from_dict({"model": {"quantized": 8}}, source="service.yaml", lines={"model.quantized": 4})
    (err,) = exc.value.errors
    assert (err.path, err.line) == ("model.quantized", 4) and "expected a string" in err.message



@pytest.mark.parametrize("quantized", ["int8", "none"])
def test_scorer_serves_the_configured_variant(registry, tmp_path, quantized):
    """``model: {quantized: int8}`` in the service config reaches the scorer: /readyz names the tables it
    serves, and the chain it ranks with scores with that variant (int8 differs from fp32 within its tolerance)."""
    from online.app import create_app
    from online.config import ServiceConfig
    from online.nearline import BusConfig, NearlineConfig

    reg, df = registry
    config = ServiceConfig(registry=str(reg), model_name="tiny", model_quantized=quantized,
                           nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / 'bus'}")))
    client = create_app(config).test_client()
    ready = client.get("/readyz").get_json()
    assert ready["model_version"] == "tiny@v1" and ready["model_quantized"] == quantized
    assert ready["load_errors"] == []
    rows = df.iloc[:20].drop(columns=["click", "like", "watch_time"])
    served = client.application.extensions["stratarank"].serving.chain.models[0]
    assert served.quantized == quantized
    p, fp32 = served.loaded.predict(rows), load_model(reg, "tiny").predict(rows)
    if quantized == "none":
        np.testing.assert_array_equal(p, fp32)
    else:
        assert 0 < np.abs(p - fp32)[:, :2].max() < TOLERANCE[quantized]   # the binary objectives
