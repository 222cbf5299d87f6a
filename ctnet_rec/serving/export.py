"""`ctnet export`: a checkpoint of any kind as one self-contained inference artifact.

The artifact is a `torch.package` (`DIR/model.pt`, TorchRec's packaging for inference): the
unsharded model (a CTNet with its frozen source inside) wrapped in `Scorer`, with the source of
the model code it needs interned, so a serving process loads it with torch, torchrec and fbgemm
installed and nothing of ctnet-rec:

    importer = torch.package.PackageImporter("DIR/model.pt")
    scorer = importer.load_pickle("ctnet_export", "scorer.pkl")
    probabilities = scorer(kjt, dense)

or, from the data's raw rows (ids as in the data, behaviour lists newest first), with the id
policy, bucketing and truncation the model was trained with (`serving/requests.py`; needs
pyarrow too):

    request = importer.load_pickle("ctnet_export", "request.pkl")
    probabilities = scorer(*request([{"user_id": 7, "item_id": 42, ...}, ...]))

Why torch.package and not torch.export: the towers' SIM / ETA retrieval (top-k over jagged
behaviour lists) and the KeyedJaggedTensor inputs have data-dependent shapes that torch.export
must be told about op by op; a package keeps the eager model exactly as trained (scores equal
the checkpoint's to float rounding) and TorchRec's quantised embedding modules plug into it.

`--table-dtype fp16 | int8` swaps the embedding collections for TorchRec's quantised inference
ones (`torchrec.inference.modules.quantize_inference_model`): tables at half or a quarter of
their size, dense layers unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torch.package import PackageExporter, PackageImporter
from torchrec.modules.mc_modules import ManagedCollisionModule

from ctnet_rec.config import Config, config_from_dict
from ctnet_rec.data.batch import on_device
from ctnet_rec.data.contract import validate_periods
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.data.storage import DataRoot
from ctnet_rec.files import PathArg, file_digest
from ctnet_rec.progress import Progress
from ctnet_rec.serving.requests import RequestCodec
from ctnet_rec.training.checkpoint import CheckpointError
from ctnet_rec.training.distributed import require_device
from ctnet_rec.training.inference import open_checkpoint, say_what_is_scored, write_scores

log = logging.getLogger(__name__)

TableDtype = Literal["fp32", "fp16", "int8"]
ARTIFACT, METADATA = "model.pt", "metadata.json"
PACKAGE, RESOURCE, REQUEST = "ctnet_export", "scorer.pkl", "request.pkl"
QUANT_DTYPES = {"fp16": torch.half, "int8": torch.qint8}
# what a serving process has installed: imported by the loader, never packaged
EXTERN = ["torch", "torch.**", "torchrec", "torchrec.**", "fbgemm_gpu", "fbgemm_gpu.**",
          "numpy", "numpy.**", "pyarrow", "pyarrow.**", "fsspec", "fsspec.**"]


def unsharded_state(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """A single process's state dict of a sharded model as plain tensors: every shard of a
    table is local to the one process, assembled at its offsets."""
    out = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype)
            covered = 0
            for shard in value.local_shards():
                at = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets,
                                                           shard.metadata.shard_sizes,
                                                           strict=True))
                full[at] = shard.tensor.cpu()
                covered += shard.tensor.numel()
            if covered != full.numel():
                raise CheckpointError(f"{source}: table {key!r} is not whole in this process "
                                      f"({covered} of {full.numel()} values)")
            value = full
        elif isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def export_checkpoint(ckpt: PathArg, out: PathArg, table_dtype: TableDtype = "fp32",
                      device: str | None = None) -> Path:
    """`ckpt` as the artifact DIR/model.pt (with DIR/metadata.json beside it, also inside).
    Refuses, naming why, a checkpoint that does not load or that it cannot export."""
    ckpt, out = Path(ckpt), Path(out)
    trainer, manifest = open_checkpoint(ckpt, device=device)
    if trainer.env.world_size != 1:
        raise CheckpointError(f"{ckpt}: export runs in one process (launched with "
                              f"{trainer.env.world_size}); the checkpoint loads under any "
                              "world size")
    module = trainer.build_module(torch.device("cpu"))
    module.load_state_dict(unsharded_state(trainer.dmp.state_dict(), str(ckpt)))
    scorer = trainer.scorer(module).eval()
    for m in scorer.modules():  # managed-id maps register a local function, which does not
        if isinstance(m, ManagedCollisionModule):  # pickle; an artifact loads no state dict
            m._load_state_dict_post_hooks.clear()
    if table_dtype != "fp32":
        from torchrec.inference.modules import quantize_inference_model

        scorer = quantize_inference_model(scorer, quantization_dtype=QUANT_DTYPES[table_dtype])
    metadata = {
        "kind": manifest.kind, "trained_through_period": manifest.period,
        "trained_on_domain": manifest.model_domain(),
        "table_dtype": table_dtype, "checkpoint_digest": manifest.digest(),
        "sparse_keys": trainer.cfg.features.sparse_keys(),
        "dense": trainer.cfg.features.dense_names(),
        "inputs": "KeyedJaggedTensor of table rows (ids mapped by each table's id policy, "
                  "sequences newest first, truncated to max_len), dense float32 (batch, "
                  "len(dense)); output: click probabilities (batch,)",
        "request_columns": RequestCodec(trainer.cfg.features).columns,
        "config": dataclasses.asdict(trainer.cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metadata, indent=1, sort_keys=True)
    tmp = out / (ARTIFACT + ".tmp")
    with PackageExporter(str(tmp)) as pe:
        pe.extern(EXTERN)
        pe.intern("ctnet_rec.**")
        pe.save_text(PACKAGE, METADATA, text)
        pe.save_pickle(PACKAGE, RESOURCE, scorer)
        pe.save_pickle(PACKAGE, REQUEST, RequestCodec(trainer.cfg.features))
    digest = file_digest(tmp)
    tmp.replace(out / ARTIFACT)
    (out / METADATA).write_text(json.dumps({**metadata, "artifact_sha256": digest}, indent=1,
                                           sort_keys=True) + "\n")
    log.info("%s (%s, tables %s) exported to %s (sha256 %s: pin it where the artifact is "
             "served, e.g. `ctnet predict --export ... --sha256 %s`)", ckpt, manifest.kind,
             table_dtype, out / ARTIFACT, digest, digest)
    return out / ARTIFACT


class ExportedModel:
    """An artifact opened for scoring: its `Scorer` (from the package) and its config.

    An artifact is code (its modules run when it loads): it is opened only when its sha256 is
    the one recorded at export in DIR/metadata.json, or `sha256` when given (pinning it
    against a replaced metadata file); anything else is refused before it is read."""

    def __init__(self, folder: PathArg, sha256: str | None = None) -> None:
        folder = Path(folder)
        path = folder / ARTIFACT
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {ARTIFACT} here (make one with `ctnet export`)")
        try:
            recorded = json.loads((folder / METADATA).read_text())["artifact_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{folder / METADATA}: missing or without the artifact's "
                                  "sha256 (export it again with `ctnet export`); "
                                  f"{ARTIFACT} not loaded (an artifact runs code)") from None
        if sha256 is not None and sha256 != recorded:
            raise CheckpointError(f"{folder / METADATA}: records sha256 {recorded}, not the "
                                  f"pinned {sha256}; {ARTIFACT} not loaded")
        if file_digest(path) != recorded:
            raise CheckpointError(f"{path}: its contents differ from those exported (sha256 "
                                  "recorded in metadata.json); not loaded (an artifact runs "
                                  "code: load only artifacts from a trusted place)")
        importer = PackageImporter(str(path))
        self.metadata: dict[str, Any] = json.loads(importer.load_text(PACKAGE, METADATA))
        self.scorer = importer.load_pickle(PACKAGE, RESOURCE)
        self.config: Config = config_from_dict(self.metadata["config"])
        # artifacts of earlier versions have none: their config's reader does the same
        self.request: RequestCodec = importer.load_pickle(PACKAGE, REQUEST) \
            if REQUEST in importer.file_structure().children[PACKAGE].children \
            else RequestCodec(self.config.features)

    @torch.inference_mode()
    def __call__(self, sparse: Any, dense: torch.Tensor) -> torch.Tensor:
        return self.scorer(sparse, dense)

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities of raw rows (the data's columns; `label` and `time` optional)."""
        sparse, dense = self.request(rows)
        return self(sparse, dense).double().numpy()


