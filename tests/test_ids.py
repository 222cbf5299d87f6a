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
    np.testing.assert_array_equal(map_ids(EXTREMES, 97, "hash"), map_ids(EXTREMES, 97, "hash"))


def test_splitmix64_is_a_bijection_sample():
    x = np.arange(-50_000, 50_000, dtype=np.int64)
    assert len(np.unique(splitmix64(x))) == len(x)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown id_policy"):
        map_ids(EXTREMES, 10, "lsh")
