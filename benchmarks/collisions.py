"""How often two distinct ids share a table row, per table, under each id policy, on the
synthetic world's whole id stream (every domain and period, every column that feeds the
table: target ids and behaviour sequences).

A collided id is one whose row some other distinct id also maps to; `collision_rate` is the
share of the table's distinct ids that are collided. For "managed" (TorchRec's managed-collision
module with the period eviction policy of the config), the ids are fed in training order,
period by period (all domains into one table: more distinct ids than any one tower sees), and a
collided id is one that had to share the table's last row at least once (no free row, none
expired).

    python benchmarks/collisions.py [--config examples/demo.toml]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from common import DATA, ROOT, require_demo_world, write_result
from torchrec.modules.mc_modules import MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import load_config
from ctnet_rec.data.contract import list_domains, list_periods
from ctnet_rec.data.ids import MANAGED_ID_RANGE, map_ids
from ctnet_rec.modules.id_mapping import PeriodEvictionPolicy, set_period

RESULT = ROOT / "benchmarks" / "results" / "collisions.json"
POLICIES = ("modulo", "hash", "managed")
CHUNK = 65_536  # ids per managed-collision call, about one training batch of the demo


def id_stream(columns: list[str]) -> list[tuple[int, np.ndarray]]:
    """(period, the ids of one Parquet file, in order) over every domain, by period."""
    stream = []
    for domain in list_domains(DATA):
        for period, files in list_periods(DATA, domain).items():
            for f in files:
                table = pq.read_table(f, columns=columns)
                cols = [pc.list_flatten(table[c]) if hasattr(table[c].type, "value_type")
                        else table[c] for c in columns]
                stream.append((period, np.concatenate([c.to_numpy() for c in cols])))
    return sorted(stream, key=lambda x: x[0])


def managed_collision_rate(stream: list[tuple[int, np.ndarray]], rows: int,
                           evict_after_periods: int) -> float:
    mapper = MCHManagedCollisionModule(
        zch_size=rows, device=torch.device("cpu"), input_hash_size=MANAGED_ID_RANGE,
        eviction_policy=PeriodEvictionPolicy(evict_after_periods), eviction_interval=1)
    shared_row, collided, distinct = rows - 1, [], []
    for period, ids in stream:
        set_period(mapper, period)
        mixed = map_ids(ids, rows, "managed")
        for at in range(0, len(mixed), CHUNK):
            chunk = torch.from_numpy(mixed[at:at + CHUNK])
            jt = JaggedTensor(values=chunk, lengths=torch.ones(len(chunk), dtype=torch.int32))
            out = mapper({"t": jt})["t"].values()
            collided.append(np.unique(chunk[out == shared_row].numpy()))
            distinct.append(np.unique(chunk.numpy()))
    return len(np.unique(np.concatenate(collided))) / len(np.unique(np.concatenate(distinct)))


def collision_rate(ids: np.ndarray, rows: int, policy: str) -> float:
    """A fixed mapping: which distinct ids share a row."""
    mapped = map_ids(ids, rows, policy)
    _, inverse, counts = np.unique(mapped, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "demo.toml"))
    args = p.parse_args()
    require_demo_world()
    cfg = load_config(args.config)
    tables = {}
    print(f"{'table':<10}{'rows':>10}{'distinct ids':>14}" + "".join(f"{p:>10}" for p in POLICIES))
    for name, columns in cfg.features.columns_by_table().items():
        rows = cfg.features.table(name).num_embeddings
        stream = id_stream(columns)
        ids = np.unique(np.concatenate([x for _, x in stream]))
        rates = {policy: round(collision_rate(ids, rows, policy), 4) for policy in POLICIES[:2]}
        rates["managed"] = round(managed_collision_rate(
            stream, rows, cfg.features.evict_after_periods), 4)
        tables[name] = {"rows": rows, "distinct_ids": len(ids), "columns": columns,
                        "collision_rate": rates}
        print(f"{name:<10}{rows:>10,}{len(ids):>14,}"
              + "".join(f"{rates[p]:>10.2%}" for p in POLICIES))
    write_result(RESULT, "collisions", __file__, args.config, tables=tables)


if __name__ == "__main__":
    main()
