"""The adapter sweep's bookkeeping: candidates become configs, gains are paired per (seed,
period), and finished sweeps print as one table."""

from __future__ import annotations

import pytest

from ctnet_rec.experiment.adapter_sweep import (
    CANDIDATES,
    candidate_config,
    markdown,
    summarise,
)
from ctnet_rec.experiment.significance import paired_interval


def test_every_candidate_is_a_valid_config(demo_config):
    for name, (_, opt) in CANDIDATES.items():
        cfg = candidate_config(demo_config, name)
        assert cfg.ctnet.adapter_optimizer.lr == opt["lr"], name
        assert cfg.ctnet.adapter_optimizer.warmup_steps == opt.get("warmup_steps", 0)


def _metrics(auc: float) -> dict:
    return {"auc": auc, "gauc": auc - 0.1, "rows": 100}


def test_gains_are_seed_means_over_the_test_periods():
    name = next(iter(CANDIDATES))
    by_seed = {}
    for s in range(2):
        per = {"Base": {}, name: {}}
        for t in (6, 7):
            per["Base"][t] = _metrics(0.6 + 0.01 * s + 0.001 * t)
            per[name][t] = {**_metrics(0.6 + 0.01 * s + 0.002 * t),
                            "without_adapters": _metrics(0.6)}
        by_seed[s] = {"B": per}
    (row,) = summarise(by_seed, [name])
    gains = [(0.006 + 0.007) / 2 for _ in range(2)]  # each seed's mean over its periods
    assert row["ctnet_auc"] == pytest.approx(paired_interval(gains))
    assert row["worst_period_auc"] == pytest.approx(0.006)
    table = markdown({"X": {"summary": [row]}})
    assert table.splitlines()[0] == "| adapters' optimiser | X B |"
    assert f"| {name} | +0.0065 [" in table
