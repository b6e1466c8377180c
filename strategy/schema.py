"""The shared event schema: request, candidate, impression and feedback event.

Every loop of the engine speaks these shapes (DESIGN.md, "Contracts"). The ``parse_*``
functions validate untrusted JSON-like input and report every bad field by its exact path,
for example ``candidates[3].item_id: required``.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime

from .checks import (
    MAX_ID_LEN,
    NAME_RE,
    as_dict,
    as_id,
    as_list,
    as_number,
    as_str,
    check_keys,
    nodes,
    type_name,
)
from .errors import Errors, join_path

SOURCE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
FEATURE_KEY_MAX = 128
FEATURE_LIST_MAX = 1_000
FEATURE_STR_MAX = 1_000
MAX_TEXT = 20_000
MAX_SLATE = 1_000
DEFAULT_MAX_CANDIDATES = 2_000
MAX_EVENTS = 10_000
MAX_DEPTH = 8  # arrays and objects a body nests (the schema needs 5: body.candidates[i].features.x[j])


@dataclass(frozen=True, slots=True)
class Generator:
    """Where an LLM-generated candidate came from and the generator's own quality estimate.

    ``prior_score`` in [0, 1] is the generator's belief of where the item stands among the
    request's candidates (0.8 = better than 80% of them); the strategy shrinks the learned
    score towards that quantile while the item has few observed impressions.
    """

    model: str
    prior_score: float


@dataclass(frozen=True, slots=True)
class Candidate:
    item_id: str
    source: str
    creator_id: str | None = None
    topic: str | None = None
    text: str | None = None
    features: dict = field(default_factory=dict)
    generator: Generator | None = None
    predictions: dict | None = None

    @property
    def impressions(self) -> float:
        """Observed impressions of this item (``features.impressions``, 0 when absent)."""
        value = self.features.get("impressions", 0)
        return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass(frozen=True, slots=True)
class Request:
    user_id: str
    candidates: tuple[Candidate, ...]
    request_id: str | None = None
    context: dict = field(default_factory=dict)
    slate_size: int | None = None
    strategy: str | None = None

    def stable_id(self) -> str:
        """``request_id`` or, when absent, a digest of the request (same request, same id)."""
        if self.request_id:
            return self.request_id
        digest = hashlib.sha256(self.user_id.encode())
        for c in self.candidates:
            digest.update(b"\x00" + c.item_id.encode())
        return "r-" + digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """A user's feedback on an impression: ``type`` names the event (click, like, watch, ...)."""

    event_id: str
    ts: float
    type: str
    user_id: str
    item_id: str
    request_id: str | None = None
    value: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Impression:
    """What was shown: position, variant and the features the model saw (the feature log)."""

    request_id: str
    ts: float
    user_id: str
    item_id: str
    position: int
    source: str
    strategy: str
    model_version: str
    score: float
    propensity: float = 1.0
    experiments: tuple = ()
    predictions: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["experiments"] = list(self.experiments)
        return out


# ---------------------------------------------------------------- parsing helpers


def _features(errs: Errors, value, path: str) -> dict:
    obj = as_dict(errs, value, path)
    if obj is None:
        return {}
    for key, val in obj.items():
        p = join_path(path, key)
        if len(key) > FEATURE_KEY_MAX:
            errs.add(p, f"feature names are at most {FEATURE_KEY_MAX} characters")
        elif isinstance(val, list):
            if len(val) > FEATURE_LIST_MAX:
                errs.add(p, f"at most {FEATURE_LIST_MAX} entries allowed, got {len(val)}", "too_many")
            elif not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in val):
                errs.add(p, "list features hold ids (strings or integers) only")
        elif isinstance(val, str):
            if len(val) > FEATURE_STR_MAX:
                errs.add(p, f"string features are at most {FEATURE_STR_MAX} characters", "too_long")
        elif isinstance(val, (int, float)) and not isinstance(val, bool):
            as_number(errs, val, p)
        else:
            errs.add(p, f"expected a number, string or list of ids, got {type_name(val)}", "type")
    return obj


def _nesting(errs: Errors, value, path: str, levels: int) -> None:
    """Report the first array or object of ``value`` (itself level 1) nested deeper than ``levels``:
    the free-form ``context`` is the one place where the schema alone does not bound the depth."""
    for where, node, level in nodes(value, path):
        if level > levels and type(node) in (dict, list):
            errs.add(where, f"nests deeper than {MAX_DEPTH} levels of arrays and objects, the most a body may",
                     "too_deep")
            return


