"""The corpus item schema: what ``POST /v1/items`` and the ``items`` bus topic carry.

An item write names an item and the fields it sets::

    {"item_id": "i1", "source": "llm", "creator_id": "c1", "topic": "t3", "text": "...",
     "generator": {"model": "gpt-x", "prompt_id": "p7", "prior_score": 0.8},
     "created_at": 1.7e9, "expires_at": 1.7e9 + 86400, "blocked": false}

- ``item_id`` and ``source`` (``human`` | ``llm``) are required in every write;
- ``creator_id``, ``topic``, ``generator.prompt_id`` are string ids (a number is not an id);
  ``text`` holds at most :data:`MAX_TEXT` characters;
- ``generator`` is what an LLM item came from; a ``human`` item carries none, an ``llm`` item
  must have one (in this write or an earlier one: see *partial updates* below);
- ``created_at`` / ``expires_at``: epoch seconds or ISO-8601 with a time zone; ``ttl_s`` instead of
  ``expires_at`` means ``expires_at = created_at + ttl_s`` (giving both is an error);
- ``blocked``: true keeps the item in the corpus but out of every candidate read.

**Partial updates.** A write of an ``item_id`` already in the corpus is a merge: the fields the
write contains replace the stored ones, the fields it leaves out keep their stored values, and an
optional field sent as ``null`` is cleared (``creator_id``, ``topic``, ``text``, ``generator``,
``expires_at``). ``created_at`` is kept from the first write unless a write gives it. So
``{"item_id": "i1", "source": "llm", "blocked": true}`` blocks ``i1`` and changes nothing else.

The parsers validate untrusted JSON and report every bad field by its exact path, for example
``items[3].generator.prior_score``, and unknown keys with a did-you-mean. Pure Python (no numpy).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .checks import as_bool, as_dict, as_id, as_list, as_number, as_str, check_keys
from .errors import Errors, join_path
from .schema import MAX_TEXT

SOURCES = ("human", "llm")
ITEM_KEYS = ("item_id", "source", "creator_id", "topic", "text", "generator", "created_at", "expires_at", "ttl_s",
             "blocked")
GENERATOR_KEYS = ("model", "prompt_id", "prior_score")
CLEARABLE = ("creator_id", "topic", "text", "generator", "expires_at")   # null clears them on a merge
MAX_ITEMS = 1_000          # items in one POST /v1/items body
MAX_MODEL_LEN = 256
MAX_TS = 4_102_444_800.0   # 2100-01-01: a later timestamp is a unit mistake (milliseconds)
MAX_TTL_S = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class ItemGenerator:
    """Where an LLM item came from: the model, the prompt (optional) and the generator's own
    quality estimate ``prior_score`` in [0, 1] (as for a ``/v1/rank`` candidate)."""

    model: str
    prior_score: float
    prompt_id: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "prompt_id": self.prompt_id, "prior_score": self.prior_score}


@dataclass(frozen=True, slots=True)
class ItemWrite:
    """One validated write: ``fields`` holds exactly the keys the write gave (``ttl_s`` already
    turned into ``expires_at`` when ``created_at`` is known, else kept as ``ttl_s``); values are
    typed (``generator`` an :class:`ItemGenerator` or None)."""

    item_id: str
    source: str
    fields: dict

    def get(self, key, default=None):
        return self.fields.get(key, default)


def _timestamp(errs: Errors, value, path: str) -> float | None:
    """Epoch seconds in [0, 2100-01-01), or an ISO-8601 string with a time zone."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            errs.add(path, f"'{value[:64]}' is not an ISO-8601 time or epoch seconds", "type")
            return None
        if parsed.tzinfo is None:
            errs.add(path, "an ISO-8601 time needs a time zone (e.g. 'Z')", "invalid")
            return None
        value = parsed.timestamp()
    num = as_number(errs, value, path, lo=0, hi=MAX_TS, hi_open=True)
    return None if num is None else float(num)


