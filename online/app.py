"""The real-time scorer: a Flask application factory (``create_app(config)``), no module state.

``POST /v1/rank`` runs, per request: validation → experiment assignment → risk rules → one
batched real-time feature lookup → one batched model forward for all candidates and all
objectives (with the fallback chain of ``online.predictor``) → the strategy's blend,
guardrails, quotas, diversity and exploration → the response; the served slate is logged as
impressions carrying the features the model saw (the feature log), and exposures go to the bus.

Everything a request needs is read once from ``Serving``, an immutable snapshot that
``/admin/reload`` replaces atomically, so a reload under load never fails a request.
"""
from __future__ import annotations

import codecs
import gc
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import attrgetter
from pathlib import Path

import numpy as np
import orjson
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from strategy import ValidationError, load_strategy, parse_events, parse_request, rank
from strategy.retrieval import DEFAULT_RETRIEVAL
from strategy.schema import parse_feed, parse_request_json, parse_retrieve
from strategy.blend import blend
from strategy.checks import nodes
from strategy.errors import FieldError
from strategy.schema import MAX_DEPTH

from experiments.assignment import merge_assignments

from .config import ServiceConfig
from .corpus import ITEM_ID_KEY, Corpus, CorpusUnavailable, item_paths, post_items
from .features import StoreUnavailable
from .logs import REQUEST_ID, request_id_from
from .metrics import CONTENT_TYPE, Metrics
from .nearline import NearlineThread
from .openapi import openapi_document
from .predictor import RankerChain, RequestRows
from .ratelimit import client_key, open_limiter
from .retrieval import Retriever, candidate_of, open_retriever
from .risk import RiskRules, load_risk

log = logging.getLogger("stratarank.scorer")
access_log = logging.getLogger("stratarank.access")
PROGRESS_STALE_S = 10.0  # a near-line consumer silent for longer is not caught up, whatever it last said


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, path: str = "", details=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.path = status, code, message, path
        self.details, self.headers = details, headers or {}


@dataclass(frozen=True)
class Serving:
    """What one request reads: strategies, risk rules, rankers, experiments. Swapped whole."""

    strategies: dict
    default_strategy: str
    risk: RiskRules
    chain: RankerChain
    assigner: object | None = None
    variant_chains: dict = field(default_factory=dict)  # "name@version" picked by a variant -> chain
    experiments: object | None = None   # the experiments file as declared (ramp states apply on top)
    ramps: tuple = ()                   # guarded-ramp configs whose controller state the scorer follows
    ramp_signature: tuple = ()          # (mtime_ns, size) of each ramp state file when last applied
    loaded_at: float = field(default_factory=time.time)


def decode_json(raw: bytes):
    """A request body as JSON, strictly RFC 8259 (orjson): UTF-8 only (a leading byte order mark is
    skipped), no ``NaN`` or ``Infinity``, numbers within a double, no string that holds U+0000.
    Anything else is an :class:`ApiError` 400 that says what is wrong, never a 500: orjson nests at
    most 1024 levels and raises its own error past them (the stdlib's ``json`` hit RecursionError)."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid_json(raw, exc) from None
    if b"\\u0000" in raw:   # a cheap scan of the bytes; the walk only when it may be there
        for path, node, _ in nodes(data):
            if "\x00" in path or (type(node) is str and "\x00" in node):
                raise ApiError(400, "invalid_string", f"{path or '<body>'}: strings may not hold U+0000 (NUL)", path)
    return data


_RESPONSE_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_SUBCLASS
                     | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME)


def _not_plain_json(value):
    raise TypeError(f"{type(value).__name__} is not a plain JSON value")


def json_response(body, status: int = 200) -> Response:
    """``jsonify(body)`` (with ``status``) encoded by orjson: the same JSON once parsed, the same
    status and ``Content-Type: application/json``, keys sorted and a trailing newline as Flask
    writes them (floats in their shortest round-trip form, UTF-8 instead of ``\\u`` escapes).

    Whatever orjson would write otherwise than Flask goes through ``jsonify`` itself: a value that is
    not a plain dict, list, tuple, str, int, float, bool or None (subclasses, numpy scalars, dates,
    dataclasses), an integer beyond 64 bits, a key that is not a str, a lone surrogate, and any
    output holding ``null`` (orjson writes NaN and Infinity as ``null``, Flask as ``NaN``). An Enum,
    which orjson writes as its value and Flask cannot write, never reaches it: the rank path's
    responses hold plain values only."""
    try:
        data = orjson.dumps(body, default=_not_plain_json, option=_RESPONSE_OPTIONS)
    except TypeError:
        data = None
    if data is None or b"null" in data:
        response = jsonify(body)
        response.status_code = status
        return response
    return Response(data, status=status, mimetype="application/json")


def _invalid_json(raw: bytes, exc: orjson.JSONDecodeError) -> ApiError:
    """orjson's complaint about a body, reworded where its own words would mislead a client."""
    if exc.msg.startswith("depth limit exceeded"):
        return ApiError(400, "too_deep", f"the body nests deeper than {MAX_DEPTH} levels of arrays and objects, "
                        "the most a body may", "")
    problem = str(exc)
    if exc.msg.startswith("str is not valid UTF-8"):   # orjson says "surrogates not allowed" for any bad byte
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            problem = f"it is not UTF-8 (byte {bad.start}: {bad.reason})"
    elif exc.doc.startswith(("NaN", "Infinity"), exc.pos):
        problem = f"NaN and Infinity are not JSON numbers (RFC 8259), at line {exc.lineno} column {exc.colno}"
    return ApiError(400, "invalid_json", f"request body is not valid JSON: {problem}", "")


