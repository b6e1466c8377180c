"""The shared event schema: request, candidate, impression and feedback event.

Every loop of the engine speaks these shapes (DESIGN.md, "Contracts"). The ``parse_*``
functions validate untrusted JSON-like input and report every bad field by its exact path,
for example ``candidates[3].item_id: required``.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import chain, repeat
from operator import attrgetter
from typing import Annotated, Union

import msgspec
import orjson

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
MAX_RETRIEVE = 1_000  # the most items one /v1/retrieve answers
MAX_DEPTH = 8  # arrays and objects a body nests (the schema needs 5: body.candidates[i].features.x[j])


# The wire constraints of a valid candidate, read by msgspec when a /v1/rank body is decoded
# straight into Candidates (``parse_request_json``); building one in Python checks nothing.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
_FeatureName = Annotated[str, msgspec.Meta(max_length=FEATURE_KEY_MAX)]
_FeatureScalar = Union[Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)], float,
                       Annotated[str, msgspec.Meta(max_length=FEATURE_STR_MAX)]]


class Generator(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where an LLM-generated candidate came from and the generator's own quality estimate.

    ``prior_score`` in [0, 1] is the generator's belief of where the item stands among the
    request's candidates (0.8 = better than 80% of them); the strategy shrinks the learned
    score towards that quantile while the item has few observed impressions.
    """

    model: Annotated[str, msgspec.Meta(max_length=256)]
    prior_score: Annotated[float, msgspec.Meta(ge=0, le=1)]


