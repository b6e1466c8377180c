"""The simulated world's configuration (``conf/sim/*.yaml``), validated like every other input.

Every field carries its range in its metadata; :func:`_build` validates a mapping against it and reports
every problem at once by key path (and file:line from :meth:`WorldConfig.from_yaml`). The ``living``
section turns a static world into a living one (items born and expiring, drifting interests, topic
trends); with ``living.enabled: false`` (the default) the world is exactly the static one of earlier
releases: same seed, same logs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

from strategy.checks import as_bool, as_dict, as_list, as_number, as_str, check_keys
from strategy.errors import Errors, join_path

POLICIES = ("random", "popular")
MAX_ITEMS = 50_000_000

# ---------------------------------------------------------------- configuration


def _num(default, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, doc=""):
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "integer": integer, "doc": doc}
    return field(default=default, metadata=meta)


def _section(cls, doc=""):
    return field(default_factory=cls, metadata={"section": cls, "doc": doc})


@dataclass(frozen=True)
class GeneratorConfig:
    """An LLM generator: its share of LLM items, its quality distribution and how honest its prior is."""

    name: str = "sim-llm"
    share: float = _num(1.0, lo=0, lo_open=True)
    quality_mean: float = _num(0.0, lo=-5, hi=5)
    quality_sd: float = _num(0.5, lo=0, hi=5)
    harm_rate: float = _num(0.03, lo=0, hi=1)
    prior_noise: float = _num(0.15, lo=0, hi=1, doc="sd of the prior_score noise (quality-percentile units)")
    prior_bias: float = _num(0.0, lo=-1, hi=1, doc="added to the prior score (an over-confident generator > 0)")
    items_per_hour: float = _num(0.0, lo=0, hi=1_000_000, doc="living world: new items it publishes per simulated hour")


@dataclass(frozen=True)
class HumanConfig:
    quality_mean: float = _num(0.0, lo=-5, hi=5)
    quality_sd: float = _num(0.4, lo=0, hi=5, doc="item quality around its creator's quality")
    creator_quality_sd: float = _num(0.5, lo=0, hi=5)
    harm_rate: float = _num(0.01, lo=0, hi=1)
    items_per_hour: float = _num(0.0, lo=0, hi=1_000_000, doc="living world: new human items per simulated hour")


@dataclass(frozen=True)
class UsersConfig:
    n_personas: int = _num(8, lo=1, hi=10_000, integer=True, doc="interest clusters users are drawn from")
    persona_sharpness: float = _num(1.2, lo=0, hi=10, doc="sd of a persona's topic affinities")
    affinity_noise: float = _num(0.2, lo=0, hi=10, doc="sd of a user's own deviation from the persona")
    activity_sigma: float = _num(0.8, lo=0, hi=5, doc="lognormal sd of how often a user requests a feed")
    llm_attitude_mean: float = _num(-0.1, lo=-5, hi=5)
    llm_attitude_sd: float = _num(0.3, lo=0, hi=5)
    embedding_dim: int = _num(4, lo=1, hi=64, integer=True, doc="rank of the user x creator taste")


@dataclass(frozen=True)
class BaseRates:
    """Rates for an average user and item at position 1 (like/share/report are given a click)."""

    click: float = _num(0.12, lo=0, hi=1, lo_open=True, hi_open=True)
    like: float = _num(0.15, lo=0, hi=1, lo_open=True, hi_open=True)
    share: float = _num(0.08, lo=0, hi=1, lo_open=True, hi_open=True)
    report: float = _num(0.006, lo=0, hi=1, lo_open=True, hi_open=True)
    share_without_like: float = _num(0.2, lo=0, hi=1, doc="P(share|click, no like) / P(share|like)")
    report_without_click: float = _num(0.1, lo=0, hi=1, doc="P(report|no click) / P(report|click)")


@dataclass(frozen=True)
class Effects:
    """Logit-scale weights of the latent factors."""

    affinity: float = _num(1.0, lo=-10, hi=10)
    creator_affinity: float = _num(0.3, lo=-10, hi=10)
    user_bias: float = _num(0.5, lo=-10, hi=10)
    quality: float = _num(0.8, lo=-10, hi=10)
    quality_like: float = _num(1.0, lo=-10, hi=10)
    quality_share: float = _num(0.8, lo=-10, hi=10)
    quality_report: float = _num(0.6, lo=-10, hi=10)
    llm_attitude: float = _num(1.0, lo=-10, hi=10)
    harm_click: float = _num(0.3, lo=-10, hi=10, doc="harmful items are a bit click-baity")
    harm_report: float = _num(3.0, lo=-10, hi=10)
    harm_quality: float = _num(1.0, lo=0, hi=10, doc="how much more often low-quality items are harmful")


@dataclass(frozen=True)
class PositionBias:
    eta: float = _num(0.5, lo=0, hi=5, doc="examination probability at position k is k ** -eta")


@dataclass(frozen=True)
class WatchConfig:
    duration_median: float = _num(25.0, lo=0, hi=86_400, lo_open=True, doc="seconds")
    duration_sigma: float = _num(0.7, lo=0, hi=5)
    completion: float = _num(0.35, lo=0, hi=1, lo_open=True, hi_open=True, doc="mean share watched after a click")
    like_boost: float = _num(1.2, lo=-10, hi=10)
    quality: float = _num(0.5, lo=-10, hi=10)
    affinity: float = _num(0.3, lo=-10, hi=10)
    concentration: float = _num(4.0, lo=0, hi=1000, lo_open=True, doc="Beta concentration of the watched share")


@dataclass(frozen=True)
class LivingConfig:
    """A world that changes while it is simulated (``enabled: true``): each generator publishes
    ``generators[].items_per_hour`` new LLM items and human creators ``human.items_per_hour``; every item
    lives a lognormal lifetime and then leaves the catalogue (births of about ``n_items`` per mean
    lifetime keep the catalogue's size steady); young items are more interesting (a click
    logit boost ``freshness_weight * 2 ** (-age / freshness_half_life_hours)``); users' interests drift
    (a ``drift_share`` of them moves from their persona to a second one and back, a full move taking
    ``drift_days``); each topic's popularity rises and falls (a sine of ``trend_amplitude`` on the
    affinity logit with a period drawn in [``trend_period_min_days``, ``trend_period_max_days``])."""

    enabled: bool = field(default=False, metadata={"bool": True})
    initial_age_hours: float = _num(72.0, lo=0, hi=87_600, doc="the initial catalogue's ages: uniform in [0, this]; "
                                    "each initial item is alive at start_ts with a uniform share of a lifetime left")
    lifetime_hours: float = _num(72.0, lo=0, hi=87_600, lo_open=True, doc="median lifetime of an item")
    lifetime_sigma: float = _num(0.5, lo=0, hi=5, doc="lognormal sd of lifetimes")
    max_lifetime_hours: float = _num(720.0, lo=0, hi=87_600, lo_open=True, doc="lifetimes are capped here")
    freshness_weight: float = _num(0.8, lo=-10, hi=10, doc="click-logit boost of a brand-new item")
    freshness_half_life_hours: float = _num(12.0, lo=0, hi=87_600, lo_open=True)
    drift_share: float = _num(0.5, lo=0, hi=1, doc="share of users whose interests drift")
    drift_days: float = _num(2.0, lo=0, hi=36_500, lo_open=True, doc="days for a full move between personas")
    trend_amplitude: float = _num(0.5, lo=0, hi=10, doc="logit amplitude of topic trends")
    trend_period_min_days: float = _num(1.0, lo=0, hi=36_500, lo_open=True)
    trend_period_max_days: float = _num(4.0, lo=0, hi=36_500, lo_open=True)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world and a simulation run. Load with :meth:`from_yaml`."""

    seed: int = _num(0, lo=0, hi=2**63 - 1, integer=True)
    n_users: int = _num(1000, lo=1, hi=50_000_000, integer=True)
    n_items: int = _num(2000, lo=1, hi=MAX_ITEMS, integer=True)
    n_creators: int = _num(100, lo=1, hi=10_000_000, integer=True)
    n_topics: int = _num(16, lo=1, hi=10_000, integer=True)
    llm_share: float = _num(0.3, lo=0, hi=1, doc="share of items (and creators) that are LLM-generated")
    impressions: int = _num(200_000, lo=1, hi=1_000_000_000, integer=True)
    slate_size: int = _num(10, lo=1, hi=1000, integer=True)
    candidates_per_request: int = _num(50, lo=1, hi=100_000, integer=True)
    policy: str = field(default="random", metadata={"choices": POLICIES})
    personalization: float = _num(0.7, lo=0, hi=1, doc="share of candidates retrieved from the user's topics")
    history_length: int = _num(10, lo=0, hi=1000, integer=True, doc="length of user_recent_items")
    text_tokens: int = _num(14, lo=4, hi=500, integer=True, doc="mean tokens of an item's text")
    start_ts: float = _num(1_767_225_600.0, lo=0, doc="epoch seconds of the first request")
    duration_days: float = _num(14.0, lo=0, hi=36_500, lo_open=True)
    generators: tuple = field(default=(GeneratorConfig("sim-gpt-large", 0.6, 0.3, 0.5, 0.02, 0.12),
                                       GeneratorConfig("sim-llama-small", 0.4, -0.6, 0.8, 0.08, 0.25)),
                              metadata={"generators": True})
    human: HumanConfig = _section(HumanConfig)
    users: UsersConfig = _section(UsersConfig)
    base_rates: BaseRates = _section(BaseRates)
    effects: Effects = _section(Effects)
    position_bias: PositionBias = _section(PositionBias)
    watch: WatchConfig = _section(WatchConfig)
    living: LivingConfig = _section(LivingConfig)

    @classmethod
    def from_dict(cls, data, source: str | None = None, lines: dict | None = None) -> "WorldConfig":
        """Validate a mapping; raises :class:`ValidationError` with every problem (key path, allowed keys)."""
        errs = Errors()
        obj = as_dict(errs, data if data is not None else {}, "")
        if obj is None:
            errs.raise_if_any(source, lines)
        config = _build(cls, errs, obj, "")
        if config is not None and not errs:
            if config.candidates_per_request < config.slate_size:
                errs.add("candidates_per_request",
                         f"must be >= slate_size ({config.slate_size}), got {config.candidates_per_request}", "range")
            if config.slate_size > config.n_items:
                errs.add("slate_size", f"must be <= n_items ({config.n_items}), got {config.slate_size}", "range")
            if config.llm_share > 0 and not config.generators:
                errs.add("generators", "at least one generator is needed when llm_share > 0", "required")
            lv = config.living
            if lv.trend_period_min_days > lv.trend_period_max_days:
                errs.add("living.trend_period_min_days", f"must be <= living.trend_period_max_days "
                         f"({lv.trend_period_max_days:g}), got {lv.trend_period_min_days:g}", "range")
            if lv.enabled:
                born = config.duration_days * 24 * (config.human.items_per_hour
                                                    + sum(g.items_per_hour for g in config.generators))
                if config.n_items + born > MAX_ITEMS:
                    errs.add("living", f"the initial {config.n_items} items plus {born:,.0f} born over "
                             f"duration_days exceed {MAX_ITEMS:,} items", "range")
                if born and any(g.items_per_hour for g in config.generators) and config.llm_share == 0:
                    errs.add("generators", "generators publish items_per_hour but llm_share is 0 (no LLM "
                             "creators to publish them)", "invalid")
        errs.raise_if_any(source, lines)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "WorldConfig":
        """Load ``conf/sim/*.yaml``; errors carry file:line. ``overrides`` replace top-level keys."""
        from strategy.config import read_yaml

        data, lines = read_yaml(path)
        if isinstance(data, dict) and overrides:
            data = {**data, **overrides}
        return cls.from_dict(data, source=str(path), lines=lines)

    def replace(self, **changes) -> "WorldConfig":
        """A copy with top-level fields replaced (re-validated)."""
        return WorldConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["generators"] = [dataclasses.asdict(g) for g in self.generators]
        return out


