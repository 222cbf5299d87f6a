"""How often two distinct ids share a table row, per table, under each id policy, on the
synthetic world's whole id stream (every domain and period, every column that feeds the
table: target ids and behaviour sequences).

A collided id is one whose row some other distinct id also maps to; `collision_rate` is the
share of the table's distinct ids that are collided.

    python benchmarks/collisions.py [--config examples/demo.toml]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import DATA, ROOT, require_demo_world, write_result

from ctnet_rec.config import load_config
from ctnet_rec.data.contract import list_domains, list_periods
from ctnet_rec.data.ids import map_ids

RESULT = ROOT / "benchmarks" / "results" / "collisions.json"
POLICIES = ("modulo", "hash")


def distinct_ids(columns: list[str]) -> np.ndarray:
    seen = np.zeros(0, np.int64)
    for domain in list_domains(DATA):
        for files in list_periods(DATA, domain).values():
            for f in files:
                table = pq.read_table(f, columns=columns)
                for c in columns:
                    col = table[c]
                    if hasattr(col.type, "value_type"):
                        col = pc.list_flatten(col)
                    seen = np.union1d(seen, np.unique(col.to_numpy()))
    return seen


def collision_rate(ids: np.ndarray, rows: int, policy: str) -> float:
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
        ids = distinct_ids(columns)
        rates = {policy: round(collision_rate(ids, rows, policy), 4) for policy in POLICIES}
        tables[name] = {"rows": rows, "distinct_ids": len(ids), "columns": columns,
                        "collision_rate": rates}
        print(f"{name:<10}{rows:>10,}{len(ids):>14,}"
              + "".join(f"{rates[p]:>10.2%}" for p in POLICIES))
    write_result(RESULT, "collisions", __file__, args.config, tables=tables)


if __name__ == "__main__":
    main()