class Candidate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One candidate of a request. A frozen ``msgspec.Struct``, so a valid body decodes straight
    into candidates; its annotations are the common case's wire constraints (list features and
    ``predictions`` are valid too, through :func:`parse_request`)."""

    item_id: _Id
    source: str
    creator_id: _Id | None = None
    topic: _Id | None = None
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT)] | None = None
    features: dict[_FeatureName, _FeatureScalar] = {}
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
FEED_KEYS = ("request_id", "user_id", "context", "slate_size", "strategy")
RETRIEVE_KEYS = ("user_id", "text", "item_id", "k")
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
_SOURCES_SEEN: set = set()   # sources that matched SOURCE_RE (a regex match per candidate costs more)
_SOURCES_SEEN_MAX = 1024
assert Candidate.__struct_fields__ == CANDIDATE_KEYS and Generator.__struct_fields__ == ("model", "prior_score")


def _fast_id(value):
    """``as_id`` of a valid id (an exact str of 1..256 characters), else None."""
    return value if type(value) is str and 0 < len(value) <= _MAX_ID_LEN else None


def _sources_ok(sources) -> bool:
    """Whether every one of ``sources`` (strs) matches SOURCE_RE, each distinct one checked once
    (and remembered in ``_SOURCES_SEEN`` while it has room)."""
    unseen = set(sources) - _SOURCES_SEEN
    if unseen:
        if not all(map(SOURCE_RE.fullmatch, unseen)):
            return False
        if len(_SOURCES_SEEN) < _SOURCES_SEEN_MAX:
            _SOURCES_SEEN.update(unseen)
    return True


def _fast_candidate(obj) -> Candidate | None:
    """The common, valid candidate built without the per-field error bookkeeping of ``_candidate``.

    Returns None for anything it does not vouch for (unusual types, a missing or invalid field,
    ``predictions``): ``_candidate`` then validates it and reports its errors. What it accepts,
    ``_candidate`` accepts too and builds the same :class:`Candidate` from (equal fields, the
    body's own ``features`` dict).
    """
    if type(obj) is not dict or not _CANDIDATE_KEY_SET.issuperset(obj):
        return None
    get = obj.get
    item_id = get("item_id")
    if type(item_id) is not str or not 0 < len(item_id) <= _MAX_ID_LEN:
        return None
    source = get("source")
    if type(source) is not str:
        return None
    if source not in _SOURCES_SEEN:
        if not SOURCE_RE.fullmatch(source):
            return None
        if len(_SOURCES_SEEN) < _SOURCES_SEEN_MAX:
            _SOURCES_SEEN.add(source)
    creator = get("creator_id")
    if creator is not None and (type(creator) is not str or not 0 < len(creator) <= _MAX_ID_LEN):
        return None
    topic = get("topic")
    if topic is not None and (type(topic) is not str or not 0 < len(topic) <= _MAX_ID_LEN):
        return None
    text = get("text")
    if text is not None and (type(text) is not str or len(text) > MAX_TEXT):
        return None
    if get("predictions") is not None:
        return None
    features = get("features", _NO_FEATURES)
    if features is _NO_FEATURES:
        features = {}
    elif type(features) is not dict:
        return None
    else:
        for key, val in features.items():
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
            if type(key) is not str or len(key) > FEATURE_KEY_MAX:
                return None
    generator = get("generator")
    if generator is not None:
        if type(generator) is not dict or len(generator) != 2:
            return None
        model, prior = generator.get("model"), generator.get("prior_score")
        if type(model) is not str or len(model) > 256:
            return None
        t = type(prior)
        if t is float:
            if not 0.0 <= prior <= 1.0:
                return None
        elif t is int and 0 <= prior <= 1:
            prior = float(prior)
        else:
            return None
        generator = Generator(model, prior)
    return Candidate(item_id, source, creator, topic, text, features, generator)


_NO_FEATURES = object()
_NONE = type(None)
_STR, _STR_OR_NONE, _DICT_OR_NONE = frozenset((str,)), frozenset((str, _NONE)), frozenset((dict, _NONE))
_NUMBERS, _FEATURE_SCALARS = frozenset((int, float)), frozenset((int, float, str))


def _build_generator(obj) -> Generator | None:
    if obj is None:
        return None
    return Generator(obj["model"], float(obj["prior_score"]))


def _ids_ok(values: list, optional: bool) -> bool:
    """Every value an id (a str of 1..256 characters), or None where ``optional``."""
    if optional:
        if not set(map(type, values)) <= _STR_OR_NONE:
            return False
        present = filter(None, values)   # "" is caught below
    else:
        try:
            "".join(values)   # strings only, at C speed
        except TypeError:
            return False
        present = values
    return "" not in values and max(map(len, present), default=0) <= _MAX_ID_LEN


def _abs_sum(values: list) -> float:
    """``math.fsum`` of the magnitudes (exact, then rounded once), inf when it cannot be taken."""
    try:
        return math.fsum(map(abs, values))
    except (OverflowError, ValueError):
        return math.inf


def _finite_sum(values: list) -> bool:
    """Whether ``math.fsum(values)`` is finite: then every value is (an inf, a NaN or an overflow
    says no, for some value or for the sum; either way the candidates' own checks decide)."""
    try:
        return math.isfinite(math.fsum(values))
    except (OverflowError, ValueError):
        return False


def _fast_candidates(raw: list) -> list | None:
    """Every candidate of ``raw`` built at once, field by field over all candidates with C-level
    passes (``map``, ``set``, ``min``, ``max``), or None unless every one of them is a common,
    valid candidate. What it builds is what :func:`_fast_candidate` builds from each (the same
    fields, the body's own ``features`` dicts); it is stricter, never looser: a feature holding a
    list, a number beyond ±2**63 next to an integer, a sum of features that overflows, and the
    like send the whole list to the candidate-by-candidate path."""
    n = len(raw)
    if set(map(type, raw)) != {dict} or not set(chain.from_iterable(raw)) <= _CANDIDATE_KEY_SET:
        return None
    keys = repeat
    item_ids = list(map(dict.get, raw, keys("item_id", n)))
    if not _ids_ok(item_ids, False):
        return None
    sources = list(map(dict.get, raw, keys("source", n)))
    if set(map(type, sources)) != _STR:
        return None
    if not _sources_ok(sources):
        return None
    creators = list(map(dict.get, raw, keys("creator_id", n)))
    topics = list(map(dict.get, raw, keys("topic", n)))
    if not (_ids_ok(creators, True) and _ids_ok(topics, True)):
        return None
    texts = list(map(dict.get, raw, keys("text", n)))
    if not set(map(type, texts)) <= _STR_OR_NONE or max(map(len, filter(None, texts)), default=0) > MAX_TEXT:
        return None
    if list(map(dict.get, raw, keys("predictions", n))).count(None) != n:
        return None
    features = list(map(dict.get, raw, keys("features", n), keys(_NO_FEATURES, n)))
    if _NO_FEATURES in features:
        features = [{} if f is _NO_FEATURES else f for f in features]
    if set(map(type, features)) != {dict}:
        return None
    names = set(chain.from_iterable(features))   # the distinct feature names (a str equals no other type)
    if names and (set(map(type, names)) != _STR or max(map(len, names)) > FEATURE_KEY_MAX):
        return None
    values = list(chain.from_iterable(map(dict.values, features)))
    kinds = set(map(type, values))
    if not kinds <= _FEATURE_SCALARS:
        return None
    if str in kinds:
        if max(len(v) for v in values if type(v) is str) > FEATURE_STR_MAX:
            return None
        if kinds != _STR:
            values = [v for v in values if type(v) is not str]
    if kinds & _NUMBERS:
        # one pass for both: a finite sum of magnitudes makes every float finite, and below 2**63
        # every integer within 64 bits (a larger sum only sends the list the slower way)
        total = _abs_sum(values)
        if not math.isfinite(total) or (int in kinds and total >= _INT64_HI):
            return None
    generators = list(map(dict.get, raw, keys("generator", n)))
    if not set(map(type, generators)) <= _DICT_OR_NONE:
        return None
    given = list(filter(None, generators))
    if len(given) + generators.count(None) != n:
        return None   # an empty generator object
    if given:
        if set(map(len, given)) != {2}:
            return None   # one with other keys than its two
        models = list(map(dict.get, given, keys("model", len(given))))
        priors = list(map(dict.get, given, keys("prior_score", len(given))))
        if set(map(type, models)) != _STR or max(map(len, models)) > 256:
            return None
        kinds = set(map(type, priors))
        if not kinds <= _NUMBERS or (float in kinds and not _finite_sum(priors)):
            return None
        if not (0 <= min(priors) and max(priors) <= 1):
            return None
        generators = list(map(_build_generator, generators))
    return list(map(Candidate, item_ids, sources, creators, topics, texts, features, generators))


def parse_request(data, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> Request:
    """Validate a ``/v1/rank`` body; raises :class:`~strategy.errors.ValidationError`."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any()
    check_keys(errs, obj, "", REQUEST_KEYS, required=("user_id", "candidates"))
    user_id, request_id, context, slate_size, strategy = _request_fields(errs, obj)
    candidates: list[Candidate] = []
    if "candidates" in obj:
        raw = as_list(errs, obj["candidates"], "candidates", max_len=max_candidates)
        if raw:
            built = _fast_candidates(raw)   # the whole list at once, when every candidate is a common one
            if built is None:
                fast = _fast_candidate
                built = [fast(item) for item in raw]
            candidates = list(filter(None, built))   # a Candidate is always true
            if len(candidates) != len(built):   # unusual or invalid ones: the full checks name every bad field
                candidates = []
                for i, cand in enumerate(built):
                    if cand is None:
                        cand = _candidate(errs, raw[i], f"candidates[{i}]")
                    if cand is not None:
                        candidates.append(cand)
    errs.raise_if_any()
    return Request(user_id, tuple(candidates), request_id, context or {}, slate_size, strategy)


class _RankBody(msgspec.Struct, forbid_unknown_fields=True):
    """A ``/v1/rank`` body as msgspec decodes it: the candidates typed, the other fields kept as
    their raw JSON for orjson and ``_request_fields`` (their checks and numbers exactly as the
    full path's)."""

    user_id: msgspec.Raw
    candidates: list[Candidate]
    request_id: msgspec.Raw = None
    context: msgspec.Raw = None
    slate_size: msgspec.Raw = None
    strategy: msgspec.Raw = None


_RANK_BODY = msgspec.json.Decoder(_RankBody)
_RAW_FIELDS = ("request_id", "context", "slate_size", "strategy")
_SOURCE_OF, _PREDICTIONS_OF = attrgetter("source"), attrgetter("predictions")


def parse_request_json(raw: bytes, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> Request | None:
    """A ``/v1/rank`` body (UTF-8 JSON bytes, no byte order mark) decoded and validated in one pass,
    straight into :class:`Candidate`s (msgspec, against the constraints in their annotations), or
    None for anything it does not vouch for: invalid JSON, any invalid field, and valid but unusual
    bodies (list features, ``predictions``, integers beyond 64 bits, an escaped NUL). The caller
    then decodes the body with orjson and runs :func:`parse_request`, which reports the errors;
    what this accepts, that path accepts too and builds the equal :class:`Request` from."""
    if b"\\u0000" in raw:
        return None
    try:
        body = _RANK_BODY.decode(raw)
        fields = {"user_id": orjson.loads(memoryview(body.user_id))}
        for name in _RAW_FIELDS:
            value = getattr(body, name)
            if value is not None:
                fields[name] = orjson.loads(memoryview(value))
    except (msgspec.MsgspecError, ValueError, RecursionError):   # orjson's errors and bad UTF-8 are ValueErrors
        return None
    cands = body.candidates
    if len(cands) > max_candidates or list(map(_PREDICTIONS_OF, cands)).count(None) != len(cands):
        return None
    if not _sources_ok(map(_SOURCE_OF, cands)):
        return None
    errs = Errors()
    user_id, request_id, context, slate_size, strategy = _request_fields(errs, fields)
    if errs:
        return None
    return Request(user_id, tuple(cands), request_id, context or {}, slate_size, strategy)


def _request_fields(errs: Errors, obj: dict) -> tuple:
    """``user_id``, ``request_id``, ``context``, ``slate_size``, ``strategy`` of a rank or feed body."""
    user_id = as_id(errs, obj["user_id"], "user_id") if "user_id" in obj else None
    request_id = as_id(errs, obj["request_id"], "request_id") if obj.get("request_id") is not None else None
    context = as_dict(errs, obj["context"], "context") if obj.get("context") is not None else {}
    if context:
        _nesting(errs, context, "context", MAX_DEPTH - 1)
    slate_size = None
    if obj.get("slate_size") is not None:
        slate_size = as_number(errs, obj["slate_size"], "slate_size", lo=1, hi=MAX_SLATE, integer=True)
    strategy = as_str(errs, obj["strategy"], "strategy", pattern=NAME_RE) if obj.get("strategy") is not None else None
    return user_id, request_id, context, slate_size, strategy


def parse_feed(data) -> Request:
    """Validate a ``/v1/feed`` body (a ``/v1/rank`` body without candidates: the engine retrieves
    them); the :class:`Request` it returns has none yet."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any()
    check_keys(errs, obj, "", FEED_KEYS, required=("user_id",))
    user_id, request_id, context, slate_size, strategy = _request_fields(errs, obj)
    errs.raise_if_any()
    return Request(user_id, (), request_id, context or {}, slate_size, strategy)


@dataclass(frozen=True, slots=True)
class RetrieveQuery:
    """A ``/v1/retrieve`` body: exactly one of ``user_id``, ``text``, ``item_id``, and ``k``."""

    user_id: str | None = None
    text: str | None = None
    item_id: str | None = None
    k: int = 20


def parse_retrieve(data) -> RetrieveQuery:
    """Validate a ``/v1/retrieve`` body; raises :class:`~strategy.errors.ValidationError`."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any()
    check_keys(errs, obj, "", RETRIEVE_KEYS)
    given = [key for key in ("user_id", "text", "item_id") if obj.get(key) is not None]
    if len(given) != 1:
        errs.add("", f"give exactly one of user_id, text, item_id (got {', '.join(given) or 'none'})",
                 "required" if not given else "conflict")
    fields: dict = {}
    for key in ("user_id", "item_id"):
        if obj.get(key) is not None:
            fields[key] = as_id(errs, obj[key], key)
    if obj.get("text") is not None:
        text = as_str(errs, obj["text"], "text", max_len=MAX_TEXT)
        if text is not None and not text.strip():
            errs.add("text", "must hold at least one word", "required")
        fields["text"] = text
    if obj.get("k") is not None:
        fields["k"] = as_number(errs, obj["k"], "k", lo=1, hi=MAX_RETRIEVE, integer=True)
    errs.raise_if_any()
    return RetrieveQuery(**fields)


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