def _build(cls, errs: Errors, obj: dict, path: str):
    """Generic, metadata-driven validation of one config dataclass; returns None on any error."""
    before = len(errs.items)
    names = [f.name for f in fields(cls)]
    check_keys(errs, obj, path, names, required=("name",) if cls is GeneratorConfig else ())
    kwargs = {}
    for f in fields(cls):
        if f.name not in obj:
            continue
        value, p, meta = obj[f.name], join_path(path, f.name), f.metadata
        if "section" in meta:
            sub = as_dict(errs, value if value is not None else {}, p)
            if sub is not None:
                kwargs[f.name] = _build(meta["section"], errs, sub, p)
        elif meta.get("generators"):
            kwargs[f.name] = _generators(errs, value, p)
        elif meta.get("bool"):
            kwargs[f.name] = as_bool(errs, value, p)
        elif "choices" in meta:
            kwargs[f.name] = as_str(errs, value, p, choices=meta["choices"])
        elif f.name == "name":
            kwargs[f.name] = as_str(errs, value, p, max_len=256)
            if kwargs[f.name] is not None and not kwargs[f.name].strip():
                errs.add(p, "must not be empty", "invalid")
        else:
            num = as_number(errs, value, p, lo=meta["lo"], hi=meta["hi"], lo_open=meta["lo_open"],
                            hi_open=meta["hi_open"], integer=meta["integer"])
            kwargs[f.name] = num if meta["integer"] or num is None else float(num)
    if len(errs.items) != before:
        return None
    return cls(**kwargs)


def _generators(errs: Errors, value, path: str) -> tuple:
    items = as_list(errs, value, path, max_len=1000)
    out, seen = [], set()
    for i, item in enumerate(items or ()):
        p = join_path(path, i)
        obj = as_dict(errs, item, p)
        if obj is None:
            continue
        gen = _build(GeneratorConfig, errs, obj, p)
        if gen is not None:
            if gen.name in seen:
                errs.add(join_path(p, "name"), f"duplicate generator name '{gen.name}'", "duplicate")
            seen.add(gen.name)
            out.append(gen)
    return tuple(out)




__all__ = ["WorldConfig", "GeneratorConfig", "HumanConfig", "UsersConfig", "BaseRates", "Effects", "PositionBias",
           "WatchConfig", "LivingConfig", "POLICIES", "MAX_ITEMS"]
