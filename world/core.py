"""A simulated feed world: users, human and LLM-generated items, and how users respond.

The world is the ground truth for demos, tests and closed-loop experiments. It knows every latent
quantity (a user's interests, an item's quality and harmfulness) and the exact probability of every
feedback event; a ranker sees only what a real one would see (ids, topic, text, generator name and
its noisy prior score, dense features, the user's recent engaged items) and must learn the rest.

Everything is deterministic from ``WorldConfig.seed``.

Response model, for user ``u``, item ``i`` shown at position ``k`` (1 = top of the slate)::

    relevance  r  = logit(base.click) + affinity * a[u, topic(i)] + creator_affinity * <e_u, e_creator(i)>
                    + user_bias * b[u] + quality * q[i] + llm_attitude * l[u] * is_llm(i) + harm_click * h[i]
    P(click)      = k ** -position_bias.eta * sigmoid(r)                     (examination x relevance)
    P(report|click)     = sigmoid(logit(base.report) + harm_report * h[i] - quality_report * q[i])
    P(report|no click)  = report_without_click * P(report|click)
    P(like|click, no report)  = sigmoid(logit(base.like) + quality_like * q[i] + 0.5 affinity * a + ...)
    P(share|like)             = sigmoid(logit(base.share) + quality_share * q[i] + ...);
    P(share|click, no like)   = share_without_like * P(share|like)
    watch seconds | click     = duration[i] * Beta(mean m, concentration), m larger for liked items

so like, share and (mostly) report happen after a click, watch time is longer for liked items,
and reports come from a latent ``harmful`` flag that is more frequent among low-quality items,
in particular low-quality LLM items. ``true_probs`` returns the exact marginals of all of these.

A living world (``living.enabled``, see :class:`world.config.LivingConfig`) makes the response model a
function of time ``t``: ``a[u, topic]`` becomes the drifting interest ``a(u, topic, t)`` plus the topic's
trend, and ``r`` gains the freshness boost ``freshness_weight * 2 ** (-age(i, t) / half_life)``; only items
alive at ``t`` (born, not expired) are retrieved.

Ids are strings: users ``u17``, items ``i42``, creators ``c3``; topics are names (``cooking``).
Positions are 1-based, like ``rank`` in a ``/v1/rank`` answer.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .config import POLICIES, WorldConfig

# ---------------------------------------------------------------- vocabularies

TOPIC_WORDS = {
    "cooking": "recipe simmer garlic crispy oven noodles spicy bake dough sauce",
    "music": "guitar chorus remix drums melody vinyl concert bass lyrics piano",
    "travel": "beach itinerary hostel passport island hiking flight museum sunset roadtrip",
    "sports": "goal playoff dribble coach stadium sprint referee league tackle rebound",
    "gaming": "speedrun boss controller loot patch raid console pixel quest lag",
    "fashion": "outfit denim runway sneakers thrift vintage tailoring fabric styling jacket",
    "science": "quantum molecule telescope fossil experiment neuron galaxy enzyme physics lab",
    "comedy": "prank sketch punchline standup parody blooper roast improv skit laugh",
    "pets": "puppy kitten leash grooming parrot aquarium vet treats hamster fetch",
    "fitness": "squat cardio protein stretch deadlift yoga plank marathon reps mobility",
    "finance": "budget stocks savings dividend mortgage crypto inflation taxes index invoice",
    "tech": "smartphone laptop unboxing benchmark firmware chip battery keyboard robot code",
    "art": "canvas sketchbook watercolor sculpture mural gallery charcoal pottery ink portrait",
    "news": "election council briefing headline interview policy report summit protest verdict",
    "diy": "drill plywood sanding shelf glue workshop renovation tile paint toolbox",
    "movies": "trailer director sequel premiere screenplay cinema actor review remake soundtrack",
    "books": "novel chapter author paperback library poetry memoir fantasy bookclub fiction",
    "cars": "engine torque drift sedan turbo garage tires horsepower detailing restoration",
    "nature": "forest river wildflower birds mountain glacier meadow wildlife canyon rain",
    "parenting": "toddler bedtime nursery homework lullaby stroller playdate diaper teen school",
}
GENERIC_WORDS = ("today new best watch my the how why quick easy look first time day story video guide "
                 "tips top try this with and for you").split()
SLOP_WORDS = ("delve tapestry unlock elevate seamless vibrant realm embark testament multifaceted "
              "furthermore navigate landscape journey crucial boundless").split()
BAIT_WORDS = "shocking miracle secret banned exposed hoax scam unbelievable outrage cure".split()
_WORDS_PER_TOPIC = 10


def _topics(n: int) -> tuple[list[str], list[list[str]]]:
    base = list(TOPIC_WORDS)
    names, vocab = [], []
    for t in range(n):
        if t < len(base):
            names.append(base[t])
            vocab.append(TOPIC_WORDS[base[t]].split())
        else:
            name = f"topic{t}"
            names.append(name)
            vocab.append([f"{name}w{j}" for j in range(_WORDS_PER_TOPIC)])
    return names, vocab


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _centred(affinity: np.ndarray) -> np.ndarray:
    """Each user's topic affinities minus their mean (only relative interest matters)."""
    return affinity - affinity.mean(axis=1, keepdims=True)


def _percentiles(values: np.ndarray) -> np.ndarray:
    """Each value's percentile among ``values`` (ranks + 0.5, over n)."""
    return (np.argsort(np.argsort(values, kind="stable"), kind="stable") + 0.5) / len(values)


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# ---------------------------------------------------------------- the world


