"""Model registry: ``registry/<name>/<version>/`` folders and an atomically switched ``current`` pointer.

A version folder is published complete or not at all (:func:`publish_version` fills a temp folder and
renames it into place) and always holds a ``manifest.json`` (name, version, created, and the fields of
its kind); what else it holds, and how a model is saved and loaded, is :mod:`ranking.artifacts`.

``registry/<name>/current`` is a one-line file naming the current version, replaced with
``os.replace`` of a temp file (readers see the old or the new version, never a partial one).
The registry imports nothing heavy (no torch, no lightgbm): listing and resolving models is cheap.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from strategy.errors import FieldError, ValidationError

VERSION_RE = re.compile(r"^v(\d+)$")


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON (numpy scalars and arrays as plain numbers and lists)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
            write_json(tmp / "manifest.json", manifest)
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


def prune_versions(registry_dir: str | Path, name: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest versions of ``name``, never the current one; returns the
    deleted versions (a streaming trainer publishes a version a minute: the registry keeps the last N)."""
    import shutil

    if keep < 1:
        raise ValueError("keep must be >= 1")
    current = current_version(registry_dir, name)
    old = [v for v in versions(registry_dir, name)[:-keep] if v != current]
    for v in old:
        shutil.rmtree(Path(registry_dir) / name / v, ignore_errors=True)
    return old


def rollback(registry_dir: str | Path, name: str, to: str | None = None) -> str:
    """Point ``current`` of ``name`` at ``to``, or at the version before the current one; returns it.
    Scorers that follow the pointer serve it within their poll interval."""
    found = versions(registry_dir, name)
    if to is None:
        current = current_version(registry_dir, name)
        older = [v for v in found if current is None or int(v[1:]) < int(current[1:])]
        if not older:
            raise ValidationError([FieldError("version", f"model '{name}' has no version before "
                                              f"{current or 'none'} in {registry_dir} (versions: "
                                              f"{', '.join(found) or 'none'})", "unknown_version")])
        to = older[-1]
    set_current(registry_dir, name, to)
    return to


def list_models(registry_dir: str | Path) -> list[dict]:
    """One dict per version: name, version, current, created, arch, objectives, headline metrics
    (``metrics``: objective -> test (else valid) AUC for binary, rmse for regression; ``metric_kinds``
    says which) and ``serving``: its quantized serving variants (e.g. ``["int8"]``). A two-tower
    retrieval model (``kind: two_tower``) lists arch ``two_tower``, its positive labels as objectives
    and its held-out recall (``recall@K`` -> value, split ``held_out``)."""
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
            if manifest.get("kind") == "two_tower":
                recall = metrics.get("held_out", {}).get("two_tower", {})
                rows.append({"name": model_dir.name, "version": v, "current": v == cur,
                             "created": manifest.get("created"), "arch": "two_tower",
                             "objectives": list(manifest.get("positive", [])), "metric_split": "held_out",
                             "metrics": recall, "metric_kinds": dict.fromkeys(recall, "recall"),
                             "serving": [], "path": str(vdir)})
                continue
            split = "test" if "test" in metrics else "valid"
            head = {k: (m.get("auc") if "auc" in m else m.get("rmse")) for k, m in metrics.get(split, {}).items()}
            kinds = {k: ("auc" if "auc" in m else "rmse") for k, m in metrics.get(split, {}).items()}
            rows.append({"name": model_dir.name, "version": v, "current": v == cur,
                         "created": manifest.get("created"), "arch": manifest["model"]["config"].get("arch"),
                         "objectives": [o["name"] for o in manifest["objectives"]],
                         "metric_split": split, "metrics": head, "metric_kinds": kinds,
                         "serving": sorted(manifest.get("serving", {})), "path": str(vdir)})
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
