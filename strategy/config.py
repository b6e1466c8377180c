"""Objectives YAML -> a validated, immutable :class:`Strategy`.

The file format is the product team's contract (DESIGN.md). Loading checks types, ranges and
unknown keys (with a "did you mean" for typos), reports *every* error of a file with its
line and key path, and accepts overrides by dotted path (``objectives.like.weight=8``) that
are validated against the same schema — the A/B layer applies variants this way.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .checks import NAME_RE, as_dict, as_list, as_number, as_str, check_keys
from .errors import Errors, FieldError, ValidationError, did_you_mean, join_path
from .retrieval import DEFAULT_RETRIEVAL_SECTION, RetrievalPlan, retrieval_from_dict

OBJECTIVE_TYPES = ("binary", "regression")
TRANSFORMS = ("identity", "log1p")
FORMULAS = ("weighted_sum", "weighted_product")
ACTIONS = ("drop", "demote")
DIVERSITY_KEYS = ("topic", "creator_id", "source")
DIVERSITY_METHODS = ("window", "mmr")
TOP_KEYS = ("strategy", "objectives", "blend", "guardrails", "sources", "rerank", "exploration", "slate_size",
            "retrieval")
OBJECTIVE_KEYS = ("event", "type", "weight", "transform", "calibration")
DEFAULT_SLATE = 20


@dataclass(frozen=True)
class Calibration:
    """A monotone piecewise-linear map of raw predictions (``np.interp(p, x, y)``)."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.interp(values, self.x, self.y)


@dataclass(frozen=True)
class Objective:
    name: str
    event: str
    type: str
    weight: float
    transform: str = "identity"
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Blend:
    formula: str = "weighted_sum"
    eps: float = 1e-6


@dataclass(frozen=True)
class Guardrail:
    """Acts on a candidate whose (calibrated) prediction of ``objective`` leaves [min, max]."""

    objective: str
    max: float | None = None
    min: float | None = None
    action: str = "drop"

    def describe(self) -> str:
        bound = f">{self.max:g}" if self.max is not None else ""
        if self.min is not None:
            bound += ("," if bound else "") + f"<{self.min:g}"
        return f"{self.objective}{bound}"


@dataclass(frozen=True)
class SourceRule:
    """Per-source slate rules: share cap, reserved slots, and prior pseudo-impressions."""

    name: str
    max_share: float = 1.0
    min_slots: int = 0
    prior_weight: float = 0.0


@dataclass(frozen=True)
class Diversity:
    key: str = "topic"
    max_per_window: int = 2
    window: int = 5
    method: str = "window"
    mmr_lambda: float = 0.7


@dataclass(frozen=True)
class Strategy:
    """A validated strategy. ``raw`` keeps the plain mapping so overrides can re-validate."""

    name: str
    objectives: tuple[Objective, ...]
    blend: Blend = Blend()
    guardrails: tuple[Guardrail, ...] = ()
    sources: dict = field(default_factory=dict)
    diversity: Diversity | None = None
    epsilon: float = 0.0
    slate_size: int = DEFAULT_SLATE
    retrieval: RetrievalPlan | None = None  # what POST /v1/feed retrieves (None: strategy.retrieval.DEFAULT_RETRIEVAL)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objectives)

    @property
    def weights(self) -> np.ndarray:
        return np.array([o.weight for o in self.objectives], dtype=np.float64)

    def with_overrides(self, overrides: dict) -> "Strategy":
        """A new strategy with dotted-path overrides applied and the result re-validated."""
        return strategy_from_dict(apply_overrides(self.raw, overrides), source="<overrides>")


# ---------------------------------------------------------------- YAML with line numbers