def _predictions(errs: Errors, value, path: str) -> dict | None:
    obj = as_dict(errs, value, path)
    if obj is None:
        return None
    out = {}
    for key, val in obj.items():
        num = as_number(errs, val, join_path(path, key))
        if num is not None:
            out[key] = float(num)
    return out


def _timestamp(errs: Errors, value, path: str) -> float | None:
    """Epoch seconds, or an ISO-8601 string with a time zone."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            errs.add(path, f"'{value}' is not an ISO-8601 time or epoch seconds", "type")
            return None
        if parsed.tzinfo is None:
            errs.add(path, "an ISO-8601 time needs a time zone (e.g. 'Z')", "invalid")
            return None
        return parsed.timestamp()
    num = as_number(errs, value, path, lo=0)
    return None if num is None else float(num)


CANDIDATE_KEYS = ("item_id", "source", "creator_id", "topic", "text", "features", "generator", "predictions")
REQUEST_KEYS = ("request_id", "user_id", "context", "slate_size", "strategy", "candidates")
EVENT_KEYS = ("event_id", "ts", "type", "user_id", "item_id", "request_id", "value")


def _candidate(errs: Errors, value, path: str) -> Candidate | None:
    obj = as_dict(errs, value, path)
    if obj is None:
        return None
    before = len(errs.items)
    check_keys(errs, obj, path, CANDIDATE_KEYS, required=("item_id", "source"))
    item_id = as_id(errs, obj["item_id"], join_path(path, "item_id")) if "item_id" in obj else None
    source = as_str(errs, obj["source"], join_path(path, "source"), pattern=SOURCE_RE) if "source" in obj else None
    creator = obj.get("creator_id")
    if creator is not None:
        creator = as_id(errs, creator, join_path(path, "creator_id"))
    topic = obj.get("topic")
    if topic is not None:
        topic = as_id(errs, topic, join_path(path, "topic"))
    text = obj.get("text")
    if text is not None:
        text = as_str(errs, text, join_path(path, "text"), max_len=MAX_TEXT)
    features = _features(errs, obj["features"], join_path(path, "features")) if "features" in obj else {}
    generator = None
    if obj.get("generator") is not None:
        gpath = join_path(path, "generator")
        gen = as_dict(errs, obj["generator"], gpath)
        if gen is not None:
            check_keys(errs, gen, gpath, ("model", "prior_score"), required=("model", "prior_score"))
            model = as_str(errs, gen["model"], join_path(gpath, "model"), max_len=256) if "model" in gen else None
            prior = (
                as_number(errs, gen["prior_score"], join_path(gpath, "prior_score"), lo=0, hi=1)
                if "prior_score" in gen
                else None
            )
            if model is not None and prior is not None:
                generator = Generator(model, float(prior))
    predictions = None
    if obj.get("predictions") is not None:
        predictions = _predictions(errs, obj["predictions"], join_path(path, "predictions"))
    if len(errs.items) != before:
        return None
    return Candidate(item_id, source, creator, topic, text, features, generator, predictions)


_CANDIDATE_KEY_SET = frozenset(CANDIDATE_KEYS)
_MAX_ID_LEN = MAX_ID_LEN
_INT64_LO, _INT64_HI = -(1 << 63), 1 << 63
_LIST_ITEM_TYPES = frozenset((int, str))


def _fast_id(value):
    """``as_id`` of a valid id (an exact str of 1..256 characters), else None."""
    return value if type(value) is str and 0 < len(value) <= _MAX_ID_LEN else None


def _fast_candidate(obj) -> Candidate | None:
    """The common, valid candidate built without the per-field error bookkeeping of ``_candidate``.

    Returns None for anything it does not vouch for (unusual types, a missing or invalid field,
    ``predictions``): ``_candidate`` then validates it and reports its errors. What it accepts,
    ``_candidate`` accepts too and builds the same :class:`Candidate` from.
    """
    if type(obj) is not dict or not obj.keys() <= _CANDIDATE_KEY_SET:
        return None
    item_id = _fast_id(obj.get("item_id"))
    source = obj.get("source")
    if item_id is None or type(source) is not str or not SOURCE_RE.fullmatch(source):
        return None
    creator = obj.get("creator_id")
    if creator is not None:
        creator = _fast_id(creator)
        if creator is None:
            return None
    topic = obj.get("topic")
    if topic is not None:
        topic = _fast_id(topic)
        if topic is None:
            return None
    text = obj.get("text")
    if text is not None and (type(text) is not str or len(text) > MAX_TEXT):
        return None
    if obj.get("predictions") is not None:
        return None
    if "features" in obj:
        features = obj["features"]
        if type(features) is not dict:
            return None
        for key, val in features.items():
            if type(key) is not str or len(key) > FEATURE_KEY_MAX:
                return None
            t = type(val)
            if t is float:
                if val - val != 0.0:   # inf or nan
                    return None
            elif t is int:
                if not _INT64_LO <= val < _INT64_HI:
                    return None
            elif t is str:
                if len(val) > FEATURE_STR_MAX:
                    return None
            elif t is list:
                if len(val) > FEATURE_LIST_MAX or not set(map(type, val)) <= _LIST_ITEM_TYPES:
                    return None
            else:
                return None
    else:
        features = {}
    generator = obj.get("generator")
    if generator is not None:
        if type(generator) is not dict or len(generator) != 2:
            return None
        model, prior = generator.get("model"), generator.get("prior_score")
        if type(model) is not str or len(model) > 256:
            return None
        t = type(prior)
        if not ((t is float and 0.0 <= prior <= 1.0) or (t is int and 0 <= prior <= 1)):
            return None
        generator = Generator(model, float(prior))
    return Candidate(item_id, source, creator, topic, text, features, generator, None)


def parse_request(data, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> Request:
    """Validate a ``/v1/rank`` body; raises :class:`~strategy.errors.ValidationError`."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any()
    check_keys(errs, obj, "", REQUEST_KEYS, required=("user_id", "candidates"))
    user_id = as_id(errs, obj["user_id"], "user_id") if "user_id" in obj else None
    request_id = as_id(errs, obj["request_id"], "request_id") if obj.get("request_id") is not None else None
    context = as_dict(errs, obj["context"], "context") if obj.get("context") is not None else {}
    if context:
        _nesting(errs, context, "context", MAX_DEPTH - 1)
    slate_size = None
    if obj.get("slate_size") is not None:
        slate_size = as_number(errs, obj["slate_size"], "slate_size", lo=1, hi=MAX_SLATE, integer=True)
    strategy = as_str(errs, obj["strategy"], "strategy", pattern=NAME_RE) if obj.get("strategy") is not None else None
    candidates: list[Candidate] = []
    if "candidates" in obj:
        raw = as_list(errs, obj["candidates"], "candidates", max_len=max_candidates)
        for i, item in enumerate(raw or ()):
            cand = _fast_candidate(item)
            if cand is None:   # unusual or invalid: the full checks, which name every bad field
                cand = _candidate(errs, item, f"candidates[{i}]")
            if cand is not None:
                candidates.append(cand)
    errs.raise_if_any()
    return Request(user_id, tuple(candidates), request_id, context or {}, slate_size, strategy)


