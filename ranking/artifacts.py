"""Registered model artifacts: what a registry version folder holds for each kind of model, and how it is
written (through :func:`ranking.registry.publish_version`) and loaded back.

A TorchRec ranker's version folder (``kind: torchrec``, :func:`save_model` / :func:`load_model`)::

    weights.pt        state_dict (torch.save; loaded with torch.load(..., weights_only=True))
    features.json     the feature spec and the fitted encoder state (vocabularies, scaler mean/scale)
    objectives.json   the objectives it predicts, in output order (type, transform, loss weight, label)
    metrics.json      validation/test metrics and the training history
    manifest.json     name, version, created, model config, objective types/transforms, data description
                      and, per serving variant, ``serving: {int8: {file, sha256, bytes, embedding_bytes, ...}}``
    weights.int8.pt   (optional) serving variants with row-wise quantized embedding tables
    weights.int4.pt   (ranking/quantize.py): written by ``save_model(..., quantize=)`` (the train config's
                      ``serving: {quantize:}``) or added to a version later by :func:`add_serving_variant`
                      (``stratarank quantize``); the fp32 ``weights.pt`` stays for training
    leaves/           (optional) the GBDT whose leaf ids feed an id_list feature (ranking/leaves.py:
                      LightGBM text models + leaves.json); loading computes the same leaf column

A LightGBM fallback's (``kind: lightgbm``, :func:`register_lgbm` / :func:`load_registered_lgbm`):
``lightgbm/`` (:meth:`ranking.lgbm.LGBMMultiObjective.save`, LightGBM text format), ``metrics.json`` and
``manifest.json``.

Loading: ``load_model(registry_dir, "name")`` (current), ``"name@v3"`` or a version folder path;
``load_model(..., quantized="int8")`` serves the int8 variant instead of the fp32 weights (a missing or
corrupt variant is a :class:`ranking.quantize.VariantError`); ``LoadedModel.predict(rows)`` -> (N, K)
predictions in natural units. Heavy imports (torch, lightgbm)
happen inside the functions that need them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .quantize import VariantError, variant_file
from .registry import publish_version, resolve, write_json

if TYPE_CHECKING:
    from .lgbm import LGBMMultiObjective

FILES = ("weights.pt", "features.json", "objectives.json", "metrics.json", "manifest.json")
LEAVES_DIR = "leaves"
LGBM_DIR = "lightgbm"

log = logging.getLogger(__name__)


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
               make_current: bool = True, leaves=None, quantize: str = "none") -> Path:
    """Write a new version of a TorchRec ranker and (by default) make it current; returns its folder.

    ``leaves``: the fitted :class:`ranking.leaves.LeafFeatures` whose column the encoder reads (saved in
    ``leaves/``, LightGBM text format). ``quantize`` (int8 | int4 | none): a serving variant with row-wise
    quantized tables, written in the same publish (a scorer never sees the version without it)."""
    import torch

    def write(folder: Path) -> dict:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / "weights.pt")
        if leaves is not None:
            leaves.save(folder / LEAVES_DIR)
        write_json(folder / "features.json", encoder.state_dict())
        write_json(folder / "objectives.json", [o.to_dict() for o in objectives])
        write_json(folder / "metrics.json", _clean(metrics))
        serving = {}
        if quantize != "none":
            from .models import build_model

            module = build_model(encoder, objectives, model_config)
            module.load_state_dict(state_dict)
            serving[quantize] = write_variant(folder, module, quantize)
        return {
            "format": 1,
            "kind": "torchrec",
            "model": {"class": "ranking.models.MultiTaskRanker", "config": model_config.to_dict(),
                      "dense_dim": encoder.dense_dim, "sparse_features": encoder.sparse_keys},
            "objectives": [{"name": o.name, "type": o.type, "transform": o.transform} for o in objectives],
            "data": _clean(data or {}),
            "train_config": train_config,
            "files": list(FILES) + ([LEAVES_DIR] if leaves is not None else [])
                     + [v["file"] for v in serving.values()],
            **({"leaves": {"dir": LEAVES_DIR, "column": leaves.column, "objectives": leaves.objectives,
                           "n_trees": leaves.n_trees}} if leaves is not None else {}),
            **({"serving": serving} if serving else {}),
        }

    return publish_version(registry_dir, name, write, make_current)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(path: Path, fill) -> None:
    """Write ``path`` through a temp file in its folder (``fill(temp_path)``), then ``os.replace``:
    readers see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_variant(folder: Path, module, to: str) -> dict:
    """Quantize ``module`` (fp32 :class:`ranking.models.MultiTaskRanker`) to ``to`` and write its state
    to ``folder / weights.<to>.pt``; returns the manifest entry (file, sha256, sizes)."""
    import torch

    from .quantize import ROW_ALIGNMENT, embedding_bytes, model_bytes, quantize_module, quantized_state

    qmodule = quantize_module(module, to)
    path = Path(folder) / variant_file(to)
    _replace_atomically(path, lambda tmp: torch.save(quantized_state(qmodule, to), tmp))
    return {"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
            "embedding_bytes": embedding_bytes(qmodule), "fp32_embedding_bytes": embedding_bytes(module),
            "model_bytes": model_bytes(qmodule), "fp32_model_bytes": model_bytes(module),
            "row_alignment": ROW_ALIGNMENT, "format": "fbgemm row-wise, fp16 scale and bias"}


