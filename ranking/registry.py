"""Model registry: ``registry/<name>/<version>/`` folders and an atomically switched ``current`` pointer.

A version folder holds::

    weights.pt        state_dict (torch.save; loaded with torch.load(..., weights_only=True))
    features.json     the feature spec and the fitted encoder state (vocabularies, scaler mean/scale)
    objectives.json   the objectives it predicts, in output order (type, transform, loss weight, label)
    metrics.json      validation/test metrics and the training history
    manifest.json     name, version, created, model config, objective types/transforms, data description
    leaves/           (optional) the GBDT whose leaf ids feed an id_list feature (ranking/leaves.py:
                      LightGBM text models + leaves.json); loading computes the same leaf column

``registry/<name>/current`` is a one-line file naming the current version, replaced with
``os.replace`` of a temp file (readers see the old or the new version, never a partial one).

Loading: ``load_model(registry_dir, "name")`` (current), ``"name@v3"`` or a version folder path;
``LoadedModel.predict(rows)`` -> (N, K) predictions in natural units.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strategy.errors import FieldError, ValidationError

VERSION_RE = re.compile(r"^v(\d+)$")
FILES = ("weights.pt", "features.json", "objectives.json", "metrics.json", "manifest.json")
LEAVES_DIR = "leaves"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def versions(registry_dir: str | Path, name: str) -> list[str]:
    """Versions of ``name`` in increasing order (``v1``, ``v2``, ...)."""
    root = Path(registry_dir) / name
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if p.is_dir() and (m := VERSION_RE.match(p.name))]
    return [v for _, v in sorted(found)]


def current_version(registry_dir: str | Path, name: str) -> str | None:
    p = Path(registry_dir) / name / "current"
    try:
        return p.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def set_current(registry_dir: str | Path, name: str, version: str) -> None:
    """Point ``current`` at ``version`` atomically (temp file + ``os.replace``)."""
    root = Path(registry_dir) / name
    if not (root / version / "manifest.json").exists():
        raise ValidationError([FieldError("version", f"no version '{version}' of model '{name}' in {registry_dir}",
                                          "unknown_version")])
    fd, tmp = tempfile.mkstemp(prefix=".current.", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / "current")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_version(registry_dir: str | Path, name: str, write, make_current: bool = True) -> Path:
    """Publish the next version of ``name``; ``write(folder)`` fills a temp folder and returns the
    manifest fields of its kind (``name``, ``version``, ``created`` are added here).

    The folder is renamed into place only when complete, so a reader never sees a version
    without all its files; two writers never get the same version number.
    """
    root = Path(registry_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new.", dir=root))
    try:
        fields = write(tmp)
        while True:  # claim the next version number (rename fails if another writer took it)
            existing = versions(registry_dir, name)
            version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
            manifest = {"name": name, "version": version,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
            _write_json(tmp / "manifest.json", manifest)
            try:
                os.rename(tmp, root / version)
                break
            except OSError:
                if (root / version).exists():
                    continue
                raise
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(registry_dir, name, version)
    return root / version


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
        _write_json(folder / "features.json", encoder.state_dict())
        _write_json(folder / "objectives.json", [o.to_dict() for o in objectives])
        _write_json(folder / "metrics.json", _clean(metrics))
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


def list_models(registry_dir: str | Path) -> list[dict]:
    """One dict per version: name, version, current, created, arch, objectives, and headline metrics
    (``metrics``: objective -> test (else valid) AUC for binary, rmse for regression; ``metric_kinds``
    says which)."""
    root = Path(registry_dir)
    rows = []
    if not root.is_dir():
        return rows
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cur = current_version(root, model_dir.name)
        for v in versions(root, model_dir.name):
            vdir = model_dir / v
            try:
                manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
                metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            split = "test" if "test" in metrics else "valid"
            head = {k: (m.get("auc") if "auc" in m else m.get("rmse")) for k, m in metrics.get(split, {}).items()}
            kinds = {k: ("auc" if "auc" in m else "rmse") for k, m in metrics.get(split, {}).items()}
            rows.append({"name": model_dir.name, "version": v, "current": v == cur,
                         "created": manifest.get("created"), "arch": manifest["model"]["config"].get("arch"),
                         "objectives": [o["name"] for o in manifest["objectives"]],
                         "metric_split": split, "metrics": head, "metric_kinds": kinds, "path": str(vdir)})
    return rows


def resolve(registry_dir: str | Path, ref: str) -> Path:
    """``name`` (current), ``name@version`` or a version folder path -> the version folder."""
    p = Path(ref)
    if (p / "manifest.json").exists():
        return p
    name, _, version = str(ref).partition("@")
    if not version:
        version = current_version(registry_dir, name)
        if version is None:
            known = sorted(d.name for d in Path(registry_dir).iterdir() if d.is_dir()) if Path(registry_dir).is_dir() else []
            raise ValidationError([FieldError("model", f"no model '{name}' with a current version in {registry_dir}"
                                              + (f" (models: {', '.join(known)})" if known else ""), "unknown_model")])
    vdir = Path(registry_dir) / name / version
    if not (vdir / "manifest.json").exists():
        raise ValidationError([FieldError("model", f"no version '{version}' of model '{name}' in {registry_dir} "
                                          f"(versions: {', '.join(versions(registry_dir, name)) or 'none'})",
                                          "unknown_version")])
    return vdir


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
