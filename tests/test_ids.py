from __future__ import annotations

import numpy as np
import pytest

from ctnet_rec.data.ids import map_ids, map_ids_, splitmix64

EXTREMES = np.array([-(2**63), -(2**63) + 1, -1, 0, 1, 2**62, 2**63 - 2, 2**63 - 1], np.int64)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2**31 - 1, 2**40 + 3, 2**62])
def test_modulo_is_floor_modulo_for_extreme_ids(n):
    rows = map_ids(EXTREMES, n, "modulo")
    assert rows.tolist() == [int(x) % n for x in EXTREMES.tolist()]


def test_modulo_in_place_on_random_ids():
    x = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 100_000, endpoint=True)
    expected = np.mod(x, 12345)
    out = x.copy()
    assert map_ids_(out, 12345, "modulo") is out
    np.testing.assert_array_equal(out, expected)


def test_hash_policy_in_range_and_spreads_structured_ids():
    ids = np.arange(0, 1000 * 4096, 4096, dtype=np.int64)  # all == 0 mod 4096
    assert len(np.unique(map_ids(ids, 4096, "modulo"))) == 1
    rows = map_ids(ids, 4096, "hash")
    assert rows.min() >= 0 and rows.max() < 4096
    assert len(np.unique(rows)) > 800  # ~ 4096 * (1 - exp(-1000/4096)) = 889 expected
    want = [_splitmix64_reference(int(x)) % 97 for x in EXTREMES.tolist()]
    assert map_ids(EXTREMES, 97, "hash").tolist() == want


def _splitmix64_reference(x: int) -> int:
    """SplitMix64 (Steele, Lea & Flood 2014) in Python integers, independent of numpy."""
    mask = 2**64 - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference():
    assert _splitmix64_reference(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output, seed 0
    assert splitmix64(EXTREMES).tolist() == [_splitmix64_reference(int(x) % 2**64)
                                             for x in EXTREMES.tolist()]


def test_splitmix64_is_a_bijection_sample():
    x = np.arange(-50_000, 50_000, dtype=np.int64)
    assert len(np.unique(splitmix64(x))) == len(x)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown id_policy"):
        map_ids(EXTREMES, 10, "lsh")