def build_serving(config: ServiceConfig, chain: RankerChain | None = None) -> Serving:
    """Load strategies, risk rules, experiments and models; raises on invalid configuration."""
    strategies = {}
    for path in config.strategy_files:
        s = load_strategy(path)
        strategies[s.name] = s
    default = config.default_strategy or next(iter(strategies))
    if default not in strategies:
        raise ValidationError([FieldError("strategies.default", f"unknown strategy '{default}' "
                                          f"(loaded: {', '.join(strategies)})", "unknown_strategy")])
    risk = load_risk(config.risk_file) if config.risk_file else RiskRules()
    if chain is None:
        chain = RankerChain.load(config.registry, config.model_name, config.fallback_name, **chain_options(config))
    if not config.experiments.get("file"):
        return Serving(strategies, default, risk, chain)
    from experiments.assignment import Assigner
    from experiments.config import load_experiments
    from experiments.control import load_control, served_experiments

    experiments = load_experiments(config.experiments["file"])  # validates the overrides too
    ramps = tuple(load_control(path) for path in config.experiments.get("ramps", ()))
    signature = ramp_signature(ramps)
    assigner = Assigner(served_experiments(experiments, ramps))
    refs = {v.model for e in experiments.experiments for v in e.variants if v.model}
    variant_chains = {ref: RankerChain.load(config.registry, ref, config.fallback_name, **chain_options(config))
                      for ref in refs}
    return Serving(strategies, default, risk, chain, assigner, variant_chains, experiments, ramps, signature)


def chain_options(config: ServiceConfig) -> dict:
    """How the scorer loads each ranker: TorchRec's table variant, LightGBM's compiled trees."""
    return {"quantized": config.model_quantized, "compile_trees": config.compile_trees,
            "trees_cache": config.trees_cache}


def current_pointer(registry: str, ref: str | None):
    """What tells a scorer that model ``ref``'s ``current`` pointer moved: its mtime, size and text
    (None for a pinned ``name@version`` or a missing model)."""
    if not ref or "@" in ref:
        return None
    path = Path(registry) / ref / "current"
    try:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, path.read_text(encoding="utf-8").strip())
    except OSError:
        return None


def followed_refs(config: ServiceConfig, serving: Serving) -> list[str]:
    """The models whose ``current`` a scorer follows: the primary and the experiments' variant models
    that name no version."""
    return [ref for ref in [config.model_name, *serving.variant_chains] if ref and "@" not in ref]


def ramp_signature(ramps) -> tuple:
    """What tells a scorer that the controller wrote a new state: each state file's mtime and size."""
    from experiments.control import state_file

    out = []
    for ramp in ramps:
        try:
            st = state_file(ramp).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


_ITEM_ID_OF, _SOURCE_OF, _CREATOR_OF, _TOPIC_OF, _TEXT_OF, _GENERATOR_OF, _FEATURES_OF = map(
    attrgetter, ("item_id", "source", "creator_id", "topic", "text", "generator", "features"))


