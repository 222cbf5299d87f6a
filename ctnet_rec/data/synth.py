"""A synthetic continual cross-domain world: a large source domain A and small target domains
(B, C) observed period by period, written in the Parquet data contract.

The generative model, and why each default is what it is (the defaults were fixed from these
principles before any model was trained on the world; they are not tuned for any method):

Users. Every user has a unit latent interest vector ``u`` (``latent_dim`` = 16: enough room
for many distinct tastes, small enough to learn from tens of thousands of rows), a vector of
category affinities ``a`` (one standard-normal logit per category), a click bias (N(0, 0.3)),
a price sensitivity (N(1, 0.5)) and an age group (8 groups, each with a small bias). Activity
is log-normal (sigma 1): a few users are very active, most are not.

Drift. Between periods interests and affinities follow an AR(1) walk,
``u' = sqrt(1 - d^2) u + d e``, with ``d`` = ``interest_drift`` = ``category_drift`` = 0.25:
a quarter of a unit of new taste per period, so a model trained some periods ago is
measurably stale (correlation 0.97 per period, ~0.7 after ten) but never useless. This drift
is why continual training and refreshing the source tower matter.

Domains. A holds every user (``user_share`` 1.0) and every item; B and C hold a subset of the
users (30%, 20%) and of the items (30% each), as at Taobao where A covers most users and items.
Users join a domain over time (each period adds ``user_join_rate`` times the domain's initial
users: A 2%, B 5%, C 8%), so each period brings new users to the target domains, most of whom
A has already seen.

Items. Each item has a category (Zipf over categories), a seller of that category, a quality
(seller quality + item noise, both N(0, 0.3)), a log-normal price, and a latent vector
``v = normalise(centroid[category] + item_spread * noise)`` (``item_spread`` 0.5: items of a
category are alike but not identical). ``new_items_per_period`` items are born in A every
period; a target domain sees an A item one period after its birth (``new_items_from_source``
= 85% of a target domain's new items came through A first), the rest are born in the target
domain itself. Within a category, item popularity is Zipf (exponent 1.0, the classic value
for web catalogues) over a fixed random popularity rank.

Impressions. A domain's impressions go to its users in proportion to activity. The category
shown follows the user's affinities (softmax, temperature 1.0) mixed with 20% uniform
exploration; the item is, with probability ``new_item_rate``, a fresh item of that category
(A 10%, B 5%: mostly established items; C 40%: the paper's domain C has ~40% new items), else
an established item drawn by popularity. Timestamps are uniform within the period.

Clicks. ``logit = base + c (user_bias + quality) + g (user_bias'_d + quality'_d) + age_bias +
hour_effect - 0.3 * sens * z(log price) + 4 (c <u, v> + g <u, R_d v>) + w_cat a_d[category]``,
with ``a_d = c a + g a'_d``, ``g = sqrt(domain_gap)`` and ``c = sqrt(1 - domain_gap)``. Each
mixed term joins what holds on the whole platform (the user's click bias, the item's quality,
interest ``u``, category affinities ``a``) with the domain's own version of it, drawn alike
(``R_d``: a random rotation per domain; ``a'_d``: the user's own affinities in the domain,
drifting like ``a``). ``domain_gap`` is thus the domain-specific share of the click logit's
user and item terms: at 0 every domain clicks alike and a model of the large source domain
is the best model of a target domain; at 1 each domain has its own click biases and
affinities and reads the same latent user and item vectors through its own rotation, so a
domain's clicks are no function of another's, while the users, items and their latent
vectors stay the platform's (what a representation learned on A can still carry to B). The
default 0.2 keeps the domains close (A's and B's true click logits correlate about 0.8 on
random user-item pairs; 0.5 at 0.5, 0.25 at 0.8); `examples/demo.toml` sets a gap at which
A's model scores the target domains worse than their own models do, the paper's regime.
Impressions follow the domain's affinities ``a_d``; the background clicks (below) follow the
platform-wide ``a`` and ``u``. The factor 4 makes the interest term's standard deviation
about one logit unit. ``base_logit`` -3.0 gives a click rate near 15%, as in down-sampled
production logs (the other terms lift the mean: users are mostly shown categories they
like). The true probability of every row is written to
``<out>/_oracle/<domain>/period=<t>/part-0.parquet`` (``p_click``, aligned row for row), so
the best achievable AUC is known.

Behaviour sequences. Users also click across the rest of the platform (``background_clicks``
per period, scaled by activity; each pick is the best of four popular items of a category
the user likes), starting ``burn_in_periods`` before the logs do, as a long-standing platform
would. The long sequence (``long_hist_*``) holds a user's clicks in every domain and the
background; the short one (``hist_*``) holds clicks in the same domain only; both are most
recent first and hold only clicks strictly before the row's timestamp. Category affinity
drives both clicks and history, so retrieving behaviours of the target's category (SIM) is
informative.

Raw ids are scrambled 64-bit integers (negative ones included), as production ids are.
The same config and seed give the same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ctnet_rec.config import SynthConfig
from ctnet_rec.data.contract import ORACLE_COLUMN, ORACLE_DIR, mark_complete, write_parquet
from ctnet_rec.data.ids import splitmix64

log = logging.getLogger(__name__)

INTEREST_SCALE = 4.0
NUM_AGE_GROUPS = 8
CANDIDATES_PER_BACKGROUND_CLICK = 4
LOG_PRICE_MEAN = 3.0
LOG_PRICE_STD = float(np.hypot(0.7, 0.5))  # category spread, item spread
QUALITY_STD = float(np.hypot(0.3, 0.3))  # an item's quality: its seller's plus its own
_SALT = {"user": 1 << 40, "item": 2 << 40, "category": 3 << 40, "seller": 4 << 40}


def raw_ids(kind: str, index: np.ndarray) -> np.ndarray:
    """Internal indices -> scrambled int64 raw ids (a bijection per entity kind)."""
    return splitmix64(np.asarray(index, dtype=np.int64) + _SALT[kind]).view(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _zipf_rank(rng: np.random.Generator, n: np.ndarray, s: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank = r) ~ (r + 1)^-s (continuous power-law inverse CDF)."""
    u = rng.random(n.shape)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        x = (((n + 1.0) ** (1 - s) - 1.0) * u + 1.0) ** (1.0 / (1 - s))
    return np.minimum(np.floor(x).astype(np.int64) - 1, n.astype(np.int64) - 1).clip(0)