def parse_event(data, path: str = "", errs: Errors | None = None) -> FeedbackEvent | None:
    """Validate one feedback event. With ``errs`` given, problems are added there."""
    own = errs is None
    errs = Errors() if own else errs
    before = len(errs.items)
    obj = as_dict(errs, data, path)
    event = None
    if obj is not None:
        check_keys(errs, obj, path, EVENT_KEYS, required=("event_id", "ts", "type", "user_id", "item_id"))
        p = lambda k: join_path(path, k)  # noqa: E731 - a local path helper
        event_id = as_id(errs, obj["event_id"], p("event_id")) if "event_id" in obj else None
        ts = _timestamp(errs, obj["ts"], p("ts")) if "ts" in obj else None
        etype = as_str(errs, obj["type"], p("type"), pattern=NAME_RE) if "type" in obj else None
        user_id = as_id(errs, obj["user_id"], p("user_id")) if "user_id" in obj else None
        item_id = as_id(errs, obj["item_id"], p("item_id")) if "item_id" in obj else None
        request_id = as_id(errs, obj["request_id"], p("request_id")) if obj.get("request_id") is not None else None
        value = as_number(errs, obj["value"], p("value")) if obj.get("value") is not None else None
        if len(errs.items) == before:
            event = FeedbackEvent(event_id, ts, etype, user_id, item_id, request_id,
                                  None if value is None else float(value))
    if own:
        errs.raise_if_any()
    return event


def parse_events(data, max_events: int = MAX_EVENTS) -> list[FeedbackEvent]:
    """Validate a ``/v1/events`` body: a list of events or ``{"events": [...]}``."""
    errs = Errors()
    path = ""
    if isinstance(data, dict):
        check_keys(errs, data, "", ("events",), required=("events",))
        data, path = data.get("events"), "events"
    items = as_list(errs, data, path, max_len=max_events)
    events = [parse_event(item, f"{path}[{i}]", errs) for i, item in enumerate(items or ())]
    errs.raise_if_any()
    return events