class Scorer:
    """The request logic, separate from HTTP plumbing so benchmarks can time it directly."""

    def __init__(self, config: ServiceConfig, serving: Serving, bus=None, store=None, metrics: Metrics | None = None):
        self.config, self.serving = config, serving
        self.bus, self.store = bus, store
        self.metrics = metrics or Metrics()
        self.metrics.model_version = serving.chain.version
        self._variant_cache: dict = {}
        self._ramps_checked = time.monotonic()
        self._model_checked = time.monotonic()
        self._pointers = {ref: current_pointer(config.registry, ref) for ref in followed_refs(config, serving)}
        self._model_loading: threading.Thread | None = None
        self.follower = None  # the in-process near-line thread feeding a private memory store
        self.retriever = None  # online.retrieval.Retriever over the corpus (POST /v1/feed, /v1/retrieve)

    def close(self) -> None:
        """Stop the near-line thread and flush and close the bus and store (worker shutdown)."""
        for part in (self.follower, self.retriever):
            if part is not None:
                part.stop()
        self.metrics.close()
        for part in (self.bus, self.store):
            if part is not None:
                part.close()

    def swap(self, serving: Serving) -> None:
        self._variant_cache = {}
        self.serving = serving  # one reference assignment: atomic for concurrent readers
        self.metrics.model_version = serving.chain.version

    def follow_ramps(self) -> None:
        """Serve the guarded-ramp controller's latest state without a restart: at most every
        ``experiments.poll_s`` seconds, re-derive the assigner when a state file changed (a step up
        only grows the range, so no assigned user moves). A bad state file is logged and the last
        good traffic split stays."""
        serving = self.serving
        if not serving.ramps or time.monotonic() - self._ramps_checked < self.config.experiments.get("poll_s", 1.0):
            return
        self._ramps_checked = time.monotonic()
        signature = ramp_signature(serving.ramps)
        if signature == serving.ramp_signature:
            return
        from experiments.assignment import Assigner
        from experiments.control import served_experiments

        try:
            assigner = Assigner(served_experiments(serving.experiments, serving.ramps))
        except ValueError as exc:
            log.error("ramp state not applied, serving the previous traffic split: %s", exc)
            assigner = serving.assigner
        else:
            log.info("ramp state applied: %s", "; ".join(
                f"{e.name} {e.status} [{e.range[0]:g}, {e.range[1]:g})" for e in assigner.config.experiments
                if any(r.experiment == e.name for r in serving.ramps)))
        self.swap(replace(serving, assigner=assigner, ramp_signature=signature))

    def follow_model(self) -> None:
        """Serve each new ``current`` version of the followed models (the primary and the variants'
        unpinned models) without a restart (``model.follow_current``): at most every ``model.poll_s``
        seconds, look at their registry pointers; when one moved, load the new chain in a background
        thread while the old one keeps serving, then swap (one reference assignment). A version that
        fails to load is logged and counted, and the serving one stays."""
        if not self.config.follow_current or time.monotonic() - self._model_checked < self.config.model_poll_s:
            return
        self._model_checked = time.monotonic()
        if self._model_loading is not None and self._model_loading.is_alive():
            return
        moved = {ref: pointer for ref in self._pointers
                 if (pointer := current_pointer(self.config.registry, ref)) != self._pointers[ref]}
        if moved:
            self._model_loading = threading.Thread(target=self._load_models, args=(moved,), name="model-follow",
                                                   daemon=True)
            self._model_loading.start()

    def _load_models(self, moved: dict) -> None:
        config = self.config
        for ref, pointer in moved.items():
            chain = RankerChain.load(config.registry, ref, config.fallback_name, **chain_options(config))
            self._pointers[ref] = pointer
            serving = self.serving
            primary = ref == config.model_name
            before = (serving.chain if primary else serving.variant_chains[ref]).version
            if not chain.primary_loaded:
                log.error("model %s: the new current version did not load, still serving %s: %s", ref, before,
                          "; ".join(chain.load_errors))
                self.metrics.add(model_reload_failed=True)
                continue
            if primary:
                self.swap(replace(serving, chain=chain))
            else:
                self.swap(replace(serving, variant_chains={**serving.variant_chains, ref: chain}))
            self.metrics.add(model_reloaded=True)
            log.info("model: serving %s (was %s)", chain.version, before)

    def _strategy_and_chain(self, serving: Serving, req, assignments):
        name = req.strategy or serving.default_strategy
        if name not in serving.strategies:
            raise ApiError(404, "unknown_strategy", f"unknown strategy '{name}' (known: {', '.join(serving.strategies)})",
                           "strategy")
        strategy = serving.strategies[name]
        overrides, model = merge_assignments(assignments)
        chain = serving.variant_chains.get(model, serving.chain)
        if not overrides:
            return strategy, chain
        key = (id(serving), name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in self._variant_cache:
            self._variant_cache[key] = strategy.with_overrides(overrides)
        return self._variant_cache[key], chain

    def rank(self, body) -> dict:
        """``POST /v1/rank`` of a decoded JSON body (validated here)."""
        return self.rank_request(parse_request(body, max_candidates=self.config.max_candidates))

    def rank_json(self, raw: bytes) -> dict:
        """``POST /v1/rank`` of the raw body: msgspec's one-pass decode and validation where it
        vouches for the body, else orjson and :func:`parse_request`, which report what is wrong."""
        raw = raw.removeprefix(codecs.BOM_UTF8)
        req = parse_request_json(raw, max_candidates=self.config.max_candidates)
        return self.rank(decode_json(raw)) if req is None else self.rank_request(req)

    def rank_request(self, req) -> dict:
        self.follow_ramps()
        self.follow_model()
        serving = self.serving
        assignments = serving.assigner.assign(req.user_id) if serving.assigner is not None else []
        strategy, chain = self._strategy_and_chain(serving, req, assignments)
        keep, dropped = serving.risk.screen(req.candidates)
        cands = list(req.candidates) if len(keep) == len(req.candidates) else [req.candidates[i] for i in keep]
        realtime = self._lookup(req.user_id, cands)
        return self._rank_candidates(serving, req, strategy, chain, assignments, cands, dropped, realtime)

    def feed(self, body) -> dict:
        """``POST /v1/feed``: retrieve the candidates from the corpus (``online.retrieval``), then the
        ``/v1/rank`` path; the answer adds ``retrieved_by`` per item and a ``retrieval`` summary."""
        if self.retriever is None:
            raise ApiError(503, "retrieval_unavailable", "this scorer has no corpus to retrieve from", "")
        t0 = time.perf_counter()
        self.follow_ramps()
        self.follow_model()
        serving = self.serving
        req = parse_feed(body)
        assignments = serving.assigner.assign(req.user_id) if serving.assigner is not None else []
        strategy, chain = self._strategy_and_chain(serving, req, assignments)
        rt = self._user_features(req.user_id)
        user = user_context(req.user_id, rt)
        try:
            pool = self.retriever.retrieve(strategy.retrieval or DEFAULT_RETRIEVAL, user)
        except CorpusUnavailable as exc:
            log.error("corpus read failed: %s", exc)
            raise ApiError(503, "corpus_unavailable", "the corpus cannot be read now; retry", "",
                           headers={"Retry-After": "1"}) from None
        now = time.time()
        sources = {it.item_id: srcs for it, srcs in zip(pool.items, pool.sources)}
        cands = tuple(candidate_of(it, now, srcs) for it, srcs in zip(pool.items, pool.sources))
        req = replace(req, candidates=cands)
        keep, dropped = serving.risk.screen(cands)
        kept = [cands[i] for i in keep]
        realtime = self._lookup(req.user_id, kept, rt)
        t1 = time.perf_counter()
        out = self._rank_candidates(serving, req, strategy, chain, assignments, kept, dropped, realtime)
        t2 = time.perf_counter()
        for item in out["items"]:
            item["retrieved_by"] = sources[item["item_id"]]
        summary = pool.summary()
        summary["timings_ms"].update(retrieval=round((t1 - t0) * 1e3, 3), ranking=round((t2 - t1) * 1e3, 3))
        summary["model_version"] = self.retriever.model_version
        out["retrieval"] = summary
        self.metrics.observe_feed(summary)
        return out

    def retrieve(self, body) -> dict:
        """``POST /v1/retrieve``: corpus items nearest a user, a text or an item, with what the
        near-line store counted of each (the prompt engine's memory of what an audience engages with)."""
        query = parse_retrieve(body)
        if self.retriever is None or not self.retriever.has_vectors:
            raise ApiError(503, "retrieval_unavailable", "no two-tower model is loaded (retrieval.model)", "",
                           headers={"Retry-After": "5"})
        user = None if query.user_id is None else user_context(query.user_id, self._user_features(query.user_id))
        try:
            found = self.retriever.similar(user=user, text=query.text, item_id=query.item_id, k=query.k)
        except CorpusUnavailable as exc:
            log.error("corpus read failed: %s", exc)
            raise ApiError(503, "corpus_unavailable", "the corpus cannot be read now; retry", "",
                           headers={"Retry-After": "1"}) from None
        if found is None:
            raise ApiError(404, "unknown_item", f"item '{query.item_id}' is not in the retrieval index", "item_id")
        items, scores = found
        engagement = self._engagement([it.item_id for it in items], [it.creator_id for it in items])
        return {"model_version": self.retriever.model_version,
                "items": [{**it.to_dict(), "score": round(score, 6), "engagement": engagement[k]}
                          for k, (it, score) in enumerate(zip(items, scores))]}

    def _engagement(self, item_ids: list, creator_ids: list) -> list[dict]:
        """Per item, the near-line store's raw totals of each counter (impressions, click, like, ...)."""
        empty = [{} for _ in item_ids]
        if self.store is None or not item_ids:
            return empty
        try:
            rt = self.store.lookup("", item_ids, creator_ids)
        except StoreUnavailable as exc:
            self._store_unavailable(exc)
            return empty
        totals = rt.item_totals
        return [{name: float(values[k]) for name, values in totals.items()} for k in range(len(item_ids))]

    def _rank_candidates(self, serving: Serving, req, strategy, chain, assignments, cands, dropped, realtime) -> dict:
        """Features -> model -> strategy -> response of the candidates that passed the risk rules."""
        request_id = req.stable_id()
        prediction = chain.predict(
            strategy, cands, lambda: self._frame(req, cands, realtime), realtime.get("item_counters"))
        P = prediction.matrix
        if serving.risk.max_per_creator is not None and cands:
            capped, more = serving.risk.cap_creators(cands, blend(strategy, P))
            dropped += more
            cands, P = [cands[i] for i in capped], P[capped]
        result = rank(strategy, replace(req, candidates=tuple(cands), request_id=request_id), P)
        self.metrics.add(candidates=len(req.candidates), degraded=prediction.degraded)

        experiments = [{"layer": a.layer, "experiment": a.experiment, "variant": a.variant} for a in assignments]
        out = result.to_dict()
        out["dropped"] = [{"item_id": i, "reason": r} for i, r in dropped] + out["dropped"]
        out.update(model_version=prediction.served_by, experiments=experiments,
                   degraded=prediction.degraded is not None)
        self._log_impressions(req, request_id, strategy.name, prediction.served_by, experiments, result, cands, realtime)
        return out

    def events(self, body) -> int:
        events = parse_events(body)
        if self.bus is not None and events:
            self.bus.publish("events", [e.to_dict() for e in events])
        self.metrics.add(events=len(events))
        return len(events)

    # -------------------------------------------------------------- helpers

    def _user_features(self, user_id: str):
        """The user's real-time features without any item's (None without a store or when it fails)."""
        if self.store is None:
            return None
        try:
            return self.store.lookup(user_id, [], [])
        except StoreUnavailable as exc:  # rank without real-time features rather than fail the request
            self._store_unavailable(exc)
            return None

    def _lookup(self, user_id: str, cands, rt=None) -> dict:
        """The user's real-time features (empty without a store; ``rt``: already looked up). The
        candidates' counters, which only the prior fallback reads, are one batched lookup made when it
        asks for them (``item_counters`` is a callable): a model-served request reads the user's
        history alone."""
        if self.store is None or not cands:
            return {}
        rt = self._user_features(user_id) if rt is None else rt
        if rt is None:
            return {}

        def item_counters():
            try:
                full = self.store.lookup(user_id, [c.item_id for c in cands], [c.creator_id for c in cands])
            except StoreUnavailable as exc:
                self._store_unavailable(exc)
                return None
            return getattr(full, "item_counters", None)

        return {"recent_items": list(getattr(rt, "recent_items", []) or []), "item_counters": item_counters}

    def _store_unavailable(self, exc) -> None:
        log.warning("feature store unavailable: %s", exc)
        self.metrics.store_errors.labels("lookup").inc()
        self.metrics.add(degraded="feature_store_unavailable")

    def sample_gauges(self, metrics: Metrics) -> None:
        """Near-line lag and spool backlog as this worker sees them (a :meth:`Metrics.watch` callback)."""
        if self.follower is not None:
            metrics.nearline_lag.set(self.follower.stats.lag_s())
            metrics.nearline_records.set(self.follower.stats.records)
        elif self.store is not None:
            lags = [nearline_lag(p) for p in self.store.nearline_progress()]
            if lags:
                metrics.nearline_lag.set(max(lags))
        pending = getattr(self.bus, "pending", None)
        if pending is not None:
            metrics.spool_backlog.set(pending())

    @staticmethod
    def _frame(req, cands, realtime: dict) -> RequestRows:
        """Model input rows: the same columns as the training logs' impressions, as plain lists
        (``RequestRows``; ``.frame()`` is the DataFrame, for models that read one)."""
        recent = realtime.get("recent_items") or []
        n = len(cands)
        gens = list(map(_GENERATOR_OF, cands))
        feats = list(map(_FEATURES_OF, cands))
        rows = {
            "user_id": [req.user_id] * n,
            "item_id": list(map(_ITEM_ID_OF, cands)),
            "creator_id": [v or "" for v in map(_CREATOR_OF, cands)],
            "topic": [v or "" for v in map(_TOPIC_OF, cands)],
            "source": list(map(_SOURCE_OF, cands)),
            "generator": [g.model if g else "" for g in gens],
            "prior_score": [g.prior_score if g else np.nan for g in gens],
            "text": [v or "" for v in map(_TEXT_OF, cands)],
            "user_recent_items": [recent] * n,
        }
        for key in sorted(set().union(*feats) - rows.keys()):
            rows[key] = list(map(dict.get, feats, repeat(key, n), repeat(np.nan, n)))
        return RequestRows(rows, n)

    def _log_impressions(self, req, request_id, strategy_name, model_version, experiments, result, cands, realtime):
        if self.bus is None or not result.items:
            return
        now = time.time()
        by_id = {c.item_id: c for c in cands}
        recent = realtime.get("recent_items") or []
        records = []
        for item in result.items:
            cand = by_id[item.item_id]
            records.append({
                "request_id": request_id, "ts": now, "user_id": req.user_id, "item_id": item.item_id,
                "position": item.rank - 1, "source": item.source, "strategy": strategy_name,
                "model_version": model_version, "score": item.score, "propensity": item.propensity,
                "experiments": experiments, "predictions": item.predictions,
                "features": {"creator_id": cand.creator_id, "topic": cand.topic, "text": cand.text,
                             "generator": cand.generator.model if cand.generator else None,
                             "prior_score": cand.generator.prior_score if cand.generator else None,
                             "user_recent_items": recent, **cand.features},
            })
        self.bus.publish("impressions", records)
        if experiments:
            self.bus.publish("exposures", [{"user_id": req.user_id, "ts": now, "request_id": request_id, **e}
                                           for e in experiments])


def user_context(user_id: str, rt) -> dict:
    """What the two-tower user tower reads, from the store's lookup ``rt`` (None: an unknown user)."""
    return {"user_id": user_id, "recent_items": list(getattr(rt, "recent_items", None) or []),
            "topic_affinity": dict(getattr(rt, "topic_affinity", None) or {})}


def nearline_lag(progress: dict, now: float | None = None) -> float:
    """A near-line consumer's lag from what it last recorded in a shared store: 0 while it says
    it is caught up and said so recently, else the age of the newest record it applied."""
    now = time.time() if now is None else now
    if progress["caught_up"] and now - progress["updated_at"] <= PROGRESS_STALE_S:
        return 0.0
    newest = progress["newest_ts"]
    return max(0.0, now - newest) if newest is not None else now - progress["updated_at"]


def create_app(config: ServiceConfig | None = None, *, serving: Serving | None = None, bus=None, store=None,
               on_reload=None) -> Flask:
    """The scorer app. ``bus``/``store`` default to the ones the config names.

    ``on_reload`` runs after this process swapped in a new ``Serving`` on ``/admin/reload``;
    under gunicorn it asks the master for a graceful restart of the other workers.
    """
    config = config or ServiceConfig()
    app = Flask("stratarank")
    app.wsgi_app = item_paths(app.wsgi_app)   # GET /v1/items/<item_id> takes any id, "/" included
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    near = config.nearline
    bus = near.bus.open() if bus is None else bus
    follower = None
    if store is None:
        shared = not near.store.url.startswith("memory://")
        # a memory store is private to this process: it follows the bus itself from the start of the
        # log, under a consumer name of its own, without snapshots (workers would overwrite each
        # other's); Redis is shared, and `stratarank nearline` fills it
        store = (near.store if shared else replace(near.store, url="memory://", snapshot_path=None)).open()
        if not shared:
            follower = NearlineThread(replace(near, nearline=replace(near.nearline, consumer=f"scorer-{os.getpid()}")),
                                      bus=bus, store=store).start()
    scorer = Scorer(config, serving or build_serving(config), bus, store)
    scorer.follower = follower
    scorer.metrics.watch(scorer.sample_gauges)
    app.extensions["stratarank"] = scorer
    corpus = Corpus(config.corpus, risk=lambda: scorer.serving.risk)   # opened on first use, per process
    app.extensions["stratarank.corpus"] = corpus

    def sample_corpus(metrics: Metrics) -> None:
        if Path(config.corpus.path).exists():   # counting never creates the file
            metrics.corpus_items.set(corpus.count(include_blocked=False))

    scorer.metrics.watch(sample_corpus)
    scorer.retriever = open_retriever(config, corpus, store)

    def sample_retrieval(metrics: Metrics) -> None:
        if scorer.retriever.has_vectors:
            metrics.retrieval_indexed.set(scorer.retriever.status()["indexed"])

    scorer.metrics.watch(sample_retrieval)
    limiter = None
    if config.rate_per_s:
        limiter = open_limiter(config.rate_storage, config.rate_per_s, config.rate_burst,
                               on_error=scorer.metrics.rate_limit_errors.inc)

    def guard_public():
        if config.api_keys:
            key = request.headers.get("X-API-Key", "")
            if not any(hmac.compare_digest(key, k) for k in config.api_keys):
                raise ApiError(401, "unauthorized", "a valid X-API-Key header is required", "headers.X-API-Key")
        if limiter is not None:
            wait = limiter.take(client_key(request.headers, request.remote_addr, bool(config.api_keys),
                                           config.rate_client_header))
            if wait > 0:
                scorer.metrics.rate_limited.inc()
                raise ApiError(429, "rate_limited", "too many requests for this client", "",
                               headers={"Retry-After": str(max(1, int(np.ceil(wait))))})

    def raw_json_body() -> bytes:
        if not request.is_json:
            raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json", "headers.Content-Type")
        return request.get_data(cache=False)

    def json_body():
        return decode_json(raw_json_body())

    @app.before_request
    def start_request():
        g.t0 = time.perf_counter()
        g.request_id = request_id_from(request.headers.get("X-Request-Id"))
        g.log_context = REQUEST_ID.set(g.request_id)

    @app.after_request
    def record(response):
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        seconds = time.perf_counter() - g.get("t0", time.perf_counter())
        scorer.metrics.observe(endpoint, response.status_code, seconds)
        response.headers["X-Request-Id"] = g.get("request_id") or ""
        if config.access_log:
            access_log.info("%s %s %d %.1f ms", request.method, request.path, response.status_code, seconds * 1e3,
                            extra={"fields": {"method": request.method, "path": request.path,
                                              "status": response.status_code, "ms": round(seconds * 1e3, 2)}})
        return response

    @app.teardown_request
    def end_request(_exc):
        token = g.pop("log_context", None)
        if token is not None:
            REQUEST_ID.reset(token)

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        body = {"error": {"code": exc.code, "message": exc.message, "path": exc.path}}
        if exc.details:
            body["error"]["details"] = exc.details
        return jsonify(body), exc.status, exc.headers

    @app.errorhandler(ValidationError)
    def validation_error(exc: ValidationError):
        first = exc.errors[0]
        body = {"error": {"code": first.code, "message": f"{first.path or '<body>'}: {first.message}",
                          "path": first.path, "details": [e.to_dict() for e in exc.errors]}}
        return jsonify(body), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code, "http_error")
        return jsonify({"error": {"code": code, "message": exc.description, "path": ""}}), exc.code

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error")
        return jsonify({"error": {"code": "internal", "message": "internal error", "path": ""}}), 500

    @app.post("/v1/rank")
    def rank_endpoint():
        guard_public()
        return json_response(scorer.rank_json(raw_json_body()))

    @app.post("/v1/events")
    def events_endpoint():
        guard_public()
        return jsonify({"accepted": scorer.events(json_body())}), 202

    @app.post("/v1/items")
    def items_endpoint():
        guard_public()
        try:
            result = post_items(corpus, json_body())
        except CorpusUnavailable as exc:
            log.error("corpus write failed: %s", exc)
            raise ApiError(503, "corpus_unavailable", "the corpus cannot be written now; retry", "",
                           headers={"Retry-After": "1"}) from None
        for outcome in ("created", "updated", "expired"):
            if result[outcome]:
                scorer.metrics.items_written.labels(outcome).inc(result[outcome])
        return jsonify(result)

    @app.get("/v1/items/<item_id>")
    def item_endpoint(item_id):
        guard_public()
        item_id = request.environ.get(ITEM_ID_KEY)
        try:
            item = corpus.get(item_id) if item_id else None
        except CorpusUnavailable as exc:
            log.error("corpus read failed: %s", exc)
            raise ApiError(503, "corpus_unavailable", "the corpus cannot be read now; retry", "",
                           headers={"Retry-After": "1"}) from None
        if item is None:
            shown = "(not UTF-8)" if item_id is None else f"'{item_id}'"
            raise ApiError(404, "unknown_item", f"no item {shown} in the corpus (or it expired)", "item_id")
        return jsonify(item.to_dict())

    @app.post("/v1/feed")
    def feed_endpoint():
        guard_public()
        return json_response(scorer.feed(json_body()))

    @app.post("/v1/retrieve")
    def retrieve_endpoint():
        guard_public()
        return jsonify(scorer.retrieve(json_body()))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        scorer.follow_model()   # a new current version also loads without traffic (probes keep coming)
        chain = scorer.serving.chain
        body = {"ready": chain.ready, "model_version": chain.version, "load_errors": chain.load_errors,
                "model_quantized": getattr(chain.models[0], "quantized", None) if chain.models else None,
                "compiled_trees": {f"{m.name}@{m.version}": m.compiled_trees for m in chain.models
                                   if hasattr(m, "compiled_trees")},
                "worker": os.getpid(), "gc_frozen": gc.get_freeze_count(),
                "variant_models": {ref: c.version for ref, c in scorer.serving.variant_chains.items()}}
        if scorer.follower is not None:  # this worker's own near-line thread (memory store)
            err = scorer.follower.error
            body["nearline"] = {"records": scorer.follower.stats.records, "applied": scorer.follower.stats.applied,
                                "error": None if err is None else f"{type(err).__name__}: {err}"}
        if scorer.retriever is not None:   # this worker's retrieval index (how much of the corpus it holds)
            body["retrieval"] = scorer.retriever.status()
        return jsonify(body), 200 if chain.ready else 503

    @app.get("/metrics")
    def metrics():
        return Response(scorer.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document())

    @app.post("/admin/reload")
    def reload():
        if not config.admin_token:
            raise ApiError(403, "admin_disabled", "no admin token is configured (auth.admin_token_env)", "")
        header = request.headers.get("Authorization", "")
        if not hmac.compare_digest(header, f"Bearer {config.admin_token}"):
            raise ApiError(401, "unauthorized", "Authorization: Bearer <admin token> required", "headers.Authorization")
        try:
            new = build_serving(config)
        except ValidationError as exc:
            raise ApiError(422, "reload_failed", f"configuration invalid, still serving the previous one: {exc}", "",
                           details=[e.to_dict() for e in exc.errors]) from None
        scorer.swap(new)
        rescreened = None
        if Path(config.corpus.path).exists():   # stored items meet the reloaded risk rules (shared file: once)
            try:
                rescreened = corpus.rescreen()
            except CorpusUnavailable as exc:
                log.error("corpus not re-screened after the reload: %s", exc)
        if on_reload is not None:
            on_reload()
        return jsonify({"reloaded": True, "model_version": new.chain.version, "strategies": sorted(new.strategies),
                        "load_errors": new.chain.load_errors, "corpus_rescreened": rescreened})

    return app
