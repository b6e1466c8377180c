"""Risk control: rules that remove candidates before ranking (``conf/risk.yaml``).

Rules, each removal named in the response's ``dropped`` as ``risk:<rule>``:

- ``blocked_creators``: creator ids never shown;
- ``blocked_terms``: case-insensitive whole-word terms banned from a candidate's text (LLM output above all);
- ``blocked_patterns``: regular expressions banned from a candidate's text;
- ``max_per_creator``: at most this many candidates of one creator reach the slate (the best-scored win).

The strategy's guardrails on predicted ``report`` act on top of these.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from strategy.checks import as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, join_path

RISK_KEYS = ("blocked_creators", "blocked_terms", "blocked_patterns", "max_per_creator")


@dataclass(frozen=True)
class RiskRules:
    blocked_creators: frozenset = frozenset()
    term_regex: re.Pattern | None = None
    patterns: tuple[re.Pattern, ...] = ()
    max_per_creator: int | None = None

    @property
    def screens(self) -> bool:
        """Whether any creator or text rule is configured (else :meth:`screen` keeps every candidate)."""
        return bool(self.blocked_creators) or self.term_regex is not None or bool(self.patterns)

    def screen(self, candidates) -> tuple[list[int], list[tuple[str, str]]]:
        """Indices of candidates that pass the text/creator rules, and ``(item_id, reason)`` drops."""
        if not self.screens:   # no rule: nothing to look at
            return list(range(len(candidates))), []
        keep, dropped = [], []
        for i, cand in enumerate(candidates):
            reason = self._reason(cand)
            if reason is None:
                keep.append(i)
            else:
                dropped.append((cand.item_id, reason))
        return keep, dropped

    def _reason(self, cand) -> str | None:
        if cand.creator_id is not None and cand.creator_id in self.blocked_creators:
            return "risk:blocked_creator"
        if cand.text:
            if self.term_regex is not None and self.term_regex.search(cand.text):
                return "risk:blocked_term"
            for pattern in self.patterns:
                if pattern.search(cand.text):
                    return f"risk:blocked_pattern({pattern.pattern})"
        return None

    def cap_creators(self, candidates, scores: np.ndarray) -> tuple[list[int], list[tuple[str, str]]]:
        """Keep the ``max_per_creator`` best-scored candidates of each creator."""
        if self.max_per_creator is None:
            return list(range(len(candidates))), []
        seen: dict[str, int] = {}
        items: set[str] = set()
        keep, dropped = [], []
        for i in np.argsort(-scores, kind="stable"):
            creator, item = candidates[i].creator_id, candidates[i].item_id
            if creator is not None and item not in items:  # a duplicate is the strategy's to drop
                items.add(item)
                seen[creator] = seen.get(creator, 0) + 1
                if seen[creator] > self.max_per_creator:
                    dropped.append((candidates[i].item_id, "risk:max_per_creator"))
                    continue
            keep.append(int(i))
        keep.sort()
        return keep, dropped


def risk_from_dict(data, source: str = "<dict>", lines: dict | None = None) -> RiskRules:
    errs = Errors()
    obj = as_dict(errs, data if data is not None else {}, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", RISK_KEYS)
    creators = [str(c) for c in as_list(errs, obj.get("blocked_creators", []), "blocked_creators") or []]
    terms = []
    for i, term in enumerate(as_list(errs, obj.get("blocked_terms", []), "blocked_terms") or []):
        t = as_str(errs, term, f"blocked_terms[{i}]", max_len=200)
        if t is not None and t.strip():
            terms.append(re.escape(t.strip()))
    patterns = []
    for i, pat in enumerate(as_list(errs, obj.get("blocked_patterns", []), "blocked_patterns") or []):
        p = as_str(errs, pat, f"blocked_patterns[{i}]", max_len=500)
        if p is not None:
            try:
                patterns.append(re.compile(p, re.IGNORECASE))
            except re.error as exc:
                errs.add(f"blocked_patterns[{i}]", f"invalid regular expression: {exc}", "pattern")
    cap = None
    if obj.get("max_per_creator") is not None:
        cap = as_number(errs, obj["max_per_creator"], join_path("", "max_per_creator"), lo=1, hi=1000, integer=True)
    errs.raise_if_any(source, lines)
    term_regex = re.compile(r"\b(?:" + "|".join(terms) + r")\b", re.IGNORECASE) if terms else None
    return RiskRules(frozenset(creators), term_regex, tuple(patterns), cap)


def load_risk(path) -> RiskRules:
    data, lines = read_yaml(path)
    return risk_from_dict(data, source=str(path), lines=lines)