class World:
    """A seeded feed world. Build it from a :class:`WorldConfig` (or :meth:`from_yaml`).

    Public arrays (index = the number in the id: item ``i42`` is index 42):
    ``item_topic``, ``item_creator``, ``item_quality``, ``item_harmful``, ``item_is_llm``,
    ``item_generator`` (-1 for human items), ``item_prior`` (NaN for human items), ``item_duration``,
    ``user_affinity`` (n_users x n_topics; at the start for a living world), ``creator_followers``.
    A living world (``config.living.enabled``) also has ``item_born_ts`` and ``item_expires_ts``
    (epoch seconds): its catalogue holds the ``n_items`` initial items followed by every item born
    during ``duration_days``, in birth order; ``n_items_total`` counts them all.
    """

    def __init__(self, config: WorldConfig):
        if not isinstance(config, WorldConfig):
            raise TypeError("World(config) needs a WorldConfig; use World.from_yaml(path) for a file")
        self.config = cfg = config
        rng = np.random.default_rng([cfg.seed, 0])
        U, I, C, T = cfg.n_users, cfg.n_items, cfg.n_creators, cfg.n_topics
        uc = cfg.users

        self.topic_names, self._topic_vocab = _topics(T)
        self.generator_names = [g.name for g in cfg.generators]

        # users: persona interests + own deviation (centred per user), activity, LLM attitude, taste vector
        self._personas = rng.normal(0.0, uc.persona_sharpness, (uc.n_personas, T))
        self.user_persona = rng.integers(0, uc.n_personas, U)
        self._user_taste = rng.normal(0.0, uc.affinity_noise, (U, T))   # the user's own deviation
        self.user_affinity = _centred(self._personas[self.user_persona] + self._user_taste)
        self.user_bias = rng.normal(0.0, 1.0, U)
        self.user_llm_attitude = rng.normal(uc.llm_attitude_mean, uc.llm_attitude_sd, U)
        self.user_activity = rng.lognormal(0.0, uc.activity_sigma, U)
        d = uc.embedding_dim
        self.user_embedding = rng.normal(0.0, d ** -0.25, (U, d))
        self._creators(rng, C, T, d)

        # items: LLM items need LLM creators and human items human ones
        n_llm_c = int(self.creator_is_llm.sum())
        n_llm_i = 0 if n_llm_c == 0 else I if n_llm_c == C else min(round(I * cfg.llm_share), I - 1)
        is_llm = np.zeros(I, dtype=bool)
        is_llm[rng.choice(I, n_llm_i, replace=False)] = True
        creator = np.empty(I, dtype=np.int64)
        if (~is_llm).any():
            creator[~is_llm] = self._human_creators(rng, int((~is_llm).sum()))
        if is_llm.any():
            creator[is_llm] = rng.choice(np.flatnonzero(self.creator_is_llm), int(is_llm.sum()))
        items = self._draw_items(rng, creator, quality_pct=_percentiles)
        if cfg.living.enabled:
            items = self._living(items)
        for key, value in items.items():
            setattr(self, "item_" + key, value)
        self.n_items_total = len(self.item_topic)

        # retrieval index of the static world: items grouped by topic (a living world indexes by hour)
        self._by_topic = np.argsort(self.item_topic, kind="stable")
        counts = np.bincount(self.item_topic, minlength=T)
        self._topic_count = counts
        self._topic_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._hour_index: dict = {}
        self._popularity = 0.8 * self.item_quality + 0.2 * np.log(self.creator_followers[self.item_creator])
        self.item_impressions = np.zeros(self.n_items_total, dtype=np.int64)  # served (closed loop: respond())

        self.user_ids = np.array([f"u{k}" for k in range(U)], dtype=object)
        self.item_ids = np.array([f"i{k}" for k in range(self.n_items_total)], dtype=object)
        self.creator_ids = np.array([f"c{k}" for k in range(C)], dtype=object)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "World":
        return cls(WorldConfig.from_yaml(path, **overrides))

    # ------------------------------------------------------------ creators and items

    def _creators(self, rng, C: int, T: int, d: int) -> None:
        """Creators: LLM-operated ones each use one generator; quality, home topic, taste, followers."""
        cfg, hc = self.config, self.config.human
        n_llm_c = 0
        if cfg.llm_share > 0 and cfg.generators:
            n_llm_c = min(C, max(1, round(C * cfg.llm_share)))
            if cfg.llm_share < 1 and C > 1:
                n_llm_c = min(n_llm_c, C - 1)
        self.creator_is_llm = np.zeros(C, dtype=bool)
        self.creator_is_llm[C - n_llm_c:] = True
        shares = np.array([g.share for g in cfg.generators], dtype=float)
        self.creator_generator = np.full(C, -1, dtype=np.int64)
        if n_llm_c:
            self.creator_generator[C - n_llm_c:] = rng.choice(len(shares), n_llm_c, p=shares / shares.sum())
        gen_mean = np.array([g.quality_mean for g in cfg.generators] or [0.0])
        self.creator_quality = np.where(
            self.creator_is_llm,
            gen_mean[np.maximum(self.creator_generator, 0)] + rng.normal(0.0, 0.2, C),
            hc.quality_mean + rng.normal(0.0, hc.creator_quality_sd, C))
        self.creator_topic = rng.integers(0, T, C)
        self.creator_embedding = rng.normal(0.0, d ** -0.25, (C, d))
        self.creator_followers = np.round(np.exp(6.0 + 0.8 * self.creator_quality + rng.normal(0, 1.0, C))).astype(
            np.int64)

    def _human_creators(self, rng, n: int) -> np.ndarray:
        """``n`` human creators, the more followers the more items (sqrt-weighted)."""
        human_c = np.flatnonzero(~self.creator_is_llm)
        w = np.sqrt(self.creator_followers[human_c].astype(float))
        return rng.choice(human_c, n, p=w / w.sum())

    def _draw_items(self, rng, creator: np.ndarray, quality_pct) -> dict:
        """The latent and served attributes of items made by ``creator`` (one draw order, so a seed
        always gives the same catalogue). ``quality_pct(quality)`` maps qualities to the percentiles
        LLM generators estimate in their prior scores."""
        cfg, hc, T = self.config, self.config.human, self.config.n_topics
        n = len(creator)
        is_llm = self.creator_is_llm[creator]
        topic = np.where(rng.random(n) < 0.7, self.creator_topic[creator], rng.integers(0, T, n))
        generator = self.creator_generator[creator]
        g = np.maximum(generator, 0)
        gen_sd = np.array([x.quality_sd for x in cfg.generators] or [0.0])
        own_sd = np.where(is_llm, gen_sd[g], hc.quality_sd)
        quality = self.creator_quality[creator] + rng.normal(0.0, 1.0, n) * own_sd
        gen_harm = np.array([x.harm_rate for x in cfg.generators] or [0.0])
        harm_rate = np.clip(np.where(is_llm, gen_harm[g], hc.harm_rate), 1e-6, 1 - 1e-6)
        harm_p = _sigmoid(np.log(harm_rate / (1 - harm_rate)) - cfg.effects.harm_quality * (quality - hc.quality_mean))
        harmful = rng.random(n) < harm_p
        duration = np.round(
            cfg.watch.duration_median * np.exp(rng.normal(0.0, cfg.watch.duration_sigma, n)), 1).clip(1.0, None)
        # LLM generators report a noisy, possibly biased estimate of the quality percentile
        pct = quality_pct(quality)
        noise = np.array([x.prior_noise for x in cfg.generators] or [0.0])[g]
        bias = np.array([x.prior_bias for x in cfg.generators] or [0.0])[g]
        prior = np.clip(pct + bias + rng.normal(0.0, 1.0, n) * noise, 0.0, 1.0).round(3)
        text = self._texts(rng, topic, is_llm, pct, harmful)
        return {"is_llm": is_llm, "creator": creator, "topic": topic, "generator": generator, "quality": quality,
                "harmful": harmful, "duration": duration, "quality_pct": pct,
                "prior": np.where(is_llm, prior, np.nan), "text": text,
                "text_len": np.array([t.count(" ") + 1 for t in text], dtype=np.int64)}

    def _living(self, initial: dict) -> dict:
        """Add the living world's state: ages and lifetimes of the initial items, the items born
        during the run (Poisson arrivals per generator and for human creators), drifting user
        interests and topic trends. A random stream of its own: the static draws stay as they were."""
        cfg, lv = self.config, self.config.living
        rng = np.random.default_rng([cfg.seed, 10])
        start, span = cfg.start_ts, cfg.duration_days * 86_400.0
        n0 = len(initial["topic"])
        born0 = start - rng.random(n0) * lv.initial_age_hours * 3600.0
        sources = [(cfg.human.items_per_hour, None)] + [(g.items_per_hour, k) for k, g in enumerate(cfg.generators)]
        creators, born = [], []
        for rate, gen in sources:
            n = int(rng.poisson(rate * span / 3600.0)) if rate > 0 else 0
            if n == 0:
                continue
            if gen is None:
                creators.append(self._human_creators(rng, n))
            else:
                own = np.flatnonzero(self.creator_generator == gen)
                if not len(own):
                    continue
                creators.append(rng.choice(own, n))
            born.append(start + rng.random(n) * span)
        q_sorted = np.sort(initial["quality"])
        if creators:
            creator, born_new = np.concatenate(creators), np.concatenate(born)
            order = np.argsort(born_new, kind="stable")   # ids in birth order
            new = self._draw_items(rng, creator[order], quality_pct=lambda q: np.clip(
                (np.searchsorted(q_sorted, q) + 0.5) / n0, 0.0, 1.0))
            items = {k: np.concatenate([initial[k], new[k]]) if isinstance(initial[k], np.ndarray)
                     else initial[k] + new[k] for k in initial}
            born_all = np.concatenate([born0, born_new[order]])
        else:
            items, born_all = initial, born0
        life = np.minimum(lv.lifetime_hours * np.exp(rng.normal(0.0, lv.lifetime_sigma, len(born_all))),
                          lv.max_lifetime_hours) * 3600.0
        # the initial catalogue is alive at the start, each item with a uniform share of its lifetime left
        life[:n0] = (start - born0) + rng.random(n0) * life[:n0]
        items["born_ts"], items["expires_ts"] = born_all, born_all + life

        U, T = cfg.n_users, cfg.n_topics
        self._drift_persona = rng.integers(0, cfg.users.n_personas, U)
        self._drift_on = rng.random(U) < lv.drift_share
        self._drift_phase = rng.random(U) * 2.0
        self._affinity_target = _centred(self._personas[self._drift_persona] + self._user_taste)
        self._trend_period = (lv.trend_period_min_days + rng.random(T) * (lv.trend_period_max_days
                                                                            - lv.trend_period_min_days)) * 86_400.0
        self._trend_phase = rng.random(T) * 2.0 * np.pi
        return items

    # ------------------------------------------------------------ items' text

    def _texts(self, rng, topic, is_llm, pct, harmful) -> list[str]:
        """Topic words + generic words; LLM items add 'slop' words the more, the lower their quality;
        harmful items usually carry bait words. Hashed tokens therefore reveal LLM quality and harm."""
        cfg, I = self.config, len(topic)
        V = _WORDS_PER_TOPIC
        vocab = np.array([w for ws in self._topic_vocab for w in ws] + GENERIC_WORDS + SLOP_WORDS + BAIT_WORDS,
                         dtype=object)
        n_topic_words = len(self._topic_vocab) * V
        g0, s0, b0 = n_topic_words, n_topic_words + len(GENERIC_WORDS), n_topic_words + len(GENERIC_WORDS) + len(
            SLOP_WORDS)
        L = cfg.text_tokens + 3
        lengths = np.clip(cfg.text_tokens + rng.integers(-3, 4, I), 2, L)
        topic_tok = topic[:, None] * V + rng.integers(0, V, (I, L))
        generic_tok = g0 + rng.integers(0, len(GENERIC_WORDS), (I, L))
        tok = np.where(rng.random((I, L)) < 0.55, topic_tok, generic_tok)
        slop_p = np.where(is_llm, 0.1 + 0.5 * (1.0 - pct), 0.0)
        slop = rng.random((I, L)) < slop_p[:, None]
        tok = np.where(slop, s0 + rng.integers(0, len(SLOP_WORDS), (I, L)), tok)
        bait_n = np.where(harmful, rng.binomial(3, 0.6, I), rng.binomial(1, 0.03, I))
        bait = np.arange(L)[None, :] < bait_n[:, None]
        bait = rng.permuted(bait, axis=1) if L > 1 else bait
        tok = np.where(bait, b0 + rng.integers(0, len(BAIT_WORDS), (I, L)), tok)
        return [" ".join(vocab[row[:n]]) for row, n in zip(tok, lengths)]

    # ------------------------------------------------------------ ids

    @staticmethod
    def _index(ids, prefix: str, n: int, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind in "iu":
            idx = arr.astype(np.int64)
        else:
            try:
                idx = np.array([int(s[len(prefix):]) if isinstance(s, str) and s.startswith(prefix) else int(s)
                                for s in arr.ravel()], dtype=np.int64).reshape(arr.shape)
            except (TypeError, ValueError):
                raise KeyError(f"{what} ids look like '{prefix}123'") from None
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise KeyError(f"unknown {what} id (this world has {what}s {prefix}0..{prefix}{n - 1})")
        return idx

    def user_index(self, user_ids) -> np.ndarray:
        return self._index(user_ids, "u", self.config.n_users, "user")

    def item_index(self, item_ids) -> np.ndarray:
        return self._index(item_ids, "i", self.n_items_total, "item")

    # ------------------------------------------------------------ time (living world)

    @property
    def living(self) -> bool:
        return self.config.living.enabled

    def _times(self, ts, shape) -> np.ndarray | None:
        """``ts`` (epoch seconds, a scalar or an array of ``shape``; None: ``start_ts``) as a flat
        float array, or None in a static world, where time changes nothing."""
        if not self.living:
            return None
        return np.broadcast_to(np.asarray(self.config.start_ts if ts is None else ts, dtype=np.float64),
                               shape).ravel()

    def affinity(self, u: np.ndarray, topic: np.ndarray, ts: np.ndarray | None = None) -> np.ndarray:
        """The user x topic interest at ``ts``: in a living world, a drifting user's mix of persona
        and target persona, plus the topic's trend."""
        a = self.user_affinity[u, topic]
        if ts is None:
            return a
        cfg, lv = self.config, self.config.living
        t = ts - cfg.start_ts
        mix = self._drift_on[u] * (0.5 - 0.5 * np.cos(np.pi * (t / (lv.drift_days * 86_400.0) + self._drift_phase[u])))
        a = a + mix * (self._affinity_target[u, topic] - a)
        return a + lv.trend_amplitude * np.sin(2.0 * np.pi * t / self._trend_period[topic] + self._trend_phase[topic])

    def age_hours(self, i: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Hours since item ``i`` was born, at ``ts`` (living world)."""
        return (ts - self.item_born_ts[i]) / 3600.0

    def alive(self, item_ids, ts: float) -> np.ndarray:
        """Whether each item is in the catalogue at ``ts`` (always, in a static world)."""
        i = self.item_index(item_ids)
        if not self.living:
            return np.ones(i.shape, dtype=bool)
        return (self.item_born_ts[i] <= ts) & (ts < self.item_expires_ts[i])

    # ------------------------------------------------------------ truth

    def _parts(self, u: np.ndarray, i: np.ndarray, pos: np.ndarray, ts: np.ndarray | None = None) -> dict:
        """Conditional probabilities of the response model (see the module docstring)."""
        cfg, e, br = self.config, self.config.effects, self.config.base_rates
        topic = self.item_topic[i]
        c = self.item_creator[i]
        a = self.affinity(u, topic, ts)
        q = self.item_quality[i]
        h = self.item_harmful[i].astype(float)
        llm = self.item_is_llm[i].astype(float)
        cu = np.einsum("nd,nd->n", self.user_embedding[u], self.creator_embedding[c])
        att = self.user_llm_attitude[u] * llm
        rel = (_logit(br.click) + e.affinity * a + e.creator_affinity * cu + e.user_bias * self.user_bias[u]
               + e.quality * q + e.llm_attitude * att + e.harm_click * h)
        if ts is not None:
            lv = cfg.living
            rel = rel + lv.freshness_weight * np.exp2(-np.maximum(self.age_hours(i, ts), 0.0)
                                                      / lv.freshness_half_life_hours)
        exam = np.asarray(pos, dtype=float) ** -cfg.position_bias.eta
        p_click = exam * _sigmoid(rel)
        r_c = _sigmoid(_logit(br.report) + e.harm_report * h - e.quality_report * q)
        l_c = _sigmoid(_logit(br.like) + e.quality_like * q + 0.5 * e.affinity * a + 0.5 * e.creator_affinity * cu
                       + 0.3 * e.user_bias * self.user_bias[u] + 0.5 * e.llm_attitude * att)
        s_l = _sigmoid(_logit(br.share) + e.quality_share * q + 0.5 * e.affinity * a
                       + 0.3 * e.user_bias * self.user_bias[u])
        w = cfg.watch
        base_w = _logit(w.completion) + w.quality * q + w.affinity * a
        m_like, m_nolike = _sigmoid(base_w + w.like_boost), _sigmoid(base_w)
        return {"p_click": p_click, "r_c": r_c, "r_n": br.report_without_click * r_c, "l_c": l_c,
                "s_l": s_l, "s_n": br.share_without_like * s_l, "m_like": m_like, "m_nolike": m_nolike,
                "duration": self.item_duration[i]}

    @staticmethod
    def _marginals(parts: dict) -> dict:
        pc, rc, rn, lc = parts["p_click"], parts["r_c"], parts["r_n"], parts["l_c"]
        like_c = (1.0 - rc) * lc
        return {
            "click": pc,
            "like": pc * like_c,
            "share": pc * (1.0 - rc) * (lc * parts["s_l"] + (1.0 - lc) * parts["s_n"]),
            "watch": pc * parts["duration"] * (like_c * parts["m_like"] + (1.0 - like_c) * parts["m_nolike"]),
            "report": pc * rc + (1.0 - pc) * rn,
        }

    def true_probs(self, user_ids, item_ids, positions, ts=None) -> dict[str, np.ndarray]:
        """Exact marginals per (user, item, position), vectorised; arrays broadcast against each other.

        Returns ``{"click", "like", "share", "report"}`` probabilities and ``"watch"``, the expected
        watch seconds (0 without a click). Ids are strings (``u3``, ``i42``) or integer indices;
        positions are 1-based. ``ts`` (epoch seconds, scalar or broadcastable; default ``start_ts``)
        matters only in a living world.
        """
        u, i, pos = np.broadcast_arrays(self.user_index(user_ids), self.item_index(item_ids),
                                        np.asarray(positions, dtype=np.int64))
        if pos.size and pos.min() < 1:
            raise ValueError("positions are 1-based (1 = top of the slate)")
        return self._marginals(self._parts(u.ravel(), i.ravel(), pos.ravel(), self._times(ts, u.shape)))

    def slate_value(self, user_id, item_ids, ts=None) -> dict[str, float]:
        """Expected totals of each objective for one slate shown in this order (a closed-loop oracle)."""
        probs = self.true_probs(user_id, list(item_ids), np.arange(1, len(item_ids) + 1), ts)
        return {k: float(v.sum()) for k, v in probs.items()}

    def _sample(self, u, i, pos, rng, ts=None) -> dict:
        """Sample correlated labels for impressions; returns labels, true marginals and event delays."""
        parts = self._parts(u, i, pos, ts)
        n = len(u)
        rnd = rng.random((6, n))
        click = rnd[0] < parts["p_click"]
        report = np.where(click, rnd[1] < parts["r_c"], rnd[1] < parts["r_n"])
        like = click & ~report & (rnd[2] < parts["l_c"])
        share = click & ~report & (rnd[3] < np.where(like, parts["s_l"], parts["s_n"]))
        m = np.where(like, parts["m_like"], parts["m_nolike"])
        k = self.config.watch.concentration
        frac = rng.beta(np.maximum(m * k, 1e-3), np.maximum((1.0 - m) * k, 1e-3))
        watch = np.where(click, np.round(np.maximum(parts["duration"] * frac, 0.1), 1), 0.0)
        click_delay = 1.5 * (pos - 1) + rng.exponential(3.0, n)
        return {"click": click, "like": like, "share": share, "report": report, "watch_time": watch,
                "click_delay": click_delay, "react_frac": rnd[4], "report_delay": rng.exponential(8.0, n),
                "probs": self._marginals(parts)}

    # ------------------------------------------------------------ retrieval

    def _retrieve(self, users: np.ndarray, n: int, rng, ts: np.ndarray | None = None) -> np.ndarray:
        """``(len(users), n)`` distinct-per-row (almost always) item indices, in random order; in a
        living world only items alive at each row's ``ts`` (per simulated hour, an index of the
        items alive during it; the few that are not alive at the exact second are drawn again)."""
        if ts is None:
            return self._retrieve_from(users, n, rng, None, self._by_topic, self._topic_start, self._topic_count)
        out = np.empty((len(users), n), dtype=np.int64)
        hour = np.floor(ts / 3600.0).astype(np.int64)
        for h in np.unique(hour):
            rows = np.flatnonzero(hour == h)
            pool, by_topic, start, count = self._alive_index(int(h))
            t = ts[rows, None]
            block = self._retrieve_from(users[rows], n, rng, pool, by_topic, start, count, t)
            for _ in range(8):
                dead = ~self._alive_at(block, t)
                if not dead.any():
                    break
                block[dead] = pool[rng.integers(0, len(pool), int(dead.sum()))]
            out[rows] = block
        return out

    def _alive_at(self, items: np.ndarray, ts) -> np.ndarray:
        return (self.item_born_ts[items] <= ts) & (ts < self.item_expires_ts[items])

    def _alive_index(self, hour: int):
        """``(pool, pool items by topic, topic_start, topic_count)`` of the items alive at some time in
        simulated ``hour`` (``hour * 3600`` epoch seconds); the last two hours are cached (a
        simulation or a closed loop moves forward in time)."""
        if hour not in self._hour_index:
            t0, t1 = hour * 3600.0, (hour + 1) * 3600.0
            pool = np.flatnonzero((self.item_born_ts < t1) & (self.item_expires_ts > t0))
            if not len(pool):  # nothing alive: the most recently born item stands in
                pool = np.array([int(np.argmax(np.where(self.item_born_ts < t1, self.item_born_ts, -np.inf)))])
            topic = self.item_topic[pool]
            counts = np.bincount(topic, minlength=self.config.n_topics)
            start = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if len(self._hour_index) >= 2:
                self._hour_index.pop(next(iter(self._hour_index)))
            self._hour_index[hour] = (pool, pool[np.argsort(topic, kind="stable")], start, counts)
        return self._hour_index[hour]

    def _retrieve_from(self, users: np.ndarray, n: int, rng, pool, by_topic, topic_start, topic_count,
                       ts: np.ndarray | None = None) -> np.ndarray:
        """Retrieval over a pool of items (``None``: every item): a ``personalization`` share of each
        row from the user's favourite topics at ``ts`` (``by_topic``: the pool's items grouped by
        topic), the rest uniform; duplicates within a row are drawn again."""
        cfg = self.config
        size = self.n_items_total if pool is None else len(pool)
        draw_any = (lambda shape: rng.integers(0, size, shape)) if pool is None else \
            (lambda shape: pool[rng.integers(0, size, shape)])
        R = len(users)
        items = draw_any((R, n))
        if cfg.personalization > 0 and R:
            logits = self.user_affinity[users] if ts is None else \
                self.affinity(users[:, None], np.arange(cfg.n_topics)[None, :], ts)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            cum = np.cumsum(p, axis=1)
            cum /= cum[:, -1:]
            topic = np.empty((R, n), dtype=np.int64)
            draw = rng.random((R, n))
            for start in range(0, R, 4096):  # bound the (rows, n, topics) comparison's memory
                sl = slice(start, start + 4096)
                topic[sl] = (cum[sl, None, :-1] < draw[sl, :, None]).sum(axis=2)
            count = topic_count[topic]
            within = (rng.random((R, n)) * np.maximum(count, 1)).astype(np.int64)
            personal = by_topic[np.minimum(topic_start[topic] + within, len(by_topic) - 1)]
            use = (rng.random((R, n)) < cfg.personalization) & (count > 0)
            items = np.where(use, personal, items)
        if n > 1 and n <= size:
            for _ in range(3):  # replace duplicates within a row by uniform draws
                order = np.argsort(items, axis=1, kind="stable")
                srt = np.take_along_axis(items, order, axis=1)
                dup = np.zeros_like(items, dtype=bool)
                dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
                if not dup.any():
                    break
                mask = np.zeros_like(dup)
                np.put_along_axis(mask, order, dup, axis=1)
                items = np.where(mask, draw_any(items.shape), items)
        return rng.permuted(items, axis=1) if n > 1 else items

    def candidates(self, user_id, n: int, rng: np.random.Generator, ts: float | None = None) -> list[dict]:
        """``n`` candidates for a user in the ``/v1/rank`` candidate shape (human: ``source='retrieval'``);
        in a living world, items alive at ``ts`` (default ``start_ts``)."""
        u = int(self.user_index([user_id])[0])
        t = self._times(ts, (1,))
        idx = self._retrieve(np.array([u]), min(int(n), self.config.n_items), rng, t)[0]
        return [self.candidate(int(i), ts) for i in idx]

    def candidate(self, item, ts: float | None = None) -> dict:
        """One item as a ``/v1/rank`` candidate (what a ranker may see; no latent truth); a living
        world adds the item's ``age_hours`` at ``ts``."""
        i = int(self.item_index([item])[0])
        c = int(self.item_creator[i])
        out = {
            "item_id": self.item_ids[i],
            "source": "llm" if self.item_is_llm[i] else "retrieval",
            "creator_id": self.creator_ids[c],
            "topic": self.topic_names[self.item_topic[i]],
            "text": self.item_text[i],
            "features": {"impressions": int(self.item_impressions[i]), "duration": float(self.item_duration[i]),
                         "creator_followers": int(self.creator_followers[c]),
                         "text_len": int(self.item_text_len[i])},
        }
        if self.living:
            out["features"]["age_hours"] = round(float(self.age_hours(i, self._times(ts, ())[0])), 3)
        if self.item_is_llm[i]:
            out["generator"] = {"model": self.generator_names[self.item_generator[i]],
                                "prior_score": float(self.item_prior[i])}
        return out

    def corpus_item(self, item, shift_s: float = 0.0) -> dict:
        """One item of a living world as a ``POST /v1/items`` write (human: ``source='human'``), its
        birth and expiry moved by ``shift_s`` seconds (a world replayed on the wall clock)."""
        i = int(self.item_index([item])[0])
        out = {"item_id": self.item_ids[i], "source": "llm" if self.item_is_llm[i] else "human",
               "creator_id": self.creator_ids[self.item_creator[i]],
               "topic": self.topic_names[self.item_topic[i]], "text": self.item_text[i],
               "created_at": float(self.item_born_ts[i]) + shift_s,
               "expires_at": float(self.item_expires_ts[i]) + shift_s}
        if self.item_is_llm[i]:
            out["generator"] = {"model": self.generator_names[self.item_generator[i]],
                                "prior_score": float(self.item_prior[i])}
        return out

    # ------------------------------------------------------------ closed loop

    def respond(self, user_id, slate_item_ids, rng: np.random.Generator, ts: float | None = None,
                request_id: str | None = None) -> list[dict]:
        """The user's feedback on a slate shown at ``ts`` in this order: event dicts of the shared schema
        ``{event_id, ts, type, user_id, item_id, request_id, value}`` (``value``: seconds for
        ``watch``, None otherwise). Also counts the impressions in ``item_impressions``. In a living
        world ``ts`` is also the world's time the user responds at."""
        items = self.item_index(list(slate_item_ids))
        if len(items) == 0:
            return []
        u = int(self.user_index([user_id])[0])
        ts = float(self.config.start_ts if ts is None else ts)
        rid = request_id if request_id is not None else f"r-{rng.integers(0, 2**62):x}"
        pos = np.arange(1, len(items) + 1)
        s = self._sample(np.full(len(items), u), items, pos, rng, self._times(ts, (len(items),)))
        np.add.at(self.item_impressions, items, 1)
        events = []
        for j in range(len(items)):
            item = self.item_ids[items[j]]
            click_ts = ts + float(s["click_delay"][j])
            end_ts = click_ts + float(s["watch_time"][j])
            mid_ts = click_ts + float(s["watch_time"][j]) * float(s["react_frac"][j])
            for etype, hit, ets, value in (
                    ("click", s["click"][j], click_ts, None),
                    ("like", s["like"][j], mid_ts, None),
                    ("share", s["share"][j], mid_ts + 0.5, None),
                    ("report", s["report"][j], mid_ts if s["click"][j] else ts + float(s["report_delay"][j]), None),
                    ("watch", s["click"][j], end_ts, float(s["watch_time"][j]))):
                if hit:
                    events.append({"event_id": f"{rid}-{j + 1}-{etype}", "ts": round(ets, 3), "type": etype,
                                   "user_id": self.user_ids[u], "item_id": item, "request_id": rid,
                                   "value": value})
        events.sort(key=lambda ev: ev["ts"])
        return events

    # ------------------------------------------------------------ offline logs

    def simulate_logs(self, n_impressions: int | None = None, policy: str | None = None, progress: bool = True,
                      seed: int | None = None, chunk_impressions: int = 50_000):
        """Simulate a logging policy; returns ``(impressions, events)`` DataFrames (vectorised numpy).

        ``policy='random'`` serves retrieved candidates in random order; ``'popular'`` retrieves
        ``candidates_per_request`` and serves the most popular (quality and creator popularity + noise)
        first. Same config and seed, same logs. Impressions hold the served features, the labels and
        the true probabilities (``p_*``, ``e_watch_time``); events follow the shared event schema.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        cfg = self.config
        n_imp = int(cfg.impressions if n_impressions is None else n_impressions)
        policy = cfg.policy if policy is None else policy
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if n_imp < 1:
            raise ValueError("n_impressions must be >= 1")
        seed = cfg.seed if seed is None else int(seed)
        rng = np.random.default_rng([seed, 1])
        S = min(cfg.slate_size, cfg.n_items)
        R = -(-n_imp // S)
        w = self.user_activity / self.user_activity.sum()
        req_user = rng.choice(cfg.n_users, R, p=w)
        req_ts = cfg.start_ts + np.sort(rng.random(R)) * cfg.duration_days * 86_400.0

        per_chunk = max(1, chunk_impressions // S)
        cols: dict[str, list] = {}
        starts = range(0, R, per_chunk)
        for start in _progress(starts, progress, desc="simulate", unit="chunk", total=len(starts)):
            r = np.arange(start, min(R, start + per_chunk))
            users = req_user[r]
            t = req_ts[r] if self.living else None
            if policy == "random":
                slate = self._retrieve(users, S, rng, t)
            else:
                cand = self._retrieve(users, max(cfg.candidates_per_request, S), rng, t)
                score = self._popularity[cand] + rng.gumbel(0.0, 0.5, cand.shape)
                slate = np.take_along_axis(cand, np.argsort(-score, axis=1, kind="stable")[:, :S], axis=1)
            u = np.repeat(users, S)
            i = slate.ravel()
            pos = np.tile(np.arange(1, S + 1), len(r))
            s = self._sample(u, i, pos, rng, None if t is None else np.repeat(t, S))
            chunk = {"req": np.repeat(r, S), "user": u, "item": i, "position": pos}
            for k in ("click", "like", "share", "report", "watch_time", "click_delay", "react_frac", "report_delay"):
                chunk[k] = s[k]
            for k, v in s["probs"].items():
                chunk["p_" + k] = v
            for k, v in chunk.items():
                cols.setdefault(k, []).append(v)
        col = {k: np.concatenate(v)[:n_imp] for k, v in cols.items()}
        req, u, i = col["req"], col["user"], col["item"]
        ts = req_ts[req]

        # point-in-time history: the user's last clicked items before this request (pre-sampled seed history)
        H = cfg.history_length
        if H:
            hist_rng = np.random.default_rng([seed, 2])
            users_seen = np.unique(u)
            pre = self._retrieve(users_seen, min(H, cfg.n_items), hist_rng, self._times(None, users_seen.shape))
            if pre.shape[1] < H:
                pre = np.concatenate([pre, pre[:, :1].repeat(H - pre.shape[1], axis=1)], axis=1)
            clicked = col["click"]
            key_ev = np.concatenate([users_seen.repeat(H) * (R + 1), u[clicked] * (R + 1) + req[clicked] + 1])
            item_ev = np.concatenate([pre[:, ::-1].ravel(), i[clicked]])
            order = np.argsort(key_ev, kind="stable")
            key_ev, item_ev = key_ev[order], item_ev[order]
            end = np.searchsorted(key_ev, u * (R + 1) + req + 1, side="left")
            hist = item_ev[end[:, None] - 1 - np.arange(H)[None, :]]  # most recent first
            flat = pa.array(self.item_ids, type=pa.string()).take(pa.array(hist.ravel()))
            recent = pa.ListArray.from_arrays(pa.array(np.arange(0, len(u) * H + 1, H, dtype=np.int32)), flat)
        else:
            recent = pa.array([[] for _ in range(len(u))], type=pa.list_(pa.string()))

        item_ids = pa.array(self.item_ids, type=pa.string())
        creator_ids = pa.array(self.creator_ids, type=pa.string())
        rid_all = pa.array([f"s{seed}-r{k}" for k in range(R)], type=pa.string())
        request_id = rid_all.take(pa.array(req))
        user_ids = pa.array(self.user_ids, type=pa.string()).take(pa.array(u))
        item_col = item_ids.take(pa.array(i))
        c = self.item_creator[i]
        gen = self.item_generator[i]
        gen_names = pa.array(self.generator_names + [None], type=pa.string())
        imp = pa.table({
            "request_id": request_id,
            "ts": ts,
            "user_id": user_ids,
            "item_id": item_col,
            "position": col["position"].astype(np.int64),
            "source": pa.array(np.where(self.item_is_llm[i], "llm", "retrieval")),
            "creator_id": creator_ids.take(pa.array(c)),
            "topic": pa.array(self.topic_names, type=pa.string()).take(pa.array(self.item_topic[i])),
            "text": pa.array(self.item_text, type=pa.string()).take(pa.array(i)),
            "generator": gen_names.take(pa.array(np.where(gen >= 0, gen, len(self.generator_names)))),
            "prior_score": pa.array(self.item_prior[i], from_pandas=True),
            "duration": self.item_duration[i],
            "creator_followers": self.creator_followers[c],
            "text_len": self.item_text_len[i],
            "user_recent_items": recent,
            "click": col["click"].astype(np.int8),
            "like": col["like"].astype(np.int8),
            "share": col["share"].astype(np.int8),
            "watch_time": col["watch_time"],
            "report": col["report"].astype(np.int8),
            "p_click": col["p_click"],
            "p_like": col["p_like"],
            "p_share": col["p_share"],
            "p_report": col["p_report"],
            "e_watch_time": col["p_watch"],
        })
        if self.living:  # what a ranker of a living world may see: how old the item was when served
            imp = imp.add_column(imp.schema.get_field_index("user_recent_items"), "age_hours",
                                 pa.array(np.round(self.age_hours(i, ts), 3)))

        # events: one row per feedback, ts after the impression's ts
        click_ts = ts + col["click_delay"]
        mid_ts = click_ts + col["watch_time"] * col["react_frac"]
        parts = []
        for etype, mask, ets, value in (
                ("click", col["click"], click_ts, None),
                ("like", col["like"], mid_ts, None),
                ("share", col["share"], mid_ts + 0.5, None),
                ("report", col["report"], np.where(col["click"], mid_ts, ts + col["report_delay"]), None),
                ("watch", col["click"], click_ts + col["watch_time"], col["watch_time"])):
            idx = np.flatnonzero(mask)
            parts.append((etype, idx, ets[idx], None if value is None else value[idx]))
        ev_idx = np.concatenate([p[1] for p in parts])
        ev_ts = np.round(np.concatenate([p[2] for p in parts]), 3)
        ev_type = np.concatenate([np.full(len(p[1]), k) for k, p in enumerate(parts)]).astype(np.int64)
        ev_val = np.concatenate([np.full(len(p[1]), np.nan) if p[3] is None else p[3] for p in parts])
        order = np.lexsort((ev_type, ev_idx, ev_ts))
        ev_idx, ev_ts, ev_type, ev_val = ev_idx[order], ev_ts[order], ev_type[order], ev_val[order]
        type_names = pa.array([p[0] for p in parts], type=pa.string()).take(pa.array(ev_type))
        ev_req = request_id.take(pa.array(ev_idx))
        ev_pos = pc.cast(pa.array(col["position"][ev_idx]), pa.string())
        events = pa.table({
            "event_id": pc.binary_join_element_wise(ev_req, ev_pos, type_names, "-"),
            "ts": ev_ts,
            "type": type_names,
            "user_id": user_ids.take(pa.array(ev_idx)),
            "item_id": item_col.take(pa.array(ev_idx)),
            "request_id": ev_req,
            "value": pa.array(ev_val, from_pandas=True),
        })

        # user_recent_items becomes an object column of numpy string arrays (round-trips through Parquet)
        return imp.to_pandas(), events.to_pandas()

    # ------------------------------------------------------------ truth tables

    def catalog(self):
        """Items with their latent truth (quality, harmful): for analysis and tests, never a ranker's input."""
        import pandas as pd

        g = self.item_generator
        names = np.array(self.generator_names + [None], dtype=object)
        life = {"born_ts": self.item_born_ts, "expires_ts": self.item_expires_ts} if self.living else {}
        return pd.DataFrame({
            "item_id": self.item_ids,
            "source": np.where(self.item_is_llm, "llm", "retrieval"),
            "creator_id": self.creator_ids[self.item_creator],
            "topic": np.array(self.topic_names, dtype=object)[self.item_topic],
            "generator": names[np.where(g >= 0, g, len(self.generator_names))],
            "prior_score": self.item_prior,
            "quality": self.item_quality,
            "quality_pct": self.item_quality_pct,
            "harmful": self.item_harmful,
            "duration": self.item_duration,
            "text": self.item_text,
            **life,
        })


