"""The OpenAPI 3.0 document of the scorer (served at ``/openapi.json``, driven by the fuzz test)."""
from __future__ import annotations

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "path"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "path": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}}}}},
}

ID = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 256}, {"type": "integer"}]}

CANDIDATE = {
    "type": "object",
    "required": ["item_id", "source"],
    "additionalProperties": False,
    "properties": {
        "item_id": ID,
        "source": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"},
        "creator_id": ID,
        "topic": ID,
        "text": {"type": "string", "maxLength": 20000},
        "features": {"type": "object", "additionalProperties": {
            "oneOf": [{"type": "number"}, {"type": "string"}, {"type": "array", "items": ID}]}},
        "generator": {"type": "object", "required": ["model", "prior_score"], "additionalProperties": False,
                      "properties": {"model": {"type": "string"},
                                     "prior_score": {"type": "number", "minimum": 0, "maximum": 1}}},
        "predictions": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}

RANK_REQUEST = {
    "type": "object",
    "required": ["user_id", "candidates"],
    "additionalProperties": False,
    "properties": {
        "request_id": ID,
        "user_id": ID,
        "context": {"type": "object"},
        "slate_size": {"type": "integer", "minimum": 1, "maximum": 1000},
        "strategy": {"type": "string"},
        "candidates": {"type": "array", "items": CANDIDATE, "maxItems": 2000},
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

EVENT = {
    "type": "object",
    "required": ["event_id", "ts", "type", "user_id", "item_id"],
    "additionalProperties": False,
    "properties": {
        "event_id": ID,
        "ts": {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "format": "date-time"}]},
        "type": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"},
        "user_id": ID,
        "item_id": ID,
        "request_id": ID,
        "value": {"type": "number"},
    },
}

EVENTS_REQUEST = {"oneOf": [
    {"type": "array", "items": EVENT, "maxItems": 10000},
    {"type": "object", "required": ["events"], "additionalProperties": False,
     "properties": {"events": {"type": "array", "items": EVENT, "maxItems": 10000}}},
]}


def _json(schema):
    return {"content": {"application/json": {"schema": schema}}}


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
                "requestBody": {"required": True, **_json(RANK_REQUEST)},
                "responses": {"200": {"description": "the slate", **_json(RANK_RESPONSE)},
                              **_errors(400, 401, 404, 413, 415, 429)}}},
            "/v1/events": {"post": {
                "summary": "Accept a batch of feedback events",
                "security": [{"apiKey": []}],
                "requestBody": {"required": True, **_json(EVENTS_REQUEST)},
                "responses": {"202": {"description": "accepted", **_json({"type": "object", "properties": {
                    "accepted": {"type": "integer"}}})}, **_errors(400, 401, 413, 415, 429)}}},
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