@dataclass
class _ClickLog:
    """Clicks sorted by (user, ts), searchable for "the user's clicks before time ts"."""

    keys: np.ndarray
    items: np.ndarray
    cats: np.ndarray

    @classmethod
    def empty(cls) -> _ClickLog:
        e = np.zeros(0, np.int64)
        return cls(e, e, e)

    @staticmethod
    def key(users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return (users.astype(np.int64) << 32) | ts.astype(np.int64)

    def add(self, users: np.ndarray, ts: np.ndarray, items: np.ndarray, cats: np.ndarray) -> None:
        keys = np.concatenate([self.keys, self.key(users, ts)])
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.items = np.concatenate([self.items, items])[order]
        self.cats = np.concatenate([self.cats, cats])[order]

    def before(self, users: np.ndarray, ts: np.ndarray, max_len: int) -> tuple[pa.Array, pa.Array]:
        """Each row's clicks strictly before its ts, newest first, at most max_len."""
        end = np.searchsorted(self.keys, self.key(users, ts), side="left")
        start = np.searchsorted(self.keys, self.key(users, np.zeros_like(ts)), side="left")
        lens = np.minimum(end - start, max_len)
        offsets = np.zeros(len(users) + 1, np.int32)
        np.cumsum(lens, out=offsets[1:])
        row = np.repeat(np.arange(len(users)), lens)
        pos = end[row] - 1 - (np.arange(offsets[-1]) - offsets[row])
        off = pa.array(offsets)
        return (
            pa.ListArray.from_arrays(off, pa.array(self.items[pos], pa.int64())),
            pa.ListArray.from_arrays(off, pa.array(self.cats[pos], pa.int64())),
        )


class SyntheticWorld:
    """The world's state; `run(out)` writes every period of every domain."""

    def __init__(self, cfg: SynthConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.domains = list(cfg.domains)
        rng, d, k = self.rng, cfg.latent_dim, cfg.num_categories
        n_u = cfg.num_users
        # users
        self.u = _unit(rng.standard_normal((n_u, d)))
        self.aff = rng.standard_normal((n_u, k))
        # each domain's own category affinities (a'_d) and click bias, where domains differ
        differ = cfg.domain_gap > 0
        self.own_aff = {n: rng.standard_normal((n_u, k)).astype(np.float32)
                        for n in self.domains} if differ else {}
        self.own_user_bias = {n: rng.normal(0.0, 0.3, n_u) for n in self.domains} \
            if differ else {}
        self.user_bias = rng.normal(0.0, 0.3, n_u)
        self.price_sens = rng.normal(1.0, 0.5, n_u)
        self.age = rng.integers(0, NUM_AGE_GROUPS, n_u)
        self.age_bias = rng.normal(0.0, 0.2, NUM_AGE_GROUPS)
        self.activity = rng.lognormal(0.0, 1.0, n_u)
        self.join = {}
        for name, dom in cfg.domains.items():
            member = rng.random(n_u) < dom.user_share
            # members present at period 0: 1 / (1 + rate * (periods - 1)); the rest join
            # uniformly later, so each period adds `rate` times the initial membership
            late = 1.0 - 1.0 / (1.0 + dom.user_join_rate * max(cfg.periods - 1, 0))
            join = np.where(rng.random(n_u) < late, rng.integers(1, max(cfg.periods, 2), n_u), 0)
            self.join[name] = np.where(member, join, np.iinfo(np.int64).max)
        # categories, sellers, domain rotations, hour-of-day effect
        self.cat_pop = 1.0 / (rng.permutation(k) + 1.0) ** cfg.zipf_exponent
        self.cat_pop /= self.cat_pop.sum()
        self.centroids = _unit(rng.standard_normal((k, d)))
        self.seller_quality = rng.normal(0.0, 0.3, cfg.num_sellers)
        self.cat_price = rng.normal(LOG_PRICE_MEAN, 0.7, k)
        self.rot = {n: np.linalg.qr(rng.standard_normal((d, d)))[0] for n in self.domains}
        self.hour_effect = 0.2 * np.sin(2 * np.pi * (np.arange(24) - rng.integers(24)) / 24)
        # items (grown every period)
        self.item_cat = np.zeros(0, np.int64)
        self.item_seller = np.zeros(0, np.int64)
        self.item_quality = np.zeros(0)
        self.own_quality = {n: np.zeros(0) for n in self.domains} if differ else {}
        self.item_price = np.zeros(0)
        self.item_v = np.zeros((0, d))
        self.item_pop = np.zeros(0)
        self.item_avail = {n: np.zeros(0, np.int64) for n in self.domains}
        self._new_items(cfg.num_items_initial, period=-1, home="A", from_source=False)
        # behaviour logs: all domains + background (long), and one per domain (short)
        self.long_log = _ClickLog.empty()
        self.short_log = {n: _ClickLog.empty() for n in self.domains}

    # -- entities ---------------------------------------------------------------------------

    def _new_items(self, n: int, period: int, home: str, from_source: bool) -> None:
        cfg, rng = self.cfg, self.rng
        if n <= 0:
            return
        cat = rng.choice(cfg.num_categories, n, p=self.cat_pop)
        per_cat = max(cfg.num_sellers // cfg.num_categories, 1)
        seller = (cat * per_cat + rng.integers(0, per_cat, n)) % cfg.num_sellers
        noise = rng.standard_normal((n, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)
        v = _unit(self.centroids[cat] + cfg.item_spread * noise)
        self.item_cat = np.concatenate([self.item_cat, cat])
        self.item_seller = np.concatenate([self.item_seller, seller])
        self.item_quality = np.concatenate(
            [self.item_quality, self.seller_quality[seller] + rng.normal(0.0, 0.3, n)]
        )
        self.item_price = np.concatenate(
            [self.item_price, np.exp(self.cat_price[cat] + rng.normal(0.0, 0.5, n))]
        )
        for name, own in self.own_quality.items():  # same spread as the shared quality
            self.own_quality[name] = np.concatenate([own, rng.normal(0.0, QUALITY_STD, n)])
        self.item_v = np.concatenate([self.item_v, v])
        self.item_pop = np.concatenate([self.item_pop, rng.random(n)])
        never = np.iinfo(np.int64).max
        for name, dom in self.cfg.domains.items():
            if name == home:
                avail = np.full(n, max(period, 0))
            elif from_source and name != "A":
                # an A item reaches a target domain one period after its birth
                avail = np.where(rng.random(n) < dom.item_share, period + 1, never)
            elif period < 0:
                avail = np.where(rng.random(n) < dom.item_share, 0, never)
            else:
                avail = np.full(n, never)
            self.item_avail[name] = np.concatenate([self.item_avail[name], avail])

    def _grow_catalogue(self, t: int) -> None:
        cfg = self.cfg
        self._new_items(cfg.new_items_per_period, t, home="A", from_source=True)
        f = cfg.new_items_from_source
        for name, dom in cfg.domains.items():
            if name == "A" or f >= 1.0:
                continue
            own = round(cfg.new_items_per_period * dom.item_share * (1 - f) / max(f, 1e-9))
            self._new_items(own, t, home=name, from_source=False)

    def _drift(self) -> None:
        cfg, rng = self.cfg, self.rng
        di, dc = cfg.interest_drift, cfg.category_drift
        noise = rng.standard_normal(self.u.shape) / np.sqrt(cfg.latent_dim)
        self.u = _unit(np.sqrt(1 - di**2) * self.u + di * noise)
        self.aff = np.sqrt(1 - dc**2) * self.aff + dc * rng.standard_normal(self.aff.shape)
        for own in self.own_aff.values():
            own *= np.sqrt(1 - dc**2)
            own += dc * rng.standard_normal(own.shape, dtype=np.float32)

    def _affinity(self, domain: str | None, users: np.ndarray,
                  cats: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The users' category affinities in `domain` (a_d), or platform-wide (a) for None."""
        shared = self.aff[users, cats] if isinstance(cats, np.ndarray) else self.aff[users]
        if domain is None or not self.own_aff:
            return shared
        own = self.own_aff[domain]
        own = own[users, cats] if isinstance(cats, np.ndarray) else own[users]
        gap = self.cfg.domain_gap
        return np.sqrt(1 - gap) * shared + np.sqrt(gap) * own

    # -- sampling ----------------------------------------------------------------------------

    def _sample_users(self, t: int, domain: str, n: int) -> np.ndarray:
        members = np.flatnonzero(self.join[domain] <= t)
        w = self.activity[members]
        return members[self.rng.choice(len(members), n, p=w / w.sum())]

    def _sample_categories(
        self, users: np.ndarray, available: np.ndarray, explore: float, domain: str | None
    ) -> np.ndarray:
        """Affinity-softmax categories (restricted to those with items), mixed with uniform;
        the affinities in `domain`, or platform-wide for None."""
        cfg, rng = self.cfg, self.rng
        out = np.empty(len(users), np.int64)
        mask = np.where(available, 0.0, -np.inf)
        avail_idx = np.flatnonzero(available)
        for s in range(0, len(users), 65_536):
            uu = users[s : s + 65_536]
            g = rng.gumbel(size=(len(uu), cfg.num_categories))
            out[s : s + len(uu)] = np.argmax(self._affinity(domain, uu) / cfg.category_temperature
                                          + mask + g, 1)
        explore_rows = rng.random(len(users)) < explore
        out[explore_rows] = avail_idx[rng.integers(0, len(avail_idx), explore_rows.sum())]
        return out

    def _pool(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items grouped by category, most popular first: (flat items, starts, counts)."""
        order = np.lexsort((-self.item_pop[items], self.item_cat[items]))
        flat = items[order]
        counts = np.bincount(self.item_cat[flat], minlength=self.cfg.num_categories)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return flat, starts, counts

    def _pick_items(self, cats: np.ndarray, pool: tuple[np.ndarray, ...]) -> np.ndarray:
        flat, starts, counts = pool
        rank = _zipf_rank(self.rng, counts[cats].astype(np.float64), self.cfg.zipf_exponent)
        return flat[starts[cats] + rank]

    def _logits(self, domain: str, users: np.ndarray, items: np.ndarray,
                ts: np.ndarray) -> np.ndarray:
        cfg, dom = self.cfg, self.cfg.domains[domain]
        u, v = self.u[users], self.item_v[items]
        shared = np.einsum("nd,nd->n", u, v)
        own = np.einsum("nd,nd->n", u, v @ self.rot[domain].T)
        gap = cfg.domain_gap
        taste = INTEREST_SCALE * (np.sqrt(1 - gap) * shared + np.sqrt(gap) * own)
        bias = self.user_bias[users] + self.item_quality[items]
        if self.own_quality:
            bias = np.sqrt(1 - gap) * bias + np.sqrt(gap) * (
                self.own_user_bias[domain][users] + self.own_quality[domain][items])
        z_price = (np.log(self.item_price[items]) - LOG_PRICE_MEAN) / LOG_PRICE_STD
        hour = (ts // 3600) % 24
        return (
            dom.base_logit
            + bias
            + self.age_bias[self.age[users]]
            + self.hour_effect[hour]
            - 0.3 * self.price_sens[users] * z_price
            + taste
            + cfg.category_affinity_weight
            * self._affinity(domain, users, self.item_cat[items])
        )

    def _period_ts(self, t: int, n: int) -> np.ndarray:
        cfg = self.cfg
        return cfg.start_ts + t * cfg.period_seconds + self.rng.integers(0, cfg.period_seconds, n)

    def _background(self, t: int) -> tuple[np.ndarray, ...]:
        """Clicks elsewhere on the platform (users, ts, items, categories): they only feed the
        long behaviour sequence."""
        cfg, rng = self.cfg, self.rng
        active = np.flatnonzero(self.join["A"] <= max(t, 0))
        lam = cfg.background_clicks * self.activity[active] / self.activity.mean()
        users = np.repeat(active, rng.poisson(lam))
        pool = self._pool(np.flatnonzero(self.item_avail["A"] <= max(t, 0)))
        cats = self._sample_categories(users, pool[2] > 0, explore=0.0, domain=None)
        picks = [self._pick_items(cats, pool) for _ in range(CANDIDATES_PER_BACKGROUND_CLICK)]
        cand = np.stack(picks, 1)
        score = np.einsum("nd,nkd->nk", self.u[users], self.item_v[cand])
        items = cand[np.arange(len(users)), np.argmax(score, 1)]
        ts = self._period_ts(t, len(users))
        return users, ts, raw_ids("item", items), raw_ids("category", self.item_cat[items])

    def _impressions(self, t: int, domain: str) -> dict[str, np.ndarray]:
        dom, rng = self.cfg.domains[domain], self.rng
        n = dom.impressions_per_period
        users = self._sample_users(t, domain, n)
        avail = self.item_avail[domain]
        est = self._pool(np.flatnonzero(avail < t) if t > 0 else np.flatnonzero(avail <= 0))
        fresh = self._pool(np.flatnonzero(avail == t) if t > 0 else np.zeros(0, np.int64))
        cats = self._sample_categories(users, est[2] > 0, self.cfg.category_explore, domain)
        items = self._pick_items(cats, est)
        want_fresh = (rng.random(n) < dom.new_item_rate) & (fresh[2][cats] > 0)
        if want_fresh.any():
            c = cats[want_fresh]
            flat, starts, counts = fresh
            items[want_fresh] = flat[starts[c] + rng.integers(0, counts[c])]
        ts = self._period_ts(t, n)
        order = np.argsort(ts, kind="stable")
        users, items, ts = users[order], items[order], ts[order]
        p = 1.0 / (1.0 + np.exp(-self._logits(domain, users, items, ts)))
        label = (rng.random(n) < p).astype(np.int8)
        return {"users": users, "items": items, "ts": ts, "p": p, "label": label}

    # -- writing ------------------------------------------------------------------------------

    def _table(self, domain: str, ev: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.cfg
        users, items, ts = ev["users"], ev["items"], ev["ts"]
        short_items, short_cats = self.short_log[domain].before(users, ts, cfg.short_history_max)
        long_items, long_cats = self.long_log.before(users, ts, cfg.long_history_max)
        return pa.table({
            "ts": pa.array(ts, pa.int64()),
            "label": pa.array(ev["label"], pa.int8()),
            "user_id": pa.array(raw_ids("user", users)),
            "item_id": pa.array(raw_ids("item", items)),
            "category_id": pa.array(raw_ids("category", self.item_cat[items])),
            "seller_id": pa.array(raw_ids("seller", self.item_seller[items])),
            "age_group": pa.array(self.age[users].astype(np.int64)),
            "hour": pa.array(((ts // 3600) % 24).astype(np.int64)),
            "price": pa.array(np.round(self.item_price[items], 2)),
            "hist_item_ids": short_items,
            "hist_category_ids": short_cats,
            "long_hist_item_ids": long_items,
            "long_hist_category_ids": long_cats,
        })

    def run(self, out: str | Path) -> None:
        """Write the world to `out` (which must not exist or be empty); it appears whole, or
        not at all."""
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out}: output folder exists and is not empty")
        tmp = out.with_name(out.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        cfg = self.cfg
        for t in range(-cfg.burn_in_periods, 0):
            self.long_log.add(*self._background(t))
            self._drift()
        for t in tqdm(range(cfg.periods), desc="synth periods", unit="period",
                      disable=not sys.stderr.isatty()):
            if t > 0:
                self._grow_catalogue(t)
            events = {d: self._impressions(t, d) for d in self.domains}
            clicks = [self._background(t)]
            for d, ev in events.items():
                c = ev["label"] == 1
                i = ev["items"][c]
                args = (ev["users"][c], ev["ts"][c], raw_ids("item", i),
                        raw_ids("category", self.item_cat[i]))
                self.short_log[d].add(*args)
                clicks.append(args)
            self.long_log.add(*(np.concatenate(parts) for parts in zip(*clicks, strict=True)))
            for d, ev in events.items():
                write_parquet(self._table(d, ev), tmp / d / f"period={t}" / "part-0.parquet")
                oracle = pa.table({
                    "ts": pa.array(ev["ts"], pa.int64()),
                    "user_id": pa.array(raw_ids("user", ev["users"])),
                    "item_id": pa.array(raw_ids("item", ev["items"])),
                    ORACLE_COLUMN: pa.array(ev["p"]),
                })
                write_parquet(oracle, tmp / ORACLE_DIR / d / f"period={t}" / "part-0.parquet")
            self._drift()
        meta = {"seed": self.seed, "synth": asdict(cfg)}
        (tmp / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        mark_complete(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        log.info("wrote %d periods of domains %s to %s", cfg.periods, self.domains, out)


def synthesize(cfg: SynthConfig, out: str | Path, seed: int) -> None:
    SyntheticWorld(cfg, seed).run(out)
