"""The OpenAPI 3.0 document of the scorer (served at ``/openapi.json``, driven by the fuzz test)."""
from __future__ import annotations

from strategy.checks import MAX_ID_LEN, NAME_RE
from strategy.schema import (
    DEFAULT_MAX_CANDIDATES,
    FEATURE_KEY_MAX,
    FEATURE_LIST_MAX,
    FEATURE_STR_MAX,
    MAX_DEPTH,
    MAX_EVENTS,
    MAX_RETRIEVE,
    MAX_SLATE,
    MAX_TEXT,
    SOURCE_RE,
)
from strategy.items import MAX_ITEMS, MAX_MODEL_LEN, MAX_TS, MAX_TTL_S, SOURCES

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "path"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "path": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}}}}},
}

ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN}   # a number is not an id


def _nullable(schema: dict) -> dict:
    """``schema`` or null: an optional field sent as null is taken as absent."""
    return {**schema, "nullable": True}


NUMBER = {"type": "number"}   # finite: JSON has no NaN or Infinity, and a number past a double's range is a 400

CANDIDATE = {
    "type": "object",
    "required": ["item_id", "source"],
    "additionalProperties": False,
    "properties": {
        "item_id": ID,
        "source": {"type": "string", "pattern": SOURCE_RE.pattern},
        "creator_id": _nullable(ID),
        "topic": _nullable(ID),
        "text": _nullable({"type": "string", "maxLength": MAX_TEXT}),
        "features": {"type": "object", "description": f"feature names of at most {FEATURE_KEY_MAX} characters",
                     "additionalProperties": {"oneOf": [
                         NUMBER, {"type": "string", "maxLength": FEATURE_STR_MAX},
                         {"type": "array", "maxItems": FEATURE_LIST_MAX,
                          "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}]}},
        "generator": _nullable({"type": "object", "required": ["model", "prior_score"], "additionalProperties": False,
                                "properties": {"model": {"type": "string", "maxLength": 256},
                                               "prior_score": {**NUMBER, "minimum": 0, "maximum": 1}}}),
        "predictions": _nullable({"type": "object", "additionalProperties": NUMBER}),
    },
}

RANK_REQUEST = {
    "type": "object",
    "required": ["user_id", "candidates"],
    "additionalProperties": False,
    "properties": {
        "request_id": _nullable(ID),
        "user_id": ID,
        "context": _nullable({"type": "object", "description": "free-form; within the body's nesting limit"}),
        "slate_size": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_SLATE}),
        "strategy": _nullable({"type": "string", "pattern": NAME_RE.pattern}),
        "candidates": {"type": "array", "items": CANDIDATE, "maxItems": DEFAULT_MAX_CANDIDATES,
                       "description": "maxItems is server.max_candidates"},
    },
}

RANK_RESPONSE = {
    "type": "object",
    "required": ["request_id", "strategy", "model_version", "experiments", "items", "dropped", "degraded"],
    "properties": {
        "request_id": {"type": "string"},
        "strategy": {"type": "string"},
        "model_version": {"type": "string"},
        "degraded": {"type": "boolean"},
        "experiments": {"type": "array", "items": {"type": "object", "properties": {
            "layer": {"type": "string"}, "experiment": {"type": "string"}, "variant": {"type": "string"}}}},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "item_id": {"type": "string"}, "rank": {"type": "integer"}, "score": {"type": "number"},
            "source": {"type": "string"}, "propensity": {"type": "number"},
            "predictions": {"type": "object", "additionalProperties": {"type": "number"}},
            "reasons": {"type": "array", "items": {"type": "string"}}}}},
        "dropped": {"type": "array", "items": {"type": "object", "properties": {
            "item_id": {"type": "string"}, "reason": {"type": "string"}}}},
    },
}

FEED_REQUEST = {
    "type": "object",
    "required": ["user_id"],
    "additionalProperties": False,
    "properties": {k: v for k, v in RANK_REQUEST["properties"].items() if k != "candidates"},
    "description": "a /v1/rank body without candidates: the engine retrieves them (the strategy's retrieval: "
                   "section, strategy/retrieval.py)",
}

SOURCE_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}

