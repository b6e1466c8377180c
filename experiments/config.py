"""Experiments YAML -> a validated, immutable :class:`ExperimentsConfig`.

File shape (``conf/experiments/*.yaml``)::

    strategy: conf/objectives/feed.yaml   # or a list of files: overrides must be valid for each
    metrics:                              # the metric declarations of experiments.analysis
      clicks_per_user: {type: mean, event: click}
      ctr: {type: ratio, numerator: {event: click}, denominator: {event: impression}}
    holdout: {salt: hold-2026, share: 0.05}   # optional: this share of all users is in no experiment
    layers:
      - name: ranking_weights
        salt: rw-2026-11                  # the layer's hash salt; unique per layer -> independent layers
        experiments:
          - name: like_up
            range: [0.0, 0.5]             # half-open share [lo, hi) of the layer's hash space
            status: running               # running (default) | stopped: stopped ones assign nobody
            control: control              # optional: 'control' if such a variant exists, else the first
            variants:                     # weights sum to 1
              control:   {weight: 0.5}
              treatment: {weight: 0.5, overrides: {objectives.like.weight: 8.0}, model: feed_mmoe@3}
            allowlist: {qa-user-1: treatment}   # QA: forced variants (win over holdout and range)
            metrics: [ctr, clicks_per_user]     # goal metrics
            guardrails: [reports_per_user, {metric: watch_time, harmful: decrease}]

Rules checked (every problem of a file at once, each with ``file:line: key.path``, typos get a
"did you mean"): unknown keys; names; unique layer names, salts and experiment names; ranges
inside [0, 1] and disjoint within a layer; variant weights in [0, 1] summing to 1; overrides
valid for every strategy named (applied with :meth:`strategy.config.Strategy.with_overrides`, which
re-validates the whole strategy); two layers never override the same strategy key or both pick
a model (a user is in one experiment per layer, so their overrides are merged); ``model`` is
``name@version``, or a bare ``name`` (its current version: a scorer with ``model.follow_current``
serves each new one, e.g. a streaming trainer's); metrics are valid and every experiment's metrics are declared.

Relative ``strategy`` paths are looked up from the current directory, then from the file's
folder and each folder above it (so ``conf/objectives/feed.yaml`` works from the repository root
and from anywhere inside the repository).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from strategy.checks import NAME_RE, as_dict, as_list, as_number, as_str, check_keys, type_name
from strategy.config import Strategy, load_strategy, read_yaml
from strategy.errors import Errors, FieldError, ValidationError, did_you_mean, join_path

__all__ = [
    "Variant", "Experiment", "Layer", "Holdout", "ExperimentsConfig",
    "load_experiments", "experiments_from_dict", "validate_experiments_file", "is_experiments_file",
]

TOP_KEYS = ("strategy", "metrics", "holdout", "layers")
LAYER_KEYS = ("name", "salt", "experiments")
EXPERIMENT_KEYS = ("name", "range", "status", "control", "variants", "allowlist", "metrics", "guardrails",
                   "description")
VARIANT_KEYS = ("weight", "overrides", "model", "description")
HOLDOUT_KEYS = ("salt", "share")
STATUSES = ("running", "stopped")
MODEL_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}(@[A-Za-z0-9_.\-]{1,128})?$")
SALT_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
WEIGHT_TOL = 1e-6


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    model: str | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    layer: str
    range: tuple[float, float]
    variants: tuple[Variant, ...]
    control: str
    metrics: tuple[str, ...]
    guardrails: tuple = ()          # metric names or {metric, harmful} mappings, as declared
    allowlist: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    status: str = "running"
    description: str = ""

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.variants}

    def to_analysis(self) -> dict:
        """The declaration :func:`experiments.analysis.analyze` takes."""
        return {"name": self.name, "control": self.control, "metrics": list(self.metrics),
                "guardrails": [dict(g) if isinstance(g, Mapping) else g for g in self.guardrails],
                "variants": [v.name for v in self.variants], "weights": [v.weight for v in self.variants]}

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "range": list(self.range), "status": self.status,
                "control": self.control, "description": self.description,
                "variants": {v.name: {"weight": v.weight, "overrides": dict(v.overrides), "model": v.model}
                             for v in self.variants},
                "metrics": list(self.metrics),
                "guardrails": [dict(g) if isinstance(g, Mapping) else g for g in self.guardrails],
                "allowlist_size": len(self.allowlist)}


@dataclass(frozen=True)
class Layer:
    name: str
    salt: str
    experiments: tuple[Experiment, ...]


@dataclass(frozen=True)
class Holdout:
    """``share`` of all users (hashed with ``salt``) get the base strategy and no experiment."""

    salt: str
    share: float


@dataclass(frozen=True)
class ExperimentsConfig:
    layers: tuple[Layer, ...]
    metrics: Mapping[str, Any]
    holdout: Holdout | None = None
    strategies: tuple[str, ...] = ()
    source: str = "<dict>"

    @property
    def experiments(self) -> tuple[Experiment, ...]:
        return tuple(e for layer in self.layers for e in layer.experiments)

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        names = [e.name for e in self.experiments]
        raise KeyError(f"unknown experiment {name!r}{did_you_mean(name, names)}")

    def analysis_metrics(self) -> dict:
        return {k: dict(v) for k, v in self.metrics.items()}

    def analysis_experiments(self) -> list[dict]:
        return [e.to_analysis() for e in self.experiments]

    def summary(self) -> str:
        exps = self.experiments
        parts = [f"{len(self.layers)} layers, {len(exps)} experiments"]
        detail = ", ".join(f"{e.name} {len(e.variants)} variants {e.range[1] - e.range[0]:.0%} of {e.layer}"
                           for e in exps)
        extra = []
        if self.holdout is not None:
            extra.append(f"holdout {self.holdout.share:g}")
        extra.append(f"{len(self.metrics)} metrics")
        return parts[0] + (f" ({detail})" if detail else "") + ", " + ", ".join(extra)


# ---------------------------------------------------------------- loading


def is_experiments_file(data) -> bool:
    return isinstance(data, dict) and "layers" in data


def load_experiments(path: str | Path, check_strategies: bool = True) -> ExperimentsConfig:
    """Load and validate an experiments YAML file (all errors at once, with file:line)."""
    data, lines = read_yaml(path)
    return experiments_from_dict(data, source=str(path), lines=lines, base_dir=Path(path).resolve().parent,
                                 check_strategies=check_strategies)


def validate_experiments_file(path: str | Path) -> str:
    """The ``stratarank validate`` line body for a valid file: ``experiments: N layers, M experiments (...)``.

    Raises :class:`ValidationError` with every problem otherwise.
    """
    return "experiments: " + load_experiments(path).summary()


def _resolve(name: str, base_dir: Path | None) -> Path | None:
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    if p.is_file():
        return p
    d = base_dir
    while d is not None:
        if (d / p).is_file():
            return d / p
        d = d.parent if d.parent != d else None
    return None


def load_referenced(errs: Errors, obj: dict, key: str, base_dir, loader):
    """``(loader(path), path)`` for the file a config names under ``key`` (found by :func:`_resolve`);
    ``(None, None)`` with the problem in ``errs`` when it is absent, not a string, missing or invalid."""
    name = obj.get(key)
    if not isinstance(name, str):
        if key in obj:
            as_str(errs, name, key)
        return None, None
    found = _resolve(name, Path(base_dir) if base_dir else None)
    if found is None:
        errs.add(key, f"{key} file not found: {name}", "not_found")
        return None, None
    try:
        return loader(found), str(found)
    except ValidationError as exc:
        errs.add(key, f"{key} file {name} is invalid: {exc.errors[0]}", "invalid")
        return None, str(found)


def experiments_from_dict(data, source: str = "<dict>", lines: dict[str, int] | None = None,
                          base_dir: str | Path | None = None, strategies: list[Strategy] | None = None,
                          check_strategies: bool = True) -> ExperimentsConfig:
    """Validate an experiments mapping; raises :class:`ValidationError` with every problem.

    ``strategies`` (already loaded) replaces the file's ``strategy:`` key when given.
    """
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", TOP_KEYS, required=("metrics", "layers"))

    # -- strategies the overrides are checked against
    loaded: list[tuple[str, Strategy]] = [(s.name, s) for s in strategies or ()]
    paths: list[str] = []
    if strategies is None and "strategy" in obj and check_strategies:
        value = obj["strategy"]
        items = [value] if isinstance(value, str) else value
        if as_list(errs, items, "strategy", max_len=50) is not None:
            for i, item in enumerate(items):
                path = "strategy" if isinstance(value, str) else join_path("strategy", i)
                if as_str(errs, item, path) is None:
                    continue
                found = _resolve(item, Path(base_dir) if base_dir else None)
                if found is None:
                    errs.add(path, f"strategy file not found: {item}", "not_found")
                    continue
                paths.append(item)
                try:
                    loaded.append((item, load_strategy(found)))
                except ValidationError as exc:
                    errs.add(path, f"strategy file {item} is invalid: {exc.errors[0]}"
                             + (f" (+{len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""), "invalid")

    # -- metrics
    metrics: dict = {}
    if "metrics" in obj:
        m = as_dict(errs, obj["metrics"], "metrics")
        if m is not None:
            from .analysis import normalize_metrics  # local: analysis imports pandas
            for name in m:
                if not isinstance(name, str) or not NAME_RE.match(name):
                    errs.add(join_path("metrics", str(name)), f"metric names must match {NAME_RE.pattern}", "pattern")
            try:
                normalize_metrics(m)
            except ValidationError as exc:
                for e in exc.errors:
                    errs.add(e.path, e.message, e.code)
            metrics = m

    holdout = _holdout(errs, obj["holdout"]) if obj.get("holdout") is not None else None

    layers: list[Layer] = []
    if "layers" in obj:
        items = as_list(errs, obj["layers"], "layers", max_len=100)
        if items is not None and not items:
            errs.add("layers", "at least one layer is required", "required")
        seen_layers: dict[str, str] = {}
        seen_salts: dict[str, str] = {}
        seen_exps: dict[str, str] = {}
        for i, spec in enumerate(items or ()):
            lpath = f"layers[{i}]"
            layer = _layer(errs, spec, lpath, metrics, loaded, seen_exps)
            lname = spec.get("name") if isinstance(spec, dict) else None
            salt = spec.get("salt") if isinstance(spec, dict) else None
            if isinstance(lname, str):
                if lname in seen_layers:
                    errs.add(join_path(lpath, "name"), f"duplicate layer name '{lname}' (also {seen_layers[lname]})",
                             "duplicate")
                seen_layers.setdefault(lname, lpath)
            if isinstance(salt, str):
                if salt in seen_salts:
                    errs.add(join_path(lpath, "salt"), f"salt '{salt}' is also used by {seen_salts[salt]}: "
                             "layers sharing a salt are not independent", "duplicate")
                seen_salts.setdefault(salt, lpath)
                if holdout is not None and salt == holdout.salt:
                    errs.add(join_path(lpath, "salt"), "the holdout needs its own salt", "duplicate")
            if layer is not None:
                layers.append(layer)
        _check_layer_conflicts(errs, obj.get("layers"), layers)
        if check_strategies and strategies is None and "strategy" not in obj and any(
                v.overrides for layer in layers for e in layer.experiments for v in e.variants):
            errs.add("strategy", "variants override strategy keys: name the objectives file(s) they apply to, "
                     "e.g. strategy: conf/objectives/feed.yaml", "required")

    errs.raise_if_any(source, lines)
    return ExperimentsConfig(tuple(layers), MappingProxyType(dict(metrics)), holdout, tuple(paths), source)


def _holdout(errs: Errors, value) -> Holdout | None:
    h = as_dict(errs, value, "holdout")
    if h is None:
        return None
    before = len(errs.items)
    check_keys(errs, h, "holdout", HOLDOUT_KEYS, required=HOLDOUT_KEYS)
    salt = as_str(errs, h["salt"], "holdout.salt", pattern=SALT_RE) if "salt" in h else None
    share = as_number(errs, h["share"], "holdout.share", lo=0, hi=1, hi_open=True) if "share" in h else None
    return Holdout(salt, float(share)) if len(errs.items) == before else None


def _layer(errs: Errors, spec, path: str, metrics: dict, strategies, seen_exps: dict) -> Layer | None:
    spec = as_dict(errs, spec, path)
    if spec is None:
        return None
    before = len(errs.items)
    check_keys(errs, spec, path, LAYER_KEYS, required=LAYER_KEYS)
    name = as_str(errs, spec["name"], join_path(path, "name"), pattern=NAME_RE) if "name" in spec else None
    salt = as_str(errs, spec["salt"], join_path(path, "salt"), pattern=SALT_RE) if "salt" in spec else None
    experiments: list[Experiment] = []
    epath = join_path(path, "experiments")
    items = as_list(errs, spec["experiments"], epath, max_len=1000) if "experiments" in spec else None
    ranges = []
    for j, e in enumerate(items or ()):
        exp, rng = _experiment(errs, e, f"{epath}[{j}]", name or "?", metrics, strategies)
        ename = e.get("name") if isinstance(e, dict) else None
        if isinstance(ename, str):
            if ename in seen_exps:
                errs.add(join_path(f"{epath}[{j}]", "name"),
                         f"duplicate experiment name '{ename}' (also {seen_exps[ename]}); names are unique per file",
                         "duplicate")
            seen_exps.setdefault(ename, f"{epath}[{j}]")
        if rng is not None:
            ranges.append((rng, j, ename))
        if exp is not None:
            experiments.append((j, exp))
    # disjoint ranges within the layer (half-open [lo, hi): touching ends are fine)
    ranges.sort()
    for (ra, ja, na), (rb, jb, nb) in zip(ranges, ranges[1:]):
        if rb[0] < ra[1] - 1e-12:
            errs.add(join_path(f"{epath}[{jb}]", "range"),
                     f"range [{rb[0]:g}, {rb[1]:g}] overlaps experiment '{na}' [{ra[0]:g}, {ra[1]:g}] "
                     f"of layer '{name}'", "overlap")
    if len(errs.items) != before:
        return None
    return Layer(name, salt, tuple(e for _, e in experiments))


def _experiment(errs: Errors, spec, path: str, layer: str, metrics: dict, strategies) -> Experiment | None:
    spec = as_dict(errs, spec, path)
    if spec is None:
        return None, None
    before = len(errs.items)
    check_keys(errs, spec, path, EXPERIMENT_KEYS, required=("name", "range", "variants", "metrics"))
    p = lambda k: join_path(path, k)  # noqa: E731
    name = as_str(errs, spec["name"], p("name"), pattern=NAME_RE) if "name" in spec else None
    status = as_str(errs, spec.get("status", "running"), p("status"), choices=STATUSES)
    description = as_str(errs, spec.get("description", ""), p("description"), max_len=2000) or ""

    rng = None
    if "range" in spec:
        r = as_list(errs, spec["range"], p("range"))
        if r is not None:
            if len(r) != 2:
                errs.add(p("range"), f"expected [lo, hi], got {len(r)} values", "invalid")
            else:
                lo = as_number(errs, r[0], f"{p('range')}[0]", lo=0, hi=1)
                hi = as_number(errs, r[1], f"{p('range')}[1]", lo=0, hi=1)
                if lo is not None and hi is not None:
                    if hi <= lo:
                        errs.add(p("range"), f"empty range: hi {hi:g} must be above lo {lo:g}", "range")
                    else:
                        rng = (float(lo), float(hi))

    variants: list[Variant] = []
    if "variants" in spec:
        vs = as_dict(errs, spec["variants"], p("variants"))
        if vs is not None:
            if len(vs) < 2:
                errs.add(p("variants"), "an experiment needs at least 2 variants (a control and a treatment)", "invalid")
            weights = []
            for vname, vspec in vs.items():
                v, w = _variant(errs, vname, vspec, join_path(p("variants"), str(vname)), strategies)
                if v is not None:
                    variants.append(v)
                weights.append((vname, w))
            if weights and all(w is not None for _, w in weights):
                total = sum(w for _, w in weights)
                if abs(total - 1.0) > WEIGHT_TOL:
                    errs.add(p("variants"), f"variant weights sum to {total:g}, not 1 ("
                             + ", ".join(f"{n} {w:g}" for n, w in weights) + ")", "weights")
    vnames = [str(k) for k in spec["variants"]] if isinstance(spec.get("variants"), dict) else []

    control = None
    if "control" in spec:
        control = as_str(errs, spec["control"], p("control"))
        if control is not None and vnames and control not in vnames:
            errs.add(p("control"), f"control '{control}' is not a variant{did_you_mean(control, vnames)} "
                     f"(variants: {', '.join(vnames)})", "unknown_variant")
    elif vnames:
        control = "control" if "control" in vnames else vnames[0]

    names = list(metrics)
    goal = []
    if "metrics" in spec:
        items = as_list(errs, spec["metrics"], p("metrics"), max_len=100)
        if items is not None and not items:
            errs.add(p("metrics"), "list at least one goal metric", "required")
        for k, m in enumerate(items or ()):
            mp = f"{p('metrics')}[{k}]"
            if as_str(errs, m, mp) is not None:
                if metrics and m not in metrics:
                    errs.add(mp, f"unknown metric '{m}'{did_you_mean(m, names)} (metrics: {', '.join(names)})",
                             "unknown_metric")
                goal.append(m)
    guards = []
    if spec.get("guardrails") is not None:
        items = as_list(errs, spec["guardrails"], p("guardrails"), max_len=100)
        for k, g in enumerate(items or ()):
            gp = f"{p('guardrails')}[{k}]"
            if isinstance(g, dict):
                check_keys(errs, g, gp, ("metric", "harmful"), required=("metric",))
                m = g.get("metric")
                mp = join_path(gp, "metric")
                if "harmful" in g:
                    as_str(errs, g["harmful"], join_path(gp, "harmful"), choices=("increase", "decrease"))
                entry = MappingProxyType(dict(g))
            else:
                m, mp, entry = g, gp, g
            if as_str(errs, m, mp) is None:
                continue
            if metrics and m not in metrics:
                errs.add(mp, f"unknown metric '{m}'{did_you_mean(m, names)} (metrics: {', '.join(names)})",
                         "unknown_metric")
            guards.append(entry)

    allow: dict[str, str] = {}
    if spec.get("allowlist") is not None:
        a = as_dict(errs, spec["allowlist"], p("allowlist"))
        for uid, vname in (a or {}).items():
            ap = join_path(p("allowlist"), str(uid))
            if isinstance(uid, bool) or not isinstance(uid, (str, int)):
                errs.add(ap, f"user ids are strings or integers, got {type_name(uid)}", "type")
                continue
            if as_str(errs, vname, ap) is None:
                continue
            if vnames and vname not in vnames:
                errs.add(ap, f"unknown variant '{vname}'{did_you_mean(vname, vnames)} (variants: {', '.join(vnames)})",
                         "unknown_variant")
                continue
            allow[str(uid)] = vname

    if len(errs.items) != before:
        return None, rng
    return Experiment(name, layer, rng, tuple(variants), control, tuple(goal), tuple(guards),
                      MappingProxyType(allow), status, description), rng


def _variant(errs: Errors, name, spec, path: str, strategies) -> tuple[Variant | None, float | None]:
    """The variant (None when invalid) and its weight (None when the weight itself is invalid)."""
    before = len(errs.items)
    if not isinstance(name, str) or not NAME_RE.match(name):
        errs.add(path, f"variant names must match {NAME_RE.pattern}", "pattern")
    spec = as_dict(errs, {} if spec is None else spec, path)
    if spec is None:
        return None, None
    check_keys(errs, spec, path, VARIANT_KEYS, required=("weight",))
    weight = as_number(errs, spec["weight"], join_path(path, "weight"), lo=0, hi=1) if "weight" in spec else None
    model = None
    if spec.get("model") is not None:
        model = as_str(errs, spec["model"], join_path(path, "model"), pattern=MODEL_RE)
        if model is None and isinstance(spec["model"], str):
            errs.items[-1] = FieldError(join_path(path, "model"),
                                        f"'{spec['model']}' is not a model reference like name or name@version", "pattern")
    overrides: dict = {}
    if spec.get("overrides") is not None:
        opath = join_path(path, "overrides")
        o = as_dict(errs, spec["overrides"], opath)
        if o is not None:
            overrides = {str(k): v for k, v in o.items()}
            for label, strat in strategies:
                _check_overrides(errs, strat, overrides, opath, label if len(strategies) > 1 else None)
    if len(errs.items) != before:
        return None, weight
    return Variant(name, float(weight), MappingProxyType(overrides), model), weight


def _check_overrides(errs: Errors, strat: Strategy, overrides: dict, opath: str, label: str | None) -> None:
    """Each override alone (so one bad key does not hide another), then all of them together."""
    found: list[FieldError] = []
    for key, value in overrides.items():
        try:
            strat.with_overrides({key: value})
        except ValidationError as exc:
            found.extend(exc.errors)
    if not found:
        try:
            strat.with_overrides(overrides)
        except ValidationError as exc:
            found.extend(exc.errors)
    seen = set()
    for e in found:
        if (e.path, e.message) in seen:
            continue
        seen.add((e.path, e.message))
        msg = e.message if label is None else f"{e.message} (strategy {label})"
        if e.path in overrides:
            errs.add(join_path(opath, e.path), msg, e.code)
        else:  # a whole-strategy rule the overrides break together, e.g. every weight zero
            errs.add(opath, f"{e.path}: {msg}" if e.path else msg, e.code)


def _check_layer_conflicts(errs: Errors, raw_layers, layers: list[Layer]) -> None:
    """A user is in one experiment of each layer: two layers must not set the same strategy key
    (the merged result would depend on layer order) and at most one layer may pick the model."""
    owner_key: dict[str, str] = {}
    owner_model: str | None = None
    for i, layer in enumerate(layers):
        keys = set()
        picks_model = False
        for e in layer.experiments:
            for v in e.variants:
                keys.update(v.overrides)
                picks_model = picks_model or v.model is not None
        for k in sorted(keys):
            if k in owner_key and owner_key[k] != layer.name:
                errs.add(f"layers[{_index(raw_layers, layer.name)}]",
                         f"layer '{layer.name}' overrides '{k}', which layer '{owner_key[k]}' overrides too; "
                         "a strategy key belongs to one layer", "conflict")
            owner_key.setdefault(k, layer.name)
        if picks_model:
            if owner_model is not None and owner_model != layer.name:
                errs.add(f"layers[{_index(raw_layers, layer.name)}]",
                         f"layer '{layer.name}' picks a model, and layer '{owner_model}' does too; "
                         "the model version belongs to one layer", "conflict")
            owner_model = owner_model or layer.name


def _index(raw_layers, name: str) -> int:
    for i, spec in enumerate(raw_layers or ()):
        if isinstance(spec, dict) and spec.get("name") == name:
            return i
    return 0