def predict_export(folder: Path, data: DataRoot, domain: str, period: int, out: Path,
                   batch_size: int | None = None, sha256: str | None = None,
                   device: str = "cpu") -> int:
    """`ctnet predict --export`: `ctnet predict`'s output, scored by an exported artifact in
    this process on `device` (no process group, no sharding, inference mode). Returns the
    row count."""
    start = time.perf_counter()
    pred = score_export(folder, data, domain, period, batch_size, sha256, device)
    metadata = json.loads((folder / METADATA).read_text())  # what score_export checked
    say_what_is_scored(folder, metadata.get("trained_on_domain"),
                       metadata["trained_through_period"], domain, period, metrics=False)
    write_scores(pred, out, time.perf_counter() - start)
    return len(pred["p"])


def evaluate_export(folder: Path, data: DataRoot, domain: str, period: int) -> dict[str, Any]:
    """An exported artifact's metrics on one period (AUC, GAUC, calibration; no cold-start
    slices: an artifact keeps no record of the ids it trained on)."""
    from ctnet_rec.training.evaluate import score

    pred = score_export(folder, data, domain, period)
    return score(pred["labels"], pred["p"], pred["users"])


def score_export(folder: Path, data: DataRoot, domain: str, period: int,
                 batch_size: int | None = None, sha256: str | None = None,
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """An exported artifact's scores of a period's rows (`p`), with their labels, users and
    items, in file order."""
    require_device(device, f"--device {device}")
    model = ExportedModel(folder, sha256)
    model.scorer.to(device)
    cfg = model.config
    validate_periods(data, domain, [period], cfg.features)
    reader = ParquetBatchReader(data, domain, [period], cfg.features, cfg.data,
                                batch_size=batch_size or cfg.train.eval_batch_size,
                                shuffle=False, pin_memory=device == "cuda")
    parts: dict[str, list[np.ndarray]] = {"p": [], "labels": [], "users": [], "items": []}
    progress = Progress(len(reader), f"{domain} period {period}: scoring with {folder}", log)
    for batch, on in on_device(reader, torch.device(device)):
        progress.tick(len(batch))
        parts["p"].append(model(on.sparse, on.dense).double().cpu().numpy())
        parts["labels"].append(batch.labels.double().numpy())
        parts["users"].append(batch.user_ids.numpy())
        parts["items"].append(batch.item_ids.numpy())
    progress.close()
    return {k: np.concatenate(v) for k, v in parts.items()}