FEED_RESPONSE = {
    **RANK_RESPONSE,
    "required": [*RANK_RESPONSE["required"], "retrieval"],
    "properties": {
        **RANK_RESPONSE["properties"],
        "items": {"type": "array", "items": {**RANK_RESPONSE["properties"]["items"]["items"], "properties": {
            **RANK_RESPONSE["properties"]["items"]["items"]["properties"],
            "retrieved_by": {"type": "array", "items": {"type": "string"},
                             "description": "every retrieval source that found the item"}}}},
        "retrieval": {"type": "object", "required": ["candidates", "found", "credited", "unavailable", "timings_ms"],
                      "properties": {
            "candidates": {"type": "integer", "description": "the pool the ranker scored"},
            "found": {**SOURCE_COUNTS, "description": "items each source returned"},
            "credited": {**SOURCE_COUNTS, "description": "pool slots each source filled first"},
            "unavailable": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "sources that could not run, and why"},
            "timings_ms": {"type": "object", "additionalProperties": NUMBER,
                           "description": "retrieval, ranking, and retrieval's parts"},
            "model_version": _nullable({"type": "string", "description": "the two-tower model"})}},
    },
}

RETRIEVE_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "description": "exactly one of user_id, text, item_id",
    "properties": {
        "user_id": _nullable(ID),
        "text": _nullable({"type": "string", "minLength": 1, "maxLength": MAX_TEXT}),
        "item_id": _nullable(ID),
        "k": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_RETRIEVE}),
    },
}

EVENT = {
    "type": "object",
    "required": ["event_id", "ts", "type", "user_id", "item_id"],
    "additionalProperties": False,
    "properties": {
        "event_id": ID,
        "ts": {"oneOf": [{**NUMBER, "minimum": 0}, {"type": "string", "format": "date-time",
                                                    "description": "ISO-8601 with a time zone"}]},
        "type": {"type": "string", "pattern": NAME_RE.pattern},
        "user_id": ID,
        "item_id": ID,
        "request_id": _nullable(ID),
        "value": _nullable(NUMBER),
    },
}

EVENTS_REQUEST = {"oneOf": [
    {"type": "array", "items": EVENT, "maxItems": MAX_EVENTS},
    {"type": "object", "required": ["events"], "additionalProperties": False,
     "properties": {"events": {"type": "array", "items": EVENT, "maxItems": MAX_EVENTS}}},
]}

TIMESTAMP = {"oneOf": [{**NUMBER, "minimum": 0, "maximum": MAX_TS, "exclusiveMaximum": True},
                       {"type": "string", "format": "date-time", "description": "ISO-8601 with a time zone"}]}

ITEM = {
    "type": "object",
    "required": ["item_id", "source"],
    "additionalProperties": False,
    "description": "A write of an existing item_id merges: given fields replace, absent ones stay, null clears "
                   "(strategy/items.py). llm items carry a generator, human items none.",
    "properties": {
        "item_id": ID,
        "source": {"type": "string", "enum": list(SOURCES)},
        "creator_id": _nullable(ID),
        "topic": _nullable(ID),
        "text": _nullable({"type": "string", "maxLength": MAX_TEXT}),
        "generator": _nullable({"type": "object", "required": ["model", "prior_score"], "additionalProperties": False,
                                "properties": {"model": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_LEN},
                                               "prompt_id": _nullable(ID),
                                               "prior_score": {**NUMBER, "minimum": 0, "maximum": 1}}}),
        "created_at": _nullable(TIMESTAMP),
        "expires_at": _nullable({**TIMESTAMP, "description": "after created_at; not with ttl_s"}),
        "ttl_s": _nullable({**NUMBER, "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_TTL_S,
                            "description": "expires_at = created_at + ttl_s"}),
        "blocked": _nullable({"type": "boolean"}),
    },
}

ITEMS_REQUEST = {"type": "object", "required": ["items"], "additionalProperties": False,
                 "properties": {"items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": MAX_ITEMS}}}

ITEMS_RESPONSE = {"type": "object", "required": ["accepted", "created", "updated", "expired", "blocked"], "properties": {
    "accepted": {"type": "integer"}, "created": {"type": "integer"}, "updated": {"type": "integer"},
    "expired": {"type": "integer", "description": "written already past expires_at: not stored"},
    "blocked": {"type": "array", "items": {"type": "object", "properties": {
        "item_id": {"type": "string"}, "reason": {"type": "string"}}}}}}

STORED_ITEM = {"type": "object", "required": ["item_id", "source", "created_at", "blocked", "seq"], "properties": {
    **{k: v for k, v in ITEM["properties"].items() if k not in ("ttl_s", "created_at", "expires_at")},
    "created_at": NUMBER, "expires_at": _nullable(NUMBER), "updated_at": NUMBER, "blocked": {"type": "boolean"},
    "blocked_reason": _nullable({"type": "string", "description": "blocked | risk:<rule>"}),
    "seq": {"type": "integer", "description": "grows with every write to the corpus"}}}