def _generator(errs: Errors, value, path: str) -> ItemGenerator | None:
    gen = as_dict(errs, value, path)
    if gen is None:
        return None
    before = len(errs.items)
    check_keys(errs, gen, path, GENERATOR_KEYS, required=("model", "prior_score"))
    model = as_str(errs, gen["model"], join_path(path, "model"), max_len=MAX_MODEL_LEN) if "model" in gen else None
    if model is not None and not model.strip():
        errs.add(join_path(path, "model"), "must not be empty", "invalid")
    prior = as_number(errs, gen["prior_score"], join_path(path, "prior_score"), lo=0, hi=1) \
        if "prior_score" in gen else None
    prompt = as_id(errs, gen["prompt_id"], join_path(path, "prompt_id")) if gen.get("prompt_id") is not None else None
    if len(errs.items) != before:
        return None
    return ItemGenerator(model, float(prior), prompt)


def parse_item(data, path: str = "", errs: Errors | None = None) -> ItemWrite | None:
    """Validate one item write (see the module docstring). With ``errs`` given, problems are
    added there and None is returned for a bad item; without, a ValidationError is raised."""
    own = errs is None
    errs = Errors() if own else errs
    before = len(errs.items)
    out = None
    obj = as_dict(errs, data, path)
    if obj is not None:
        p = lambda k: join_path(path, k)  # noqa: E731 - a local path helper
        check_keys(errs, obj, path, ITEM_KEYS, required=("item_id", "source"))
        item_id = as_id(errs, obj["item_id"], p("item_id")) if "item_id" in obj else None
        source = as_str(errs, obj["source"], p("source"), choices=SOURCES) if "source" in obj else None
        fields: dict = {}
        for key in ("creator_id", "topic"):
            if key in obj:
                fields[key] = None if obj[key] is None else as_id(errs, obj[key], p(key))
        if "text" in obj:
            fields["text"] = None if obj["text"] is None else as_str(errs, obj["text"], p("text"), max_len=MAX_TEXT)
        if "generator" in obj:
            fields["generator"] = None if obj["generator"] is None else _generator(errs, obj["generator"],
                                                                                 p("generator"))
            if source == "human" and obj["generator"] is not None:
                errs.add(p("generator"), "only llm items carry a generator (source is 'human')", "invalid")
        if obj.get("created_at") is not None:
            fields["created_at"] = _timestamp(errs, obj["created_at"], p("created_at"))
        if "expires_at" in obj:
            fields["expires_at"] = None if obj["expires_at"] is None else _timestamp(errs, obj["expires_at"],
                                                                                   p("expires_at"))
        if obj.get("ttl_s") is not None:
            if obj.get("expires_at") is not None:
                errs.add(p("ttl_s"), "give expires_at or ttl_s, not both", "conflict")
            else:
                ttl = as_number(errs, obj["ttl_s"], p("ttl_s"), lo=0, hi=MAX_TTL_S, lo_open=True)
                fields.pop("expires_at", None)
                if fields.get("created_at") is not None and ttl is not None:
                    fields["expires_at"] = fields["created_at"] + float(ttl)
                else:
                    fields["ttl_s"] = None if ttl is None else float(ttl)
        if obj.get("blocked") is not None:
            fields["blocked"] = as_bool(errs, obj["blocked"], p("blocked"))
        created, expires = fields.get("created_at"), fields.get("expires_at")
        if created is not None and expires is not None and expires <= created:
            errs.add(p("expires_at"), f"{expires:g} is not after created_at ({created:g})", "range")
        if len(errs.items) == before:
            out = ItemWrite(item_id, source, fields)
    if own:
        errs.raise_if_any()
    return out


def parse_items(data, max_items: int = MAX_ITEMS) -> list[ItemWrite]:
    """Validate a ``POST /v1/items`` body, ``{"items": [...]}``; raises ValidationError with every
    bad field (paths ``items[i].field``)."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any()
    check_keys(errs, obj, "", ("items",), required=("items",))
    raw = as_list(errs, obj["items"], "items", max_len=max_items) if "items" in obj else None
    if raw is not None and not raw:
        errs.add("items", "at least one item is required", "required")
    writes = [parse_item(item, f"items[{i}]", errs) for i, item in enumerate(raw or ())]
    errs.raise_if_any()
    return writes


__all__ = ["ItemGenerator", "ItemWrite", "parse_item", "parse_items", "SOURCES", "ITEM_KEYS", "MAX_ITEMS", "CLEARABLE"]
