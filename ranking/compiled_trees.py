"""LightGBM boosters compiled to native code for serving (lleaves: each tree becomes LLVM-compiled branches).

The scorer's LightGBM fallback spends most of a request in ``Booster.predict`` (≈ 13 ms for 5 boosters of
≈ 150 trees on 500 rows, one thread). The same forests compiled with lleaves predict the same values (to
≈ 1e-14: the same comparisons, missing-value routing and sums) in ≈ 3 ms on one thread.

Compiling costs about a second per 150 trees, so each compiled forest is kept as an object file in a cache
folder keyed by the sha256 of the booster's model text, the compiler's versions and the host CPU (an object
file is native code for this CPU: a cache copied to another machine misses instead of crashing). The cache
is written by this process only (temp file + rename, so workers compiling at once never read half a file)
and must be as trusted as the code: keep it on the serving machine, not in a shared registry.

    forest = CompiledForest.compile(booster_text, cache_dir)   # -> predict(x: (N, F) float64) -> (N,)
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stratarank" / "trees"


class CompileError(RuntimeError):
    """lleaves is missing or could not compile a forest: the caller keeps LightGBM's own predict."""


@functools.cache
def _toolchain() -> str:
    """What a compiled forest depends on besides its text: the compiler's versions and the host CPU (once
    per process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import llvmlite.binding as llvm
        versions = f"lleaves {version('lleaves')} llvmlite {version('llvmlite')}"
    except (ImportError, PackageNotFoundError) as exc:
        raise CompileError(f"lleaves is not installed ({exc})") from None
    llvm.initialize_native_target()
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:   # LLVM cannot read this CPU's features: the name alone keys the cache
        features = ""
    return f"{versions} {llvm.get_host_cpu_name()} {features}"


class CompiledForest:
    """One booster compiled to native code; ``predict(x)`` is ``Booster.predict(x)`` (natural units: the
    objective's transform applied) on a float64 ``(N, num_feature)`` matrix, on the calling thread."""

    def __init__(self, model, num_feature: int, cached: bool):
        self._model, self.num_feature, self.cached = model, num_feature, cached

    @classmethod
    def compile(cls, model_text: str, cache_dir=DEFAULT_CACHE) -> "CompiledForest":
        """Compile ``model_text`` (``Booster.model_to_string()``), or load it from ``cache_dir``."""
        toolchain = _toolchain()
        import lleaves

        cache_dir = Path(cache_dir)
        key = hashlib.sha256(f"{toolchain}\n{model_text}".encode()).hexdigest()[:32]
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            text_file, object_file = cache_dir / f"{key}.txt", cache_dir / f"{key}.o"
            cached = object_file.exists() and text_file.exists()
            if not cached:
                _write_atomically(text_file, model_text.encode())
            model = lleaves.Model(model_file=str(text_file))
            if cached:
                model.compile(cache=str(object_file), finline=False)
            else:   # compile to a file of our own, then publish it whole
                fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".o")
                os.close(fd)
                os.unlink(tmp)
                try:
                    model.compile(cache=tmp, finline=False)
                    os.replace(tmp, object_file)
                finally:
                    Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            raise CompileError(f"cannot use the compiled-trees cache {cache_dir}: {exc}") from None
        except Exception as exc:   # lleaves/LLVM refused this forest
            raise CompileError(f"lleaves could not compile the forest: {type(exc).__name__}: {exc}") from None
        return cls(model, model.num_feature(), cached)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.num_feature:
            raise ValueError(f"expected a (N, {self.num_feature}) matrix, got shape {x.shape}")
        return self._model.predict(x, n_jobs=1)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
