"""Serve an exported artifact: raw rows of the data's columns in, click probabilities out,
in a process that imports nothing of ctnet-rec (torch, torchrec, fbgemm and pyarrow only).

    ctnet export --ckpt RUN/checkpoints/period=<t> --out DIR
    python examples/serve.py DIR request.json [--repeat 50]

request.json is a list of rows as the data holds them (raw ids, behaviour lists newest
first; `label` and `time` may be left out), e.g. written from a Parquet period with
`json.dumps(pyarrow.parquet.read_table(path).slice(0, 64).to_pylist())`. The artifact's
request codec (`request.pkl`) maps them with the id policy, bucketing and truncation the
model was trained with. Prints the probabilities and the request's latency (median and
slowest of --repeat, after one untimed call), codec and model together.
"""

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch.package import PackageImporter


def open_artifact(folder: Path, sha256: str | None = None) -> PackageImporter:
    """The artifact, once its sha256 is the one recorded at export (or `sha256`, pinned):
    loading a package runs its code, so nothing else is ever opened."""
    recorded = json.loads((folder / "metadata.json").read_text())["artifact_sha256"]
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    if digest != recorded or sha256 not in (None, recorded):
        raise SystemExit(f"{folder / 'model.pt'}: sha256 {digest}, expected "
                         f"{sha256 or recorded}; not loaded")
    return PackageImporter(str(folder / "model.pt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="the folder `ctnet export --out` wrote")
    p.add_argument("request", type=Path, help="a JSON list of raw rows")
    p.add_argument("--sha256", help="the artifact's digest, pinned")
    p.add_argument("--repeat", type=int, default=50, help="requests timed")
    args = p.parse_args()
    importer = open_artifact(args.artifact, args.sha256)
    scorer = importer.load_pickle("ctnet_export", "scorer.pkl")
    request = importer.load_pickle("ctnet_export", "request.pkl")
    rows = json.loads(args.request.read_text())
    seconds = []
    with torch.inference_mode():
        scorer(*request(rows))  # the first call's one-off set-up is not a request's cost
        for _ in range(max(args.repeat, 1)):
            start = time.perf_counter()
            probabilities = scorer(*request(rows))
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"probabilities": [round(x, 6) for x in probabilities.tolist()]}))
    print(f"{len(rows)} rows: {1000 * statistics.median(seconds):.2f} ms median, "
          f"{1000 * max(seconds):.2f} ms slowest of {len(seconds)} requests "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
