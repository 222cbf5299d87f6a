"""What one pass of `ctnet pipeline` costs as its periods pile up: a pipeline polls its data
root every `poll_seconds` for months, and each pass works out which periods are ready and done
and rewrites the status page.

For P periods of the demo config's three domains (every period marked, its runs' records
naming them all, so everything is done), on a data root in fsspec's in-memory filesystem (a
stand-in for an object store: each `find` is one listing request there): the seconds of
`Pipeline.done()` and of `status()` (which works out ready, done and what the next period
waits for), and the listing requests of one such pass.

    python benchmarks/pipeline_pass.py [--periods 250 1000 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import fsspec
from common import ROOT, write_result

from ctnet_rec.config import load_config
from ctnet_rec.data.contract import SUCCESS
from ctnet_rec.pipeline.job import Pipeline
from ctnet_rec.pipeline.status import status

RESULT = ROOT / "benchmarks" / "results" / "pipeline_pass.json"
CONFIG = ROOT / "examples" / "demo.toml"


def build(periods: int, runs: Path) -> str:
    """The data root (a URI) and the runs folder of a pipeline that has done every period."""
    cfg = load_config(CONFIG).pipeline
    memory, root = fsspec.filesystem("memory"), f"/pipeline-pass-{periods}"
    for domain in [cfg.source_domain, *cfg.targets]:
        for t in range(periods):
            memory.pipe(f"{root}/{domain}/period={t}/part-0.parquet", b"")
            memory.pipe(f"{root}/{domain}/period={t}/{SUCCESS}", b"")
    trained = {"source": range(periods)}
    for domain, model in cfg.targets.items():
        trained[f"{domain}/tower"] = range(cfg.deploy_period)
        trained[f"{domain}/{model}"] = range(cfg.deploy_period, periods)
    for run, done in trained.items():
        (runs / run).mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"period": t, "train_rows": 1000, "train_loss": 0.4}) + "\n"
                    for t in done))
    return f"memory:/{root}"


def measure(periods: int) -> dict[str, float]:
    memory = type(fsspec.filesystem("memory"))
    find, listings = memory.find, [0]

    def counted(self: object, *args: object, **kwargs: object) -> object:
        listings[0] += 1
        return find(self, *args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(load_config(CONFIG), build(periods, Path(tmp)), Path(tmp))
        memory.find = counted
        try:
            start = time.perf_counter()
            done = pipeline.done()
            done_s = time.perf_counter() - start
            start = time.perf_counter()
            status(pipeline)
            status_s = time.perf_counter() - start
        finally:
            memory.find = find
    assert done == periods - 1, done
    return {"periods": periods, "done_s": round(done_s, 3), "status_s": round(status_s, 3),
            "listings_per_pass": listings[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--periods", type=int, nargs="+", default=[250, 1000, 2000])
    args = p.parse_args()
    rows = []
    for periods in args.periods:
        rows.append(measure(periods))
        print(rows[-1])
    write_result(RESULT, "pipeline_pass", __file__, str(CONFIG), runs=rows)


if __name__ == "__main__":
    main()