def auc(scores, labels) -> float:
    """ROC AUC by the rank-sum formula (ties averaged); NaN when one class is missing."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=float)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def oracle_aucs(impressions) -> dict[str, float]:
    """AUC of each true probability against its sampled label (the ceiling a learned ranker can reach);
    for watch time, the AUC of the expected seconds against 'watched at all'."""
    out = {}
    for label, prob in (("click", "p_click"), ("like", "p_like"), ("share", "p_share"), ("report", "p_report")):
        out[label] = auc(impressions[prob].to_numpy(), impressions[label].to_numpy())
    out["watch_time"] = auc(impressions["e_watch_time"].to_numpy(), impressions["watch_time"].to_numpy() > 0)
    return out


def summarize(impressions, events, seconds: float | None = None) -> str:
    """A one-line summary of simulated logs."""
    rates = " ".join(f"{k} {impressions[k].mean():.4f}" for k in ("click", "like", "share", "report"))
    llm = (impressions["source"] == "llm").mean()
    took = f" in {seconds:.2f}s" if seconds is not None else ""
    return (f"{len(impressions)} impressions, {impressions['request_id'].nunique()} requests, "
            f"{len(events)} events; rates: {rates}, watch {impressions['watch_time'].mean():.2f}s/imp; "
            f"llm share {llm:.3f}{took}")


def simulate(config: WorldConfig, n_impressions: int | None = None, progress: bool = True):
    """Build the world and simulate its logs: ``(world, impressions, events, seconds)``."""
    t0 = time.perf_counter()
    world = World(config)
    imp, ev = world.simulate_logs(n_impressions, progress=progress)
    return world, imp, ev, time.perf_counter() - t0


__all__ = ["World", "auc", "oracle_aucs", "simulate", "summarize"]