def add_serving_variant(registry_dir: str | Path, ref: str, to: str) -> dict:
    """Add (or replace) the ``to`` serving variant of an existing TorchRec version ``ref``
    (``stratarank quantize``): quantize its fp32 weights, write ``weights.<to>.pt`` and list it in the
    manifest (both replaced atomically, under a lock so two writers never lose an entry). Returns the
    manifest entry."""
    import fcntl

    vdir = resolve(registry_dir, ref)
    loaded = load_model(registry_dir, str(vdir))
    if loaded.manifest.get("kind", "torchrec") != "torchrec":
        raise VariantError(f"{loaded.name}@{loaded.version} is a {loaded.manifest.get('kind')} model: only "
                           "TorchRec rankers have embedding tables to quantize")
    with open(vdir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry = write_variant(vdir, loaded.module, to)
        manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
        manifest["serving"] = {**manifest.get("serving", {}), to: entry}
        manifest["files"] = list(dict.fromkeys([*manifest.get("files", []), entry["file"]]))
        _replace_atomically(vdir / "manifest.json", lambda tmp: write_json(tmp, manifest))
    return entry


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
    quantized: str = "none"        # the serving variant whose tables ``module`` holds (int8 | int4 | none)

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


def load_model(registry_dir: str | Path, ref: str, quantized: str = "none") -> LoadedModel:
    """Load ``ref`` (``name``, ``name@version`` or a version folder) from ``registry_dir``; ``quantized``
    (int8 | int4) loads that serving variant's tables instead of the fp32 weights."""
    import torch

    from .features import FeatureEncoder
    from .models import ModelConfig, MultiTaskRanker, ObjectiveConfig

    vdir = resolve(registry_dir, ref)
    manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
    objectives = tuple(ObjectiveConfig(**o) for o in json.loads((vdir / "objectives.json").read_text(encoding="utf-8")))
    encoder = FeatureEncoder.load(vdir / "features.json")
    config = ModelConfig.from_dict(manifest["model"]["config"])
    if quantized != "none":
        module = _load_variant(vdir, manifest, encoder, objectives, config, quantized)
    else:
        module = MultiTaskRanker(encoder.embedding_bag_configs(), encoder.dense_dim, objectives, config)
        state = torch.load(vdir / "weights.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.eval()
    leaves = None
    if manifest.get("leaves") is not None:
        from .leaves import LeafFeatures

        leaves = LeafFeatures.load(vdir / manifest["leaves"].get("dir", LEAVES_DIR))
    return LoadedModel(manifest["name"], manifest["version"], tuple(o.name for o in objectives), objectives,
                       manifest, metrics, encoder, module, vdir, leaves, quantized)


def _load_variant(vdir: Path, manifest: dict, encoder, objectives, config, to: str):
    """The module of the ``to`` serving variant of version folder ``vdir``; a variant the manifest does
    not list, a missing file, a checksum mismatch or an unreadable state is a :class:`VariantError`."""
    import torch

    from .quantize import load_quantized_module

    ref = f"{manifest['name']}@{manifest['version']}"
    entry = manifest.get("serving", {}).get(to)
    if entry is None:
        have = ", ".join(manifest.get("serving", {})) or "none"
        raise VariantError(f"{ref} has no {to} serving variant (variants: {have}); add one with "
                           f"`stratarank quantize --model {ref} --to {to}`")
    path = vdir / entry.get("file", variant_file(to))
    if not path.is_file():
        raise VariantError(f"{ref}: the {to} variant's file {path} is missing")
    digest = _sha256(path)
    if digest != entry.get("sha256"):
        raise VariantError(f"{ref}: the {to} variant's file {path} is corrupt (sha256 {digest[:12]}..., the "
                           f"manifest says {str(entry.get('sha256'))[:12]}...)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VariantError(f"{ref}: cannot read the {to} variant's file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise VariantError(f"{ref}: the {to} variant's file {path} holds a {type(state).__name__}, not a state dict")
    try:
        return load_quantized_module(encoder.embedding_bag_configs(), encoder.dense_dim, objectives, config, to,
                                     state)
    except VariantError as exc:
        raise VariantError(f"{ref}: {path.name}: {exc}") from None


class RegisteredLGBM:
    """A registered :class:`ranking.lgbm.LGBMMultiObjective` scoring the scorer's request rows (the
    online fallback).

    Request rows carry ``source`` rather than ``is_llm``; missing numeric columns are NaN, which
    LightGBM routes like missing values in training.
    """

    def __init__(self, model: LGBMMultiObjective, name: str, version: str):
        self.model, self.name, self.version = model, name, version
        self.objectives = tuple(model.objectives)
        self.load_warning: str | None = None   # why the trees were asked to compile and did not

    @property
    def compiled_trees(self) -> bool:
        """Whether every booster predicts from native code (:meth:`LGBMMultiObjective.compile`)."""
        return set(self.model.forests) == set(self.objectives)

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


def load_registered_lgbm(version_dir, compile_trees: bool = False, trees_cache=None) -> RegisteredLGBM:
    """The LightGBM fallback in ``version_dir`` (a version folder written by :func:`register_lgbm`);
    ``compile_trees``: predict with its boosters compiled to native code (:mod:`ranking.compiled_trees`,
    cached in ``trees_cache``). A forest that does not compile is logged and LightGBM's own predict
    serves; the ranker's ``load_warning`` says why."""
    from .compiled_trees import CompileError
    from .lgbm import LGBMMultiObjective

    version_dir = Path(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    model = LGBMMultiObjective.load(version_dir / LGBM_DIR)
    ranker = RegisteredLGBM(model, manifest["name"], manifest["version"])
    if compile_trees:
        try:
            model.compile(trees_cache)
        except CompileError as exc:
            ranker.load_warning = f"trees not compiled, serving LightGBM's own predict: {exc}"
            log.error("model %s@%s: %s", ranker.name, ranker.version, ranker.load_warning)
    return ranker
