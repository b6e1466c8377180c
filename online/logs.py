"""The scorer's log lines: text for a terminal (the default) or JSON, one object per line, for a
log pipeline (``logging.format: json``). Every line carries the worker's pid and, inside a
request, its request id: the client's ``X-Request-Id`` when it sent a sane one, else a new one,
echoed in the response's ``X-Request-Id`` header.

:func:`logging_config` is a ``logging.config.dictConfig`` that gunicorn applies in the master and
every worker, so gunicorn's own lines come out in the same format.
"""
from __future__ import annotations

import contextvars
import logging
import re
import uuid
from datetime import datetime, timezone

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("stratarank_request_id", default=None)
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]%(request_suffix)s %(message)s"


def request_id_from(header: str | None) -> str:
    """The client's request id when it is 1-128 of ``[A-Za-z0-9._:-]``, else a fresh one (a header
    a client controls goes into every log line, so nothing else is taken from it)."""
    if header and CLIENT_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestContext(logging.Filter):
    """Adds ``request_id`` (None outside a request) and ``request_suffix`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        record.request_suffix = f" [req {rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "request_id"?, "message", "exc"?, ...fields}``; the
    ``fields`` a caller passes as ``extra={"fields": {...}}`` are merged in (access lines)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        return orjson.dumps(out, default=str).decode()


def logging_config(fmt: str = "text", level: str = "warning") -> dict:
    """A dictConfig for the root, ``stratarank.*`` and gunicorn's loggers, all to stderr."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": fmt,
               "filters": ["request"]}
    lvl = level.upper()
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"request": {"()": RequestContext}},
        "formatters": {fmt: formatter},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": lvl},
        "loggers": {
            # access lines (when logging.access is on) and the start-up line are INFO, shown at any level
            "stratarank.access": {"level": "INFO"},
            "stratarank.serve": {"level": "INFO"},
            "gunicorn.error": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }
