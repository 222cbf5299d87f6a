"""The sharding plan from config: types per table, and refusals before the planner runs."""

from __future__ import annotations

import pytest
import torch

from ctnet_rec.config import ConfigError, ShardingConfig
from ctnet_rec.modules.tower import Tower
from ctnet_rec.training.distributed import init_distributed
from sharding.tower import shard_model


def _plan_types(dmp) -> dict[str, str]:
    return {table: spec.sharding_type for module_plan in dmp.plan.plan.values()
            for table, spec in module_plan.items()}


def test_sharding_types_come_from_the_config(towers):
    env = init_distributed("cpu")
    sharding = ShardingConfig("row_wise", tables={"seller": "table_wise"})
    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    types = _plan_types(shard_model(model, env, 0.01, sharding=sharding))
    assert types.pop("seller") == "table_wise"
    assert set(types.values()) == {"row_wise"} and len(types) >= 4


def test_a_sharding_type_the_device_cannot_serve_is_refused_naming_the_table(towers):
    env = init_distributed("cpu")
    model = Tower(towers.cfg.features, towers.cfg.model, device=torch.device("meta"))
    with pytest.raises(ConfigError, match=r"table '\w+' cannot be table_row_wise on cpu"):
        shard_model(model, env, 0.01, sharding=ShardingConfig("table_row_wise"))
