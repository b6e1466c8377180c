"""The registered LightGBM model as the peers serve it: numpy + lightgbm only, no project import.

Imported by the peers' servers in their own venvs (bench/peer_mlflow_model.py,
bench/peer_litserve_server.py, bench/peer_ray_server.py, bench/peer_bentoml_service.py) and by the
project's tests. One booster per objective, loaded from
LightGBM's text files (never pickle) and scored as ``ranking.lgbm.LGBMMultiObjective.predict``
does (each booster's best iteration); the request is :func:`peers.invocation_body`'s
``dataframe_split`` JSON, the answer ``{"predictions": [{objective: score, ...}, ...]}``.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np


_JSON_NUMBER = (int, float, type(None))


class BadRequest(ValueError):
    """A request body that is not the ``dataframe_split`` the model needs; the message names the field."""


def read_manifest(path) -> dict:
    """The ``manifest.json`` of a registered ``LGBMMultiObjective`` folder."""
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    if manifest.get("kind") != "multi_objective":
        raise ValueError(f"{path}: not a multi_objective LightGBM model (kind {manifest.get('kind')!r})")
    return manifest


def load_boosters(paths: dict) -> dict:
    """``{objective: Booster}`` from ``{objective: text file}``, in the given order."""
    return {name: lgb.Booster(model_file=str(path)) for name, path in paths.items()}


def load_folder(lgbm_dir) -> tuple[list[str], dict]:
    """The feature columns and boosters of a registered LightGBM folder (manifest + text files)."""
    lgbm_dir = Path(lgbm_dir)
    manifest = read_manifest(lgbm_dir / "manifest.json")
    return list(manifest["feature_columns"]), load_boosters({n: lgbm_dir / f for n, f in manifest["files"].items()})


def scores(boosters: dict, x: np.ndarray) -> dict:
    """``{objective: scores}`` of the float64 matrix ``x`` (rows by the model's feature columns)."""
    out = {}
    for name, booster in boosters.items():
        best = booster.best_iteration if booster.best_iteration and booster.best_iteration > 0 else None
        out[name] = booster.predict(x, num_iteration=best)
    return out


def decode_split(body, columns: list[str]) -> np.ndarray:
    """The float64 matrix of ``columns`` (null as NaN) from ``{"dataframe_split": {"columns", "data"}}``;
    anything else is BadRequest naming the field."""
    split = body.get("dataframe_split") if isinstance(body, dict) else None
    if not isinstance(split, dict):
        raise BadRequest("dataframe_split: required, an object with columns and data")
    names, data = split.get("columns"), split.get("data")
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise BadRequest("dataframe_split.columns: required, a list of column names")
    missing = [c for c in columns if c not in names]
    if missing:
        raise BadRequest(f"dataframe_split.columns: missing {missing}; the model reads {columns}")
    if not isinstance(data, list) or not data:
        raise BadRequest("dataframe_split.data: required, a non-empty list of rows")
    if not all(type(row) is list and len(row) == len(names) for row in data):
        raise BadRequest(f"dataframe_split.data: rows of {len(names)} values, one per column")
    if not all(type(v) in _JSON_NUMBER for row in data for v in row):  # not bool, not "1.5"
        raise BadRequest("dataframe_split.data: values are numbers or null")
    try:
        matrix = np.array(data, dtype=np.float64).reshape(len(data), len(names))  # null is NaN
    except OverflowError:
        raise BadRequest("dataframe_split.data: an integer too large for a float") from None
    if np.isinf(matrix).any():
        raise BadRequest("dataframe_split.data: infinite values (finite numbers or null only)")
    return matrix[:, [names.index(c) for c in columns]]


def encode(scores_by_name: dict) -> dict:
    """``{"predictions": [{objective: score, ...} per row]}`` (MLflow's answer for a DataFrame)."""
    names = list(scores_by_name)
    table = np.column_stack([scores_by_name[n] for n in names]).tolist()
    return {"predictions": [dict(zip(names, row)) for row in table]}
