"""`ctnet plan`: TorchRec's sharding plan for a config on a cluster that is not here.

The model is built on the meta device (nothing is allocated), the topology is described, not
joined (no process group), and TorchRec's planner places the tables with the same
constraints and optimisers the training jobs use. Per rank it reports the planner's memory
estimate split into table weights, optimiser state and the rest (the lookups' input and
output buffers). A plan that cannot fit names the tables that cannot, and by how much."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torchrec
from torch import nn
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import (
    KernelConfig,
    PlannerError,
    ShardingOption,
    Stats,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.modules.mc_embedding_modules import BaseManagedCollisionEmbeddingCollection

from ctnet_rec.config import Config, ConfigError
from ctnet_rec.modules.kinds import CTNET, TOWER, ModelSpec, build_module, frozen_part
from sharding.tower import (
    planner_for,
    prepare_for_planning,
    sharders,
    table_constraints,
)

GiB = 1024**3
MiB = 1024**2


def size_text(n: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever shows them with a digit before the point: a
    small table's need is not shown as 0.0 GiB."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB")):
        if abs(n) >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n / 1024:.1f} KiB"


@dataclass
class Placement:
    """One table of the plan."""

    module: str
    table: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    frozen: bool


@dataclass
class RankMemory:
    """One rank, in bytes: what its table shards hold (weights, optimiser state) and the
    planner's estimate of where they sit (device memory, host memory). `other` is the rest of
    the estimate: lookup buffers and, with uvm caching, the device's cache of host rows.
    `id_maps`: the managed tables' id-to-row maps (int64 buffers per row, on the device), which
    the planner does not count; `total` adds them."""

    weights: int = 0
    optimizer: int = 0
    hbm: int = 0
    ddr: int = 0
    id_maps: int = 0

    @property
    def total(self) -> int:
        return self.hbm + self.ddr + self.id_maps

    @property
    def other(self) -> int:
        return max(0, self.hbm + self.ddr - self.weights - self.optimizer)


@dataclass
class Plan:
    world_size: int
    device: str
    capacity: int  # bytes per rank the planner may use (HBM on cuda, DDR on cpu)
    tables: list[Placement] = field(default_factory=list)
    ranks: list[RankMemory] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def managed(self) -> bool:
        return any(r.id_maps for r in self.ranks)


class PlanDoesNotFit(ConfigError):
    """The tables cannot be placed on the described cluster (the message says which)."""


class _BestPlan(Stats):
    """Keeps the planner's chosen sharding options (the public way to see its estimates)."""

    def __init__(self) -> None:
        self.options: list[ShardingOption] = []

    def log(self, sharding_plan: Any, topology: Topology, batch_size: int,
            storage_reservation: Any, num_proposals: int, num_plans: int, run_time: float,
            best_plan: list[ShardingOption], *args: Any, **kwargs: Any) -> None:
        self.options = list(best_plan)


def _model(cfg: Config, source_cfg: Config | None, kind: str) -> tuple[nn.Module,
                                                                       nn.Module | None]:
    try:
        net = build_module(ModelSpec(kind, cfg, source_cfg), torch.device("meta"))
    except ValueError as e:
        raise ConfigError(f"ctnet plan: {e}") from None
    return net, frozen_part(net)


def _storage(shard: Any, device: str) -> int:
    return shard.storage.hbm if device == "cuda" else shard.storage.ddr


def _optimizer_bytes(option: ShardingOption, rows: int) -> int:
    """Fused row-wise AdaGrad keeps one fp32 per row; the frozen tables' SGD keeps none."""
    classes = getattr(option.tensor, "_optimizer_classes", [None])
    return 4 * rows if classes[0] is torchrec.optim.RowWiseAdagrad else 0