def _line_map(node, path: str = "", out: dict | None = None) -> dict[str, int]:
    """Key path -> 1-based line, from a composed YAML node tree."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = join_path(path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_map(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, join_path(path, i), out)
    return out


def read_yaml(path: str | Path) -> tuple[object, dict[str, int]]:
    """``yaml.safe_load`` of a file plus a key-path -> line map; syntax errors name the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError([FieldError("", f"cannot read file: {exc.strerror}", "io", str(path))]) from None
    try:
        data = yaml.safe_load(text)
        lines = _line_map(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValidationError([FieldError("", f"YAML syntax error: {problem}", "syntax", str(path), line)]) from None
    return data, lines


def load_strategy(path: str | Path, overrides: dict | None = None) -> Strategy:
    """Load and validate an objectives YAML file (all errors at once, with file:line)."""
    data, lines = read_yaml(path)
    strategy = strategy_from_dict(data, source=str(path), lines=lines)
    return strategy.with_overrides(overrides) if overrides else strategy


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, object]:
    """``'objectives.like.weight=8'`` -> ``('objectives.like.weight', 8)`` (value as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValidationError([FieldError(text, "an override is KEY.PATH=VALUE", "override")])
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """A deep copy of ``raw`` with each dotted path set; the path must fit the schema.

    Paths may create optional sections (``exploration.epsilon``) but not new objectives:
    ``objectives.lik.weight`` is an error that suggests ``like``.
    """
    out = copy.deepcopy(raw)
    errs = Errors()
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if parts[0] not in TOP_KEYS:
            errs.add(dotted, f"unknown strategy key '{parts[0]}'{did_you_mean(parts[0], TOP_KEYS)}", "unknown_key")
            continue
        if parts[0] == "objectives" and len(parts) > 1:
            names = list((out.get("objectives") or {}).keys())
            if parts[1] not in names:
                errs.add(dotted, f"unknown objective '{parts[1]}'{did_you_mean(parts[1], names)}", "unknown_key")
                continue
        if parts[0] == "retrieval" and len(parts) > 1 and out.get("retrieval") is None:
            out["retrieval"] = copy.deepcopy(DEFAULT_RETRIEVAL_SECTION)  # override one source, keep the others
        node = out
        for i, part in enumerate(parts[:-1]):
            key = int(part) if isinstance(node, list) and part.isdigit() else part
            if isinstance(node, list):
                if not isinstance(key, int) or key >= len(node):
                    errs.add(dotted, f"no list entry '{part}' at '{'.'.join(parts[:i])}'", "unknown_key")
                    break
                node = node[key]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                errs.add(dotted, f"'{'.'.join(parts[:i])}' is not a mapping", "override")
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                errs.add(dotted, "path does not name a settable key", "override")
    errs.raise_if_any()
    try:
        strategy_from_dict(out, source="<overrides>")
    except ValidationError as exc:
        raise ValidationError([FieldError(e.path, e.message, e.code, "override") for e in exc.errors]) from None
    return out


# ---------------------------------------------------------------- schema


def strategy_from_dict(data, source: str = "<dict>", lines: dict[str, int] | None = None) -> Strategy:
    """Validate a strategy mapping; raises :class:`ValidationError` with every problem."""
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", TOP_KEYS, required=("strategy", "objectives"))
    name = as_str(errs, obj["strategy"], "strategy", pattern=NAME_RE) if "strategy" in obj else None

    objectives = _objectives(errs, obj.get("objectives")) if "objectives" in obj else ()
    declared = obj.get("objectives")
    names = [str(k) for k in declared] if isinstance(declared, dict) else []

    blend = Blend()
    if obj.get("blend") is not None:
        b = as_dict(errs, obj["blend"], "blend")
        if b is not None:
            check_keys(errs, b, "blend", ("formula", "eps"))
            formula = as_str(errs, b.get("formula", "weighted_sum"), "blend.formula", choices=FORMULAS)
            eps = as_number(errs, b.get("eps", 1e-6), "blend.eps", lo=0, hi=1, lo_open=True)
            if formula and eps is not None:
                blend = Blend(formula, float(eps))

    slate_size = DEFAULT_SLATE
    if "slate_size" in obj:
        slate_size = as_number(errs, obj["slate_size"], "slate_size", lo=1, hi=1000, integer=True) or DEFAULT_SLATE

    guardrails = _guardrails(errs, obj.get("guardrails"), names) if obj.get("guardrails") is not None else ()
    sources = _sources(errs, obj.get("sources"), slate_size) if obj.get("sources") is not None else {}
    diversity = _rerank(errs, obj.get("rerank")) if obj.get("rerank") is not None else None

    epsilon = 0.0
    if obj.get("exploration") is not None:
        e = as_dict(errs, obj["exploration"], "exploration")
        if e is not None:
            check_keys(errs, e, "exploration", ("epsilon",))
            epsilon = as_number(errs, e.get("epsilon", 0.0), "exploration.epsilon", lo=0, hi=1, hi_open=True) or 0.0

    retrieval = retrieval_from_dict(errs, obj["retrieval"]) if obj.get("retrieval") is not None else None

    errs.raise_if_any(source, lines)
    return Strategy(name, tuple(objectives), blend, tuple(guardrails), sources, diversity,
                    float(epsilon), int(slate_size), retrieval, copy.deepcopy(obj))


def _objectives(errs: Errors, value) -> list[Objective]:
    obj = as_dict(errs, value, "objectives")
    if obj is None:
        return []
    if not obj:
        errs.add("objectives", "at least one objective is required", "required")
    out = []
    for name, spec in obj.items():
        path = join_path("objectives", name)
        if not isinstance(name, str) or not NAME_RE.match(name):
            errs.add(path, f"objective names must match {NAME_RE.pattern}", "pattern")
            continue
        spec = as_dict(errs, spec, path)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, path, OBJECTIVE_KEYS, required=("event", "type", "weight"))
        event = as_str(errs, spec["event"], join_path(path, "event"), pattern=NAME_RE) if "event" in spec else None
        otype = as_str(errs, spec["type"], join_path(path, "type"), choices=OBJECTIVE_TYPES) if "type" in spec else None
        weight = as_number(errs, spec["weight"], join_path(path, "weight")) if "weight" in spec else None
        transform = as_str(errs, spec.get("transform", "identity"), join_path(path, "transform"), choices=TRANSFORMS)
        if otype == "binary" and transform == "log1p":
            errs.add(join_path(path, "transform"), "log1p applies to regression objectives only", "invalid")
        calibration = None
        if spec.get("calibration") is not None:
            calibration = _calibration(errs, spec["calibration"], join_path(path, "calibration"), otype)
        if len(errs.items) == before:
            out.append(Objective(name, event, otype, float(weight), transform, calibration))
    if out and not any(o.weight != 0 for o in out):
        errs.add("objectives", "at least one objective needs a non-zero weight", "invalid")
    return out


def _calibration(errs: Errors, value, path: str, otype: str | None) -> Calibration | None:
    obj = as_dict(errs, value, path)
    if obj is None:
        return None
    check_keys(errs, obj, path, ("x", "y"), required=("x", "y"))
    xs = as_list(errs, obj.get("x", []), join_path(path, "x"), max_len=1000) or []
    ys = as_list(errs, obj.get("y", []), join_path(path, "y"), max_len=1000) or []
    hi = 1.0 if otype == "binary" else None
    x = [as_number(errs, v, f"{path}.x[{i}]") for i, v in enumerate(xs)]
    y = [as_number(errs, v, f"{path}.y[{i}]", lo=0, hi=hi) for i, v in enumerate(ys)]
    if None in x or None in y:
        return None
    if len(x) < 2 or len(x) != len(y):
        errs.add(path, "x and y need the same length, at least 2 points", "invalid")
        return None
    if any(b <= a for a, b in zip(x, x[1:])):
        errs.add(join_path(path, "x"), "must be strictly increasing", "invalid")
        return None
    if any(b < a for a, b in zip(y, y[1:])):
        errs.add(join_path(path, "y"), "must be non-decreasing (a calibration map is monotone)", "invalid")
        return None
    return Calibration(tuple(map(float, x)), tuple(map(float, y)))


def _guardrails(errs: Errors, value, names: list[str]) -> list[Guardrail]:
    items = as_list(errs, value, "guardrails", max_len=100)
    out = []
    for i, spec in enumerate(items or ()):
        path = f"guardrails[{i}]"
        spec = as_dict(errs, spec, path)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, path, ("objective", "max", "min", "action"), required=("objective",))
        objective = spec.get("objective")
        if objective is not None and objective not in names:
            errs.add(join_path(path, "objective"),
                     f"unknown objective '{objective}'{did_you_mean(objective, names)} (objectives: {', '.join(names)})",
                     "unknown_objective")
        hi = as_number(errs, spec["max"], join_path(path, "max")) if spec.get("max") is not None else None
        lo = as_number(errs, spec["min"], join_path(path, "min")) if spec.get("min") is not None else None
        if "max" not in spec and "min" not in spec:
            errs.add(path, "a guardrail needs 'max' or 'min'", "required")
        if hi is not None and lo is not None and lo > hi:
            errs.add(path, f"min {lo} is above max {hi}", "range")
        action = as_str(errs, spec.get("action", "drop"), join_path(path, "action"), choices=ACTIONS)
        if len(errs.items) == before:
            out.append(Guardrail(objective, None if hi is None else float(hi), None if lo is None else float(lo), action))
    return out


def _sources(errs: Errors, value, slate_size: int) -> dict[str, SourceRule]:
    obj = as_dict(errs, value, "sources")
    out: dict[str, SourceRule] = {}
    for name, spec in (obj or {}).items():
        path = join_path("sources", name)
        if not isinstance(name, str) or not NAME_RE.match(name):
            errs.add(path, f"source names must match {NAME_RE.pattern}", "pattern")
            continue
        spec = as_dict(errs, spec, path)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, path, ("max_share", "min_slots", "prior_weight"))
        share = as_number(errs, spec.get("max_share", 1.0), join_path(path, "max_share"), lo=0, hi=1)
        slots = as_number(errs, spec.get("min_slots", 0), join_path(path, "min_slots"), lo=0, hi=1000, integer=True)
        prior = as_number(errs, spec.get("prior_weight", 0.0), join_path(path, "prior_weight"), lo=0)
        if share is not None and slots is not None and slots > math.floor(share * slate_size + 1e-9):
            errs.add(join_path(path, "min_slots"),
                     f"min_slots {slots} exceeds max_share {share} x slate_size {slate_size}", "range")
        if len(errs.items) == before:
            out[name] = SourceRule(name, float(share), int(slots), float(prior))
    if sum(r.min_slots for r in out.values()) > slate_size:
        errs.add("sources", f"min_slots add up to more than slate_size {slate_size}", "range")
    return out


def _rerank(errs: Errors, value) -> Diversity | None:
    obj = as_dict(errs, value, "rerank")
    if obj is None:
        return None
    check_keys(errs, obj, "rerank", ("diversity",))
    if obj.get("diversity") is None:
        return None
    path = "rerank.diversity"
    d = as_dict(errs, obj["diversity"], path)
    if d is None:
        return None
    before = len(errs.items)
    check_keys(errs, d, path, ("key", "max_per_window", "window", "method", "lambda"))
    key = as_str(errs, d.get("key", "topic"), join_path(path, "key"), choices=DIVERSITY_KEYS)
    method = as_str(errs, d.get("method", "window"), join_path(path, "method"), choices=DIVERSITY_METHODS)
    per = as_number(errs, d.get("max_per_window", 2), join_path(path, "max_per_window"), lo=1, hi=1000, integer=True)
    window = as_number(errs, d.get("window", 5), join_path(path, "window"), lo=1, hi=1000, integer=True)
    lam = as_number(errs, d.get("lambda", 0.7), join_path(path, "lambda"), lo=0, hi=1, lo_open=True)
    if len(errs.items) != before:
        return None
    return Diversity(key, int(per), int(window), method, float(lam))
