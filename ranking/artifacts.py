"""Registered model artifacts: what a registry version folder holds for each kind of model, and how it is
written (through :func:`ranking.registry.publish_version`) and loaded back.

A TorchRec ranker's version folder (``kind: torchrec``, :func:`save_model` / :func:`load_model`)::

    weights.pt        state_dict (torch.save; loaded with torch.load(..., weights_only=True))
    features.json     the feature spec and the fitted encoder state (vocabularies, scaler mean/scale)
    objectives.json   the objectives it predicts, in output order (type, transform, loss weight, label)
    metrics.json      validation/test metrics and the training history
    manifest.json     name, version, created, model config, objective types/transforms, data description
    leaves/           (optional) the GBDT whose leaf ids feed an id_list feature (ranking/leaves.py:
                      LightGBM text models + leaves.json); loading computes the same leaf column

A LightGBM fallback's (``kind: lightgbm``, :func:`register_lgbm` / :func:`load_registered_lgbm`):
``lightgbm/`` (:meth:`ranking.lgbm.LGBMMultiObjective.save`, LightGBM text format), ``metrics.json`` and
``manifest.json``.

Loading: ``load_model(registry_dir, "name")`` (current), ``"name@v3"`` or a version folder path;
``LoadedModel.predict(rows)`` -> (N, K) predictions in natural units. Heavy imports (torch, lightgbm)
happen inside the functions that need them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .registry import publish_version, resolve, write_json

if TYPE_CHECKING:
    from .lgbm import LGBMMultiObjective

FILES = ("weights.pt", "features.json", "objectives.json", "metrics.json", "manifest.json")
LEAVES_DIR = "leaves"
LGBM_DIR = "lightgbm"


def _clean(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def save_model(registry_dir: str | Path, name: str, state_dict: dict, encoder, model_config, objectives,
               metrics: dict, data: dict | None = None, train_config: str | None = None,
               make_current: bool = True, leaves=None) -> Path:
    """Write a new version of a TorchRec ranker and (by default) make it current; returns its folder.

    ``leaves``: the fitted :class:`ranking.leaves.LeafFeatures` whose column the encoder reads (saved in
    ``leaves/``, LightGBM text format)."""
    import torch

    def write(folder: Path) -> dict:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / "weights.pt")
        if leaves is not None:
            leaves.save(folder / LEAVES_DIR)
        write_json(folder / "features.json", encoder.state_dict())
        write_json(folder / "objectives.json", [o.to_dict() for o in objectives])
        write_json(folder / "metrics.json", _clean(metrics))
        return {
            "format": 1,
            "kind": "torchrec",
            "model": {"class": "ranking.models.MultiTaskRanker", "config": model_config.to_dict(),
                      "dense_dim": encoder.dense_dim, "sparse_features": encoder.sparse_keys},
            "objectives": [{"name": o.name, "type": o.type, "transform": o.transform} for o in objectives],
            "data": _clean(data or {}),
            "train_config": train_config,
            "files": list(FILES) + ([LEAVES_DIR] if leaves is not None else []),
            **({"leaves": {"dir": LEAVES_DIR, "column": leaves.column, "objectives": leaves.objectives,
                           "n_trees": leaves.n_trees}} if leaves is not None else {}),
        }

    return publish_version(registry_dir, name, write, make_current)


@dataclass
class LoadedModel:
    """A registered model ready to score rows.

    ``predict(rows)`` -> float64 (N, K) in ``objectives`` order, natural units (probabilities for
    binary objectives; expm1 of the output for log1p regressions, e.g. seconds of watch time).
    """

    name: str
    version: str
    objectives: tuple[str, ...]
    objective_configs: tuple
    manifest: dict
    metrics: dict
    encoder: object
    module: object
    path: Path
    leaves: object | None = None   # ranking.leaves.LeafFeatures: computes the encoder's leaf-id column

    @property
    def columns(self) -> list[str]:
        """The input columns the model reads: its feature spec's, with the GBDT leaves' inputs in place
        of the leaf-id column they compute."""
        if self.leaves is None:
            return self.encoder.spec.columns
        return sorted((set(self.encoder.spec.columns) - set(self.leaves.columns)) | set(self.leaves.feature_columns))

    def with_leaves(self, rows):
        """``rows`` (a DataFrame) with the leaf-id column computed, as training added it (the rows as
        they are when the model has no GBDT leaves)."""
        return rows if self.leaves is None else self.leaves.add_column(rows)

    def predict(self, rows, allow_missing: bool = False) -> np.ndarray:
        """(N, K) predictions of ``rows`` (a DataFrame) in natural units; one batched forward.

        ``allow_missing=True`` treats spec columns absent from ``rows`` as missing values
        (see ``FeatureEncoder.transform``); by default an absent column is a ValidationError."""
        import torch

        from .models import to_natural

        if len(rows) == 0:
            return np.zeros((0, len(self.objectives)))
        batch = self.encoder.transform(self.with_leaves(rows), allow_missing=allow_missing)
        with torch.inference_mode():
            out = to_natural(self.module(batch.dense, batch.kjt), self.objective_configs)
        return out.double().numpy()

    def predict_dict(self, rows) -> list[dict]:
        """Per-row ``{objective: value}`` (convenience for logs and JSON)."""
        p = self.predict(rows)
        return [dict(zip(self.objectives, map(float, r))) for r in p]


def load_model(registry_dir: str | Path, ref: str) -> LoadedModel:
    """Load ``ref`` (``name``, ``name@version`` or a version folder) from ``registry_dir``."""
    import torch

    from .features import FeatureEncoder
    from .models import ModelConfig, MultiTaskRanker, ObjectiveConfig

    vdir = resolve(registry_dir, ref)
    manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
    objectives = tuple(ObjectiveConfig(**o) for o in json.loads((vdir / "objectives.json").read_text(encoding="utf-8")))
    encoder = FeatureEncoder.load(vdir / "features.json")
    config = ModelConfig.from_dict(manifest["model"]["config"])
    module = MultiTaskRanker(encoder.embedding_bag_configs(), encoder.dense_dim, objectives, config)
    state = torch.load(vdir / "weights.pt", map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    module.eval()
    leaves = None
    if manifest.get("leaves") is not None:
        from .leaves import LeafFeatures

        leaves = LeafFeatures.load(vdir / manifest["leaves"].get("dir", LEAVES_DIR))
    return LoadedModel(manifest["name"], manifest["version"], tuple(o.name for o in objectives), objectives,
                       manifest, metrics, encoder, module, vdir, leaves)


class RegisteredLGBM:
    """A registered :class:`ranking.lgbm.LGBMMultiObjective` scoring the scorer's request rows (the
    online fallback).

    Request rows carry ``source`` rather than ``is_llm``; missing numeric columns are NaN, which
    LightGBM routes like missing values in training.
    """

    def __init__(self, model: LGBMMultiObjective, name: str, version: str):
        self.model, self.name, self.version = model, name, version
        self.objectives = tuple(model.objectives)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        frame = rows
        missing = [c for c in self.model.feature_columns if c not in rows.columns]
        if missing:
            frame = rows.copy()
            for column in missing:
                if column == "is_llm" and "source" in rows.columns:
                    frame[column] = (rows["source"] == "llm").astype(np.float64)
                else:
                    frame[column] = np.nan
        numeric = frame[list(self.model.feature_columns)].apply(pd.to_numeric, errors="coerce")
        return self.model.predict(numeric)


def register_lgbm(registry_dir, name: str, model: LGBMMultiObjective, metrics: dict, make_current: bool = True) -> Path:
    """Publish ``model`` as the next version of ``name`` (``kind: lightgbm``) in the model registry."""

    def write(folder: Path) -> dict:
        model.save(folder / LGBM_DIR)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float), encoding="utf-8")
        return {"kind": "lightgbm",
                "model": {"class": "ranking.lgbm.LGBMMultiObjective", "config": {"arch": "lightgbm"},
                          "feature_columns": model.feature_columns},
                "objectives": [{"name": k, "type": t} for k, t in model.types.items()]}

    return publish_version(registry_dir, name, write, make_current=make_current)


def load_registered_lgbm(version_dir) -> RegisteredLGBM:
    """The LightGBM fallback in ``version_dir`` (a version folder written by :func:`register_lgbm`)."""
    from .lgbm import LGBMMultiObjective

    version_dir = Path(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    model = LGBMMultiObjective.load(version_dir / LGBM_DIR)
    return RegisteredLGBM(model, manifest["name"], manifest["version"])