RETRIEVE_RESPONSE = {"type": "object", "required": ["model_version", "items"], "properties": {
    "model_version": {"type": "string"},
    "items": {"type": "array", "items": {**STORED_ITEM, "properties": {
        **STORED_ITEM["properties"], "score": NUMBER,
        "engagement": {"type": "object", "additionalProperties": NUMBER,
                       "description": "the near-line store's totals (impressions, click, like, ...)"}}}}}}

BODY_RULES = (
    "UTF-8 JSON as RFC 8259 defines it (a leading byte order mark is skipped): NaN, Infinity, a number past a "
    "double's range, a lone surrogate and a string that holds U+0000 are 400 invalid_json / invalid_string; a "
    f"body nests at most {MAX_DEPTH} levels of arrays and objects (deeper is a 400: too_deep, or the wrong type at "
    "the path); a key given twice keeps its last value; a body past server.max_body_bytes is a 413."
)


def _json(schema):
    return {"content": {"application/json": {"schema": schema}}}


def _body(schema):
    return {"required": True, "description": BODY_RULES, "x-max-depth": MAX_DEPTH, **_json(schema)}


def _errors(*codes):
    return {str(c): {"description": "error", **_json(ERROR)} for c in codes}


def openapi_document() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Stratarank scorer", "version": "1.0.0",
                 "description": "Real-time multi-objective ranking of mixed human / LLM candidates."},
        "components": {"securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "adminToken": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/rank": {"post": {
                "summary": "Rank a request's candidates under a strategy",
                "security": [{"apiKey": []}],
                "requestBody": _body(RANK_REQUEST),
                "responses": {"200": {"description": "the slate", **_json(RANK_RESPONSE)},
                              **_errors(400, 401, 404, 413, 415, 429)}}},
            "/v1/feed": {"post": {
                "summary": "Build a user's feed: retrieve candidates from the corpus, then rank them as /v1/rank",
                "security": [{"apiKey": []}],
                "requestBody": _body(FEED_REQUEST),
                "responses": {"200": {"description": "the slate, with its retrieval", **_json(FEED_RESPONSE)},
                              **_errors(400, 401, 404, 413, 415, 429, 503)}}},
            "/v1/retrieve": {"post": {
                "summary": "Corpus items nearest a user, a text or an item, with their engagement counters "
                           "(an AIGC prompt engine's memory)",
                "security": [{"apiKey": []}],
                "requestBody": _body(RETRIEVE_REQUEST),
                "responses": {"200": {"description": "the items, best first", **_json(RETRIEVE_RESPONSE)},
                              **_errors(400, 401, 404, 413, 415, 429, 503)}}},
            "/v1/events": {"post": {
                "summary": "Accept a batch of feedback events",
                "security": [{"apiKey": []}],
                "requestBody": _body(EVENTS_REQUEST),
                "responses": {"202": {"description": "accepted", **_json({"type": "object", "properties": {
                    "accepted": {"type": "integer"}}})}, **_errors(400, 401, 413, 415, 429)}}},
            "/v1/items": {"post": {
                "summary": "Add or update corpus items (a batch, written all or nothing)",
                "security": [{"apiKey": []}],
                "requestBody": _body(ITEMS_REQUEST),
                "responses": {"200": {"description": "written (durable)", **_json(ITEMS_RESPONSE)},
                              **_errors(400, 401, 413, 415, 429, 503)}}},
            "/v1/items/{item_id}": {"get": {
                "summary": "One corpus item (blocked ones too; an expired one is gone)",
                "security": [{"apiKey": []}],
                "parameters": [{"name": "item_id", "in": "path", "required": True, "schema": ID,
                                "description": "percent-encoded"}],
                "responses": {"200": {"description": "the item", **_json(STORED_ITEM)},
                              **_errors(401, 404, 429, 503)}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: a model is loaded (the JSON body names the model, the worker "
                                           "pid and, with a memory store, its near-line thread's progress)",
                                "responses": {
                "200": {"description": "ready"}, "503": {"description": "serving the degraded order"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/admin/reload": {"post": {
                "summary": "Reload strategies, risk rules and models, swapped atomically",
                "security": [{"adminToken": []}],
                "responses": {"200": {"description": "reloaded"}, **_errors(401, 403, 422)}}},
        },
    }
