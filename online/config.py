"""The scorer's configuration (``conf/service.yaml``), validated like every other input.

Relative paths are resolved from the working directory. Secrets never live in the file:
``auth.admin_token_env`` and ``auth.api_keys_env`` name environment variables.
The ``bus``, ``store`` and ``nearline`` sections are validated by ``online.nearline``
(``NearlineConfig``), which the scorer shares with the near-line consumer; ``joiner`` by
``online.joiner`` (``JoinerConfig``, read by ``stratarank join``); ``corpus`` by ``online.corpus``
(``CorpusConfig``: the item corpus of ``/v1/items`` and ``stratarank corpus``); ``retrieval`` by
``online.retrieval`` (``RetrievalConfig``: the two-tower model and index of ``/v1/feed``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ranking.quantize import QUANTIZE
from strategy.checks import as_bool, as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, ValidationError

from .corpus import CorpusConfig, corpus_config_from_dict
from .nearline import NearlineConfig
from .ratelimit import check_storage_url
from .retrieval import RetrievalConfig, retrieval_config_from_dict

SECTIONS = ("server", "strategies", "model", "risk", "auth", "rate_limit", "logging", "bus", "store", "nearline",
            "experiments", "joiner", "corpus", "retrieval")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    max_candidates: int = 2000
    max_body_bytes: int = 4 * 1024 * 1024
    strategy_files: tuple[str, ...] = ("conf/objectives/feed.yaml",)
    default_strategy: str | None = None
    registry: str = "registry"
    model_name: str | None = None
    fallback_name: str | None = None
    follow_current: bool = False   # serve each new ``current`` version of the model without a restart
    model_poll_s: float = 1.0      # how often a worker looks at the ``current`` pointer
    model_quantized: str = "none"  # int8 | int4: serve the model's row-wise quantized tables (ranking/quantize.py)
    compile_trees: bool = False    # LightGBM rankers predict from native code (ranking/compiled_trees.py)
    trees_cache: str | None = None  # where compiled forests are kept (default ~/.cache/stratarank/trees)
    risk_file: str | None = None
    admin_token: str | None = None
    api_keys: frozenset = frozenset()
    rate_per_s: float | None = None
    rate_burst: float = 0.0
    rate_storage: str = "memory://"        # or redis://HOST:PORT/DB: one limit across workers and replicas
    rate_client_header: str | None = None  # a header a trusted proxy sets, keying buckets when API keys are off
    log_format: str = "text"               # json: one JSON object per line, with the request id and pid
    log_level: str = "warning"
    access_log: bool = False               # one line per request (method, path, status, ms)
    nearline: NearlineConfig = field(default_factory=NearlineConfig)  # bus, store, near-line consumer
    experiments: dict = field(default_factory=dict)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # the item corpus (online/corpus.py)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # /v1/feed's sources (online/retrieval.py)


def service_config_from_dict(data, source: str = "<dict>", lines=None, environ=None) -> ServiceConfig:
    environ = os.environ if environ is None else environ
    errs = Errors()
    obj = as_dict(errs, {} if data is None else data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", SECTIONS)
    out: dict = {}

    server = as_dict(errs, obj.get("server") or {}, "server") or {}
    check_keys(errs, server, "server", ("host", "port", "workers", "max_candidates", "max_body_bytes"))
    if "host" in server:
        out["host"] = as_str(errs, server["host"], "server.host", max_len=255)
    for key, lo, hi in (("port", 0, 65535), ("workers", 1, 64), ("max_candidates", 1, 100_000),
                        ("max_body_bytes", 1024, 1 << 30)):
        if key in server:
            out[key] = as_number(errs, server[key], f"server.{key}", lo=lo, hi=hi, integer=True)

    strategies = as_dict(errs, obj.get("strategies") or {}, "strategies") or {}
    check_keys(errs, strategies, "strategies", ("files", "default"))
    if "files" in strategies:
        files = as_list(errs, strategies["files"], "strategies.files") or []
        out["strategy_files"] = tuple(as_str(errs, f, f"strategies.files[{i}]") or "" for i, f in enumerate(files))
        if not files:
            errs.add("strategies.files", "at least one strategy file is required", "required")
    if "default" in strategies:
        out["default_strategy"] = as_str(errs, strategies["default"], "strategies.default")

    model = as_dict(errs, obj.get("model") or {}, "model") or {}
    check_keys(errs, model, "model", ("registry", "name", "fallback", "follow_current", "poll_s", "quantized",
                                      "compile_trees", "trees_cache"))
    if "registry" in model:
        out["registry"] = as_str(errs, model["registry"], "model.registry")
    if model.get("name") is not None:
        out["model_name"] = as_str(errs, model["name"], "model.name")
    if model.get("fallback") is not None:
        out["fallback_name"] = as_str(errs, model["fallback"], "model.fallback")
    if model.get("follow_current") is not None:
        out["follow_current"] = as_bool(errs, model["follow_current"], "model.follow_current")
    if model.get("poll_s") is not None:
        out["model_poll_s"] = as_number(errs, model["poll_s"], "model.poll_s", lo=0.05, hi=3600)
    if model.get("quantized") is not None:
        out["model_quantized"] = as_str(errs, model["quantized"], "model.quantized", choices=QUANTIZE)
    if model.get("compile_trees") is not None:
        out["compile_trees"] = as_bool(errs, model["compile_trees"], "model.compile_trees")
    if model.get("trees_cache") is not None:
        out["trees_cache"] = as_str(errs, model["trees_cache"], "model.trees_cache")

    if obj.get("risk") is not None:
        out["risk_file"] = as_str(errs, obj["risk"], "risk")

    auth = as_dict(errs, obj.get("auth") or {}, "auth") or {}
    check_keys(errs, auth, "auth", ("admin_token_env", "api_keys_env"))
    token_env = as_str(errs, auth.get("admin_token_env", "STRATARANK_ADMIN_TOKEN"), "auth.admin_token_env")
    keys_env = as_str(errs, auth.get("api_keys_env", "STRATARANK_API_KEYS"), "auth.api_keys_env")
    if token_env:
        out["admin_token"] = environ.get(token_env) or None
    if keys_env:
        out["api_keys"] = frozenset(k.strip() for k in environ.get(keys_env, "").split(",") if k.strip())

    rate = as_dict(errs, obj.get("rate_limit") or {}, "rate_limit") or {}
    check_keys(errs, rate, "rate_limit", ("per_second", "burst", "storage", "client_header"))
    if rate.get("per_second") is not None:
        out["rate_per_s"] = as_number(errs, rate["per_second"], "rate_limit.per_second", lo=0, lo_open=True)
        out["rate_burst"] = as_number(errs, rate.get("burst", out["rate_per_s"] or 1), "rate_limit.burst", lo=1)
    if rate.get("storage") is not None:
        storage = as_str(errs, rate["storage"], "rate_limit.storage")
        if storage:
            try:
                check_storage_url(storage)
                out["rate_storage"] = storage
            except ValidationError as exc:
                errs.items.extend(exc.errors)
    if rate.get("client_header") is not None:
        out["rate_client_header"] = as_str(errs, rate["client_header"], "rate_limit.client_header",
                                           pattern=HEADER_NAME, max_len=100)

    logs = as_dict(errs, obj.get("logging") or {}, "logging") or {}
    check_keys(errs, logs, "logging", ("format", "level", "access"))
    if logs.get("format") is not None:
        out["log_format"] = as_str(errs, logs["format"], "logging.format", choices=LOG_FORMATS)
    if logs.get("level") is not None:
        out["log_level"] = as_str(errs, logs["level"], "logging.level", choices=LOG_LEVELS)
    if logs.get("access") is not None:
        out["access_log"] = as_bool(errs, logs["access"], "logging.access")

    if obj.get("experiments") is not None:
        exp = as_dict(errs, obj["experiments"], "experiments")
        if exp is not None:
            check_keys(errs, exp, "experiments", ("file", "ramps", "poll_s"))
            section = {}
            if exp.get("file") is not None and as_str(errs, exp["file"], "experiments.file"):
                section["file"] = exp["file"]
            ramps = as_list(errs, exp.get("ramps") or [], "experiments.ramps", max_len=100) or []
            section["ramps"] = tuple(as_str(errs, r, f"experiments.ramps[{i}]") or "" for i, r in enumerate(ramps))
            if section["ramps"] and "file" not in section:
                errs.add("experiments.ramps", "ramps need experiments.file (the experiments they ramp)", "required")
            section["poll_s"] = as_number(errs, exp.get("poll_s", 1.0), "experiments.poll_s", lo=0, hi=3600)
            if "file" in section:
                out["experiments"] = section
    out["corpus"] = corpus_config_from_dict(errs, obj.get("corpus"), "corpus")
    out["retrieval"] = retrieval_config_from_dict(errs, obj.get("retrieval"), "retrieval")
    try:
        out["nearline"] = NearlineConfig.from_dict({k: obj[k] for k in ("bus", "store", "nearline") if k in obj})
    except ValidationError as exc:
        errs.items.extend(exc.errors)
    errs.raise_if_any(source, lines)
    return ServiceConfig(**out)


def load_service_config(path: str | Path | None, environ=None) -> ServiceConfig:
    """The config of ``path``, or the embedded defaults when ``path`` is None."""
    if path is None:
        return service_config_from_dict({}, environ=environ)
    data, lines = read_yaml(path)
    return service_config_from_dict(data, source=str(path), lines=lines, environ=environ)