def _id_map_bytes_per_row(model: nn.Module) -> dict[tuple[str, str], int]:
    """(collection path, table) -> bytes per row of its managed-collision module's buffers."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, BaseManagedCollisionEmbeddingCollection):
            for table, mc in m._managed_collision_collection._managed_collision_modules.items():
                rows = mc.output_size()
                out[(path, table)] = sum(b.element_size() for _, b in mc.named_buffers()
                                         if b.dim() == 1 and b.numel() == rows)
    return out


def plan_tables(cfg: Config, world_size: int, device: str, hbm_gb: float, ddr_gb: float,
                local_world_size: int | None = None,
                source_cfg: Config | None = None, kind: str | None = None) -> Plan:
    """Plan the tables of a model of `kind` (modules/kinds.py; default: `cfg`'s tower, or with
    `source_cfg` CTNet with that source tower, whose tables are read-only) for `world_size`
    ranks of `hbm_gb` / `ddr_gb` each."""
    start = time.perf_counter()
    kind = kind or (CTNET if source_cfg is not None else TOWER)
    model, frozen = _model(cfg, source_cfg, kind)
    prepare_for_planning(model, cfg.sharding, device, world_size, cfg.train.tables.lr, frozen)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size,
                                      local_world_size=local_world_size or min(world_size, 8),
                                      hbm_cap_bytes=int(hbm_gb * GiB),
                                      ddr_cap_bytes=int(ddr_gb * GiB)),
        kernel_config=KernelConfig(compute_device=device))
    constraints = table_constraints(model, cfg.sharding)
    best = _BestPlan()
    planner = planner_for(topology, constraints, stats=best, batch_size=cfg.data.batch_size)
    capacity = int((hbm_gb if device == "cuda" else ddr_gb) * GiB)
    try:
        planner.plan(model, sharders())
    except PlannerError:
        raise PlanDoesNotFit(_why_not(model, topology, constraints, device, capacity,
                                      cfg.data.batch_size)) from None
    frozen_tables = {id(p) for p in frozen.parameters()} if frozen is not None else set()
    id_map_bytes = _id_map_bytes_per_row(model)
    plan = Plan(world_size, device, capacity, ranks=[RankMemory() for _ in range(world_size)])
    for option in best.options:
        rows, dim = option.tensor.shape
        plan.tables.append(Placement(
            option.path, option.name, rows, dim, option.sharding_type,
            option.compute_kernel, sorted({s.rank for s in option.shards if s.rank is not None}),
            id(option.tensor) in frozen_tables))
        for shard in option.shards:
            rows, cols = shard.size
            weights = rows * cols * option.tensor.element_size()
            opt = _optimizer_bytes(option, rows)
            mem = plan.ranks[shard.rank]
            mem.weights += weights
            mem.optimizer += opt
            mem.hbm += shard.storage.hbm
            mem.ddr += shard.storage.ddr
            mem.id_maps += rows * id_map_bytes.get((option.path, option.name), 0)
    plan.seconds = time.perf_counter() - start
    return plan


def _why_not(model: nn.Module, topology: Topology, constraints: dict[str, Any], device: str,
             capacity: int, batch_size: int) -> str:
    """Which tables cannot fit even in their smallest shards, or the total that cannot."""
    options = EmbeddingEnumerator(topology, batch_size=batch_size,
                                  constraints=constraints).enumerate(model, sharders())
    smallest: dict[str, int] = {}
    total: dict[str, int] = {}
    for option in options:
        largest_shard = max(_storage(s, device) for s in option.shards)
        name = f"{option.path}.{option.name}"
        if largest_shard < smallest.get(name, 1 << 62):
            smallest[name] = largest_shard
            total[name] = sum(_storage(s, device) for s in option.shards)
    where = "HBM" if device == "cuda" else "DDR"
    over = [f"{name} ({_types(constraints, name)}): its largest shard needs "
            f"{size_text(need)}, a rank has {size_text(capacity)} of {where} "
            f"({size_text(need - capacity)} over)"
            for name, need in smallest.items() if need > capacity]
    if over:
        return "the plan cannot fit: " + "; ".join(over)
    need = sum(total.values())
    have = capacity * topology.world_size
    return (f"the plan cannot fit: the tables need {size_text(need)} of {where} in all, "
            f"{topology.world_size} ranks have {size_text(have)} ({size_text(need - have)} "
            "over, before the planner's reservation for other memory)")


def _types(constraints: dict[str, Any], name: str) -> str:
    table = name.rsplit(".", 1)[1]
    return ", ".join(constraints[table].sharding_types)


def format_plan(plan: Plan, top: int = 8) -> str:
    """The plan as text: one line per table, then the ranks (all of them up to `top`, else
    the `top` fullest)."""
    lines = [f"{'table':<44} {'rows x dim':>18} {'sharding':<15} {'kernel':<17} ranks"]
    for t in plan.tables:
        ranks = _span(t.ranks)
        name = f"{t.module}.{t.table}" + (" (frozen)" if t.frozen else "")
        lines.append(f"{name:<44} {f'{t.rows:,} x {t.dim}':>18} {t.sharding_type:<15} "
                     f"{t.compute_kernel:<17} {ranks}")
    where = "HBM" if plan.device == "cuda" else "DDR"
    order = sorted(range(plan.world_size), key=lambda r: -plan.ranks[r].total)
    # the fullest rank's unit, so a small plan's figures are not all 0.00
    unit, name = (GiB, "GiB") if plan.ranks[order[0]].total >= GiB else (MiB, "MiB")
    lines += ["", f"per rank, {name} ({size_text(plan.capacity)} of {where} each; planner's "
              "estimate of where the tables sit)",
              f"{'rank':>5} {'weights':>9} {'optimizer':>10} {'other':>8} {'HBM':>8} {'DDR':>8}"
              + (f" {'id maps':>8}" if plan.managed else "")]
    for r in sorted(order[:top]) if plan.world_size > top else range(plan.world_size):
        m = plan.ranks[r]
        lines.append(f"{r:>5} {m.weights / unit:>9.2f} {m.optimizer / unit:>10.2f} "
                     f"{m.other / unit:>8.2f} {m.hbm / unit:>8.2f} {m.ddr / unit:>8.2f}"
                     + (f" {m.id_maps / unit:>8.2f}" if plan.managed else ""))
    if plan.world_size > top:
        lines.append(f"(the {top} fullest of {plan.world_size} ranks)")
    if plan.managed:
        lines.append("id maps: the managed tables' id-to-row maps, on the device, which the "
                     "planner does not count")
    total = sum(m.total for m in plan.ranks)
    lines.append(f"all ranks: {size_text(total)}; planned in {plan.seconds:.1f} s")
    return "\n".join(lines)


def _span(ranks: Sequence[int]) -> str:
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
