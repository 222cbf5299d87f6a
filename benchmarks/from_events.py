"""`ctnet data from-events` at scale: a generated event log of N events (default 10 million:
200,000 users, 1,000,000 items, two domains, 30 days, one Parquet file), built into the
contract in memory and in buckets of users (`memory_rows` a fifth of the log), each in a fresh
process: wall time, events/s and peak resident memory (the log's own Parquet file is written
first, not timed).

    python benchmarks/from_events.py [--events 10000000]

Results: benchmarks/results/from_events.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from ctnet_rec.data.events import EventColumns, EventsConfig, import_events  # noqa: E402
from ctnet_rec.experiment.jobs import peak_rss_mb  # noqa: E402

DAY = 86_400


def event_log(path: Path, events: int, seed: int = 0) -> None:
    """Users, items, times over 30 days, clicks at about 20%, two surfaces, in row groups."""
    rng = np.random.default_rng(seed)
    step = 2_000_000
    writer = None
    for start in range(0, events, step):
        n = min(step, events - start)
        table = pa.table({
            "user_id": rng.integers(0, 200_000, n), "item_id": rng.integers(0, 1_000_000, n),
            "event_time": 1_714_521_600 + rng.integers(0, 30 * DAY, n),
            "clicked": (rng.random(n) < 0.2).astype(np.int8),
            "surface": pa.array(np.where(rng.random(n) < 0.85, "feed", "search")),
            "category_id": rng.integers(0, 1_000, n)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def mapping(memory_rows: int) -> EventsConfig:
    return EventsConfig(EventColumns(user="user_id", item="item_id", time="event_time",
                                     label="clicked", domain="surface", category="category_id"),
                        domains={"feed": "A", "search": "B"}, memory_rows=memory_rows)


def worker(log: Path, out: Path, memory_rows: int) -> None:
    start = time.perf_counter()
    summary = import_events([log], mapping(memory_rows), out)
    seconds = time.perf_counter() - start
    rows = sum(sum(v.values()) for v in summary["rows"].values())
    print(json.dumps({"memory_rows": memory_rows, "events": rows, "seconds": round(seconds, 1),
                      "events_per_s": round(rows / seconds),
                      "peak_rss_mb": round(peak_rss_mb()),
                      "part_files": len(list(out.rglob("*.parquet")))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "from_events.json"))
    p.add_argument("--worker", nargs=3, metavar=("LOG", "OUT", "MEMORY_ROWS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        log, out, rows = args.worker
        worker(Path(log), Path(out), int(rows))
        return
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="from-events-"))
    try:
        log = tmp / "log.parquet"
        event_log(log, args.events)
        results = []
        for memory_rows in (args.events, args.events // 5):
            out = subprocess.run([sys.executable, __file__, "--worker", str(log),
                                  str(tmp / f"out-{memory_rows}"), str(memory_rows)],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(results[-1], flush=True)
            shutil.rmtree(tmp / f"out-{memory_rows}")
        write_result(Path(args.out), "from_events", __file__, str(ROOT / "examples" /
                                                                 "events.toml"),
                     events=args.events, log_mb=round(log.stat().st_size / 1e6, 1),
                     runs=results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
