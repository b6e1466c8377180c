"""The ``retrieval:`` section of a strategy: which candidate sources ``POST /v1/feed`` asks, for how many.

::

    retrieval:
      max_candidates: 400            # the pool the ranker scores (default: the sum of the counts)
      sources:                       # asked in this order; the pool is filled round robin
        ann:      {count: 250}                             # the user's vector in the two-tower index
        similar:  {count: 30, seeds: 5}                    # near the items the user engaged with last
        co_engaged: {count: 30, seeds: 5}                  # engaged together with those (near-line store)
        fresh:    {count: 80, max_age_h: 24, llm_share: 0.7, max_share: 0.3}
        trending: {count: 40, counter: click}              # decayed near-line counters
        explore:  {count: 20}                              # uniform over the live corpus

Every source has ``count`` (how many items it retrieves, 0 turns it off) and ``max_share`` (at most this
share of the pool is filled with items *it* brought in; an item another source found as well is
credited to both). The pool is filled one item per source in turn, in the order written, so when
``max_candidates`` is below the sum of the counts each source keeps its share. Source options:
``similar.seeds`` and ``co_engaged.seeds`` (how many recent items seed it), ``fresh.max_age_h`` (younger items only) and
``fresh.llm_share`` (the share of its count kept for LLM-generated items first), ``trending.counter``
(the near-line counter it ranks by).

A strategy without the section retrieves with :data:`DEFAULT_RETRIEVAL` (the section
:data:`DEFAULT_RETRIEVAL_SECTION`). Experiments override it by dotted path like the rest of a strategy
(``retrieval.sources.fresh.count: 150``); on a strategy without the section, an override starts from the
default section, so it changes one source and keeps the others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .checks import as_dict, as_number, as_str, check_keys
from .errors import Errors, join_path

SOURCE_NAMES = ("ann", "similar", "co_engaged", "fresh", "trending", "explore")
COMMON_KEYS = ("count", "max_share")
OPTION_KEYS = {"ann": (), "similar": ("seeds",), "co_engaged": ("seeds",), "fresh": ("max_age_h", "llm_share"),
               "trending": ("counter",), "explore": ()}
MAX_POOL = 2000  # the most candidates a request may rank (strategy.schema.DEFAULT_MAX_CANDIDATES)
COUNTER_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class RetrievalSource:
    """One candidate source of a feed request and its options (only its own are read)."""

    name: str
    count: int
    max_share: float = 1.0
    seeds: int = 5            # similar, co_engaged
    max_age_h: float = 24.0   # fresh
    llm_share: float = 0.5    # fresh
    counter: str = "click"    # trending


@dataclass(frozen=True)
class RetrievalPlan:
    """The sources in the order they fill the pool, and the pool's size."""

    sources: tuple[RetrievalSource, ...]
    max_candidates: int

    def source(self, name: str) -> RetrievalSource | None:
        return next((s for s in self.sources if s.name == name), None)


def retrieval_from_dict(errs: Errors, value, path: str = "retrieval") -> RetrievalPlan | None:
    """Validate a ``retrieval:`` section; problems go to ``errs`` by key path (None when any)."""
    obj = as_dict(errs, value, path)
    if obj is None:
        return None
    before = len(errs.items)
    check_keys(errs, obj, path, ("max_candidates", "sources"), required=("sources",))
    sources: list[RetrievalSource] = []
    raw = as_dict(errs, obj["sources"], join_path(path, "sources")) if "sources" in obj else None
    if raw is not None:
        check_keys(errs, raw, join_path(path, "sources"), SOURCE_NAMES)
        if not raw:
            errs.add(join_path(path, "sources"), f"name at least one source ({', '.join(SOURCE_NAMES)})", "required")
        for name, spec in raw.items():
            if name in OPTION_KEYS:
                src = _source(errs, name, spec, join_path(join_path(path, "sources"), name))
                if src is not None:
                    sources.append(src)
    total = sum(s.count for s in sources)
    pool = total
    if obj.get("max_candidates") is not None:
        pool = as_number(errs, obj["max_candidates"], join_path(path, "max_candidates"), lo=1, hi=MAX_POOL,
                         integer=True)
    elif total > MAX_POOL:
        errs.add(join_path(path, "sources"), f"the counts add up to {total}, more than the {MAX_POOL} candidates "
                 "a request may rank: set max_candidates", "range")
    if raw and total == 0 and len(errs.items) == before:
        errs.add(join_path(path, "sources"), "every count is 0: no source would retrieve anything", "range")
    if len(errs.items) != before:
        return None
    return RetrievalPlan(tuple(sources), int(pool))


def _source(errs: Errors, name: str, spec, path: str) -> RetrievalSource | None:
    spec = as_dict(errs, spec, path)
    if spec is None:
        return None
    before = len(errs.items)
    check_keys(errs, spec, path, COMMON_KEYS + OPTION_KEYS[name], required=("count",))
    p = lambda key: join_path(path, key)  # noqa: E731 - a local path helper
    fields = {}
    if "count" in spec:
        fields["count"] = as_number(errs, spec["count"], p("count"), lo=0, hi=MAX_POOL, integer=True)
    if "max_share" in spec:
        fields["max_share"] = as_number(errs, spec["max_share"], p("max_share"), lo=0, hi=1, lo_open=True)
    if "seeds" in spec:
        fields["seeds"] = as_number(errs, spec["seeds"], p("seeds"), lo=1, hi=50, integer=True)
    if "max_age_h" in spec:
        fields["max_age_h"] = as_number(errs, spec["max_age_h"], p("max_age_h"), lo=0, hi=24 * 365, lo_open=True)
    if "llm_share" in spec:
        fields["llm_share"] = as_number(errs, spec["llm_share"], p("llm_share"), lo=0, hi=1)
    if "counter" in spec:
        fields["counter"] = as_str(errs, spec["counter"], p("counter"), pattern=COUNTER_RE)
    if len(errs.items) != before:
        return None
    return RetrievalSource(name, **{k: (float(v) if isinstance(v, float) else v) for k, v in fields.items()})


DEFAULT_RETRIEVAL_SECTION = {"max_candidates": 400, "sources": {
    "ann": {"count": 250}, "similar": {"count": 30}, "co_engaged": {"count": 30},
    "fresh": {"count": 80, "max_share": 0.3, "llm_share": 0.7}, "trending": {"count": 40}, "explore": {"count": 20}}}
DEFAULT_RETRIEVAL = retrieval_from_dict(Errors(), DEFAULT_RETRIEVAL_SECTION)


__all__ = ["DEFAULT_RETRIEVAL", "RetrievalPlan", "RetrievalSource", "SOURCE_NAMES", "DEFAULT_RETRIEVAL_SECTION", "retrieval_from_dict"]
