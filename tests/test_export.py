"""`ctnet export`: every checkpoint kind as one artifact that scores as the checkpoint does,
loads where ctnet-rec cannot be imported, and refuses what it cannot export."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.package import PackageImporter

from ctnet_rec.cli import main
from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.serving.export import ARTIFACT, METADATA, ExportedModel, export_checkpoint
from ctnet_rec.training.checkpoint import CheckpointError
from ctnet_rec.training.deployments import dual_embedding_init
from ctnet_rec.training.joint import joint_init
from ctnet_rec.training.transfer import INIT, transfer_init

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["tower", "ctnet", "dual embedding", "joint (PLE)"]


@pytest.fixture(scope="module")
def checkpoints(towers, tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of each kind: the trained target tower, and the CTNet, Dual Embedding and
    joint models deployed from the trained towers (their `init`)."""
    root = tmp_path_factory.mktemp("kinds")
    src, tgt = towers.source(1), towers.target(1)
    transfer_init(towers.cfg, src, tgt, root / "ctnet")
    return {"tower": tgt, "ctnet": root / "ctnet" / INIT,
            "dual embedding": dual_embedding_init(towers.cfg, src, tgt, root / "dual"),
            "joint (PLE)": joint_init(towers.cfg, "PLE", "A", src, tgt, root / "ple")}


def _scores(path: Path) -> np.ndarray:
    return pq.read_table(path)["score"].to_numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_the_exported_model_scores_as_its_checkpoint(checkpoints, tiny_world, tmp_path, kind):
    ckpt = checkpoints[kind]
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / ARTIFACT).is_file()
    meta = json.loads((tmp_path / "x" / METADATA).read_text())
    assert meta["table_dtype"] == "fp32" and meta["sparse_keys"]
    common = ["predict", "--data", str(tiny_world), "--domain", "B", "--period", "2",
              "--batch-size", "300"]
    assert main([*common, "--ckpt", str(ckpt), "--out", str(tmp_path / "ckpt.parquet")]) == 0
    assert main([*common, "--export", str(tmp_path / "x"),
                 "--out", str(tmp_path / "export.parquet")]) == 0
    by_ckpt, by_export = (pq.read_table(tmp_path / f"{w}.parquet") for w in ("ckpt", "export"))
    assert by_export.column_names == by_ckpt.column_names
    for column in ("user_id", "item_id", "label"):
        assert by_export[column].equals(by_ckpt[column])
    np.testing.assert_allclose(_scores(tmp_path / "export.parquet"),
                               _scores(tmp_path / "ckpt.parquet"), rtol=0, atol=1e-5)
    # and from the data's raw rows as JSON, through the artifact's own id policy
    np.testing.assert_allclose(ExportedModel(tmp_path / "x").score_rows(
        raw_request(tiny_world, 2)), _scores(tmp_path / "ckpt.parquet"), rtol=0, atol=1e-5)


def test_an_artifact_says_when_it_scores_another_domain(checkpoints, tiny_world, tmp_path,
                                                        caplog):
    export_checkpoint(checkpoints["tower"], tmp_path / "x")  # B's tower
    assert json.loads((tmp_path / "x" / METADATA).read_text())["trained_on_domain"] == "B"
    # a deployed CTNet that has trained no period yet: its target tower's domain
    export_checkpoint(checkpoints["ctnet"], tmp_path / "ctnet")
    assert json.loads((tmp_path / "ctnet" / METADATA).read_text())["trained_on_domain"] == "B"
    common = ["predict", "--data", str(tiny_world), "--period", "2", "--export",
              str(tmp_path / "x")]
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--domain", "B", "--out", str(tmp_path / "b.parquet")]) == 0
        assert "trained on domain" not in caplog.text
        assert main([*common, "--domain", "A", "--out", str(tmp_path / "a.parquet")]) == 0
    assert "trained on domain 'B'; these are its scores on domain 'A'" in caplog.text


def raw_request(world: Path, period: int, rows: int | None = None) -> list[dict]:
    """B's rows of `period` as a serving client sends them: JSON, raw ids, no label."""
    table = pq.read_table(next((world / "B" / f"period={period}").glob("*.parquet")))
    if rows is not None:
        table = table.slice(0, rows)
    return [{k: v for k, v in r.items() if k != "label"}
            for r in json.loads(json.dumps(table.to_pylist()))]


@pytest.mark.parametrize("policy", ["modulo", "hash", "managed"])
def test_a_raw_request_becomes_the_readers_batch(towers, tiny_world, policy):
    """The artifact's request codec maps raw ids as training's reader does, every id
    policy: the same KeyedJaggedTensor and dense features as the reader's batch."""
    import copy

    from ctnet_rec.serving.requests import RequestCodec

    features = copy.deepcopy(towers.cfg.features)
    for t in features.tables:
        t.id_policy = policy
    want = next(iter(ParquetBatchReader(tiny_world, "B", [2], features, towers.cfg.data,
                                        batch_size=300, shuffle=False)))
    sparse, dense = RequestCodec(features)(raw_request(tiny_world, 2, 300))
    assert sparse.keys() == want.sparse.keys()
    assert torch.equal(sparse.lengths(), want.sparse.lengths())
    assert torch.equal(sparse.values(), want.sparse.values())
    assert torch.equal(dense, want.dense)
    if policy != "modulo":  # the policy is applied, not the raw ids passed on
        raw = RequestCodec(towers.cfg.features)(raw_request(tiny_world, 2, 300))[0]
        assert not torch.equal(raw.values(), sparse.values())


def test_a_bad_request_is_refused_naming_the_row_and_column(checkpoints, tiny_world, tmp_path):
    """A ValueError (the artifact's own copy of the contract's DataError) naming what is
    wrong, before anything is scored."""
    export_checkpoint(checkpoints["tower"], tmp_path / "x")
    model = ExportedModel(tmp_path / "x")
    rows = raw_request(tiny_world, 2, 3)
    assert model.score_rows(rows[:0]).shape == (0,)
    del rows[1]["user_id"]
    with pytest.raises(ValueError, match="request row 1: missing column 'user_id'"):
        model.score_rows(rows)
    rows = raw_request(tiny_world, 2, 3)
    rows[2]["item_id"] = "x"
    with pytest.raises(ValueError, match="column 'item_id' is not an integer"):
        model.score_rows(rows)
    rows = raw_request(tiny_world, 2, 3)
    seq = model.config.features.sequences[0]
    rows[0][seq.item_column] = rows[0][seq.item_column] + [1]
    with pytest.raises(ValueError, match="misaligned"):
        model.score_rows(rows)


LOADER = """
import runpy, sys
sys.modules["ctnet_rec"] = None  # any import of ctnet_rec now fails
try:
    import ctnet_rec
    raise SystemExit("ctnet_rec is importable")
except ImportError:
    pass
import torch, torchrec
from torch.package import PackageImporter
from torchrec import KeyedJaggedTensor
folder, batch_file, scores_file, request_file, serve = sys.argv[1:]
scorer = PackageImporter(folder + "/model.pt").load_pickle("ctnet_export", "scorer.pkl")
batch = torch.load(batch_file, weights_only=True)
kjt = KeyedJaggedTensor.from_lengths_sync(batch["keys"], batch["values"], batch["lengths"])
with torch.inference_mode():
    torch.save(scorer(kjt, batch["dense"]), scores_file)
# and the serving example, raw rows in, through the artifact's request codec
sys.argv = [serve, folder, request_file, "--repeat", "2"]
runpy.run_path(serve, run_name="__main__")
assert not any(m == "ctnet_rec" or m.startswith("ctnet_rec.") for m in sys.modules
               if sys.modules[m] is not None)
"""


def test_a_process_without_ctnet_rec_loads_and_scores_a_ctnet_artifact(checkpoints, towers,
                                                                        tiny_world, tmp_path):
    """The CTNet artifact (source, target and adapters) in a process where importing
    ctnet_rec fails: scores equal to the same artifact's in this process, from the model's
    input, and from raw JSON rows as examples/serve.py sends them (with its latency line)."""
    export_checkpoint(checkpoints["ctnet"], tmp_path / "x")
    batch = next(iter(ParquetBatchReader(tiny_world, "B", [2], towers.cfg.features,
                                         towers.cfg.data, batch_size=200, shuffle=False)))
    kjt = batch.sparse
    torch.save({"keys": kjt.keys(), "values": kjt.values(), "lengths": kjt.lengths(),
                "dense": batch.dense}, tmp_path / "batch.pt")
    (tmp_path / "load.py").write_text(LOADER)
    (tmp_path / "request.json").write_text(json.dumps(raw_request(tiny_world, 2, 200)))
    out = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "x"),
                          str(tmp_path / "batch.pt"), str(tmp_path / "scores.pt"),
                          str(tmp_path / "request.json"), str(ROOT / "examples" / "serve.py")],
                         check=True, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    here = ExportedModel(tmp_path / "x")(batch.sparse, batch.dense)
    there = torch.load(tmp_path / "scores.pt", weights_only=True)
    assert there.shape == (200,)
    torch.testing.assert_close(there, here, rtol=0, atol=1e-6)
    served, latency = out.stdout.strip().splitlines()[-2:]
    np.testing.assert_allclose(json.loads(served)["probabilities"], here.double().numpy(),
                               rtol=0, atol=1e-6)
    assert latency.startswith("200 rows: ") and "ms median" in latency


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantised_tables_score_close_to_fp32(checkpoints, towers, tiny_world, tmp_path, dtype):
    export_checkpoint(checkpoints["ctnet"], tmp_path / "fp32")
    export_checkpoint(checkpoints["ctnet"], tmp_path / dtype, dtype)
    full, small = ExportedModel(tmp_path / "fp32"), ExportedModel(tmp_path / dtype)
    assert small.metadata["table_dtype"] == dtype
    kinds = {type(m).__module__ for m in small.scorer.modules()}
    assert "torchrec.quant.embedding_modules" in kinds  # TorchRec's quantised modules
    batch = next(iter(ParquetBatchReader(tiny_world, "B", [2], towers.cfg.features,
                                         towers.cfg.data, batch_size=500, shuffle=False)))
    diff = (full(batch.sparse, batch.dense) - small(batch.sparse, batch.dense)).abs()
    # measured on the tiny world's CTNet (500 rows): fp16 max 5.4e-6, int8 max 7.8e-5; the
    # bounds are ~10x that, so a table left in fp32 (0) or quantised wrongly fails
    bound = {"fp16": 5e-5, "int8": 8e-4}[dtype]
    assert 0 < float(diff.max()) < bound


def test_export_refuses_what_it_cannot_load(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="manifest"):
        export_checkpoint(tmp_path, tmp_path / "x")  # no checkpoint here
    with pytest.raises(CheckpointError, match="no model.pt"):
        ExportedModel(tmp_path)


def test_one_table_of_model_kinds(checkpoints, towers, tmp_path):
    """Every kind a model can be built as has a trainer and (but a tower) a deployment in the
    one table; a checkpoint of each kind opens through it; other names are refused."""
    from ctnet_rec.config import ConfigError
    from ctnet_rec.modules.kinds import kind_names
    from ctnet_rec.training.checkpoint import Manifest
    from ctnet_rec.training.deployments import KINDS, Deployment, deploy, trainer_for
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.inference import open_checkpoint

    assert {k.split(":", 1)[0] for k in kind_names()} == set(KINDS)
    for ckpt in checkpoints.values():
        trainer, manifest = open_checkpoint(ckpt)
        assert trainer.kind == manifest.kind == Manifest.read(ckpt).kind
    env = init_distributed("cpu")
    for name in ("joint:Nope", "joint", "towr"):
        with pytest.raises(ConfigError, match="unknown model kind"):
            trainer_for(Deployment(name), towers.cfg, env)
    with pytest.raises(ConfigError, match="trained, not deployed"):
        deploy(Deployment("tower"), towers.cfg, towers.source(1), towers.target(1), tmp_path)


def _rewritten(artifact: Path, edit) -> None:
    """The artifact's zip with each member passed through `edit(name, data) -> data`."""
    import zipfile

    members = []
    with zipfile.ZipFile(artifact) as z:
        for info in z.infolist():
            members.append((info, edit(info.filename, z.read(info))))
    with zipfile.ZipFile(artifact, "w") as z:
        for info, data in members:
            z.writestr(info, data)


def test_a_tampered_artifact_is_refused_before_it_runs(checkpoints, tiny_world, tmp_path):
    """An artifact is code: one with an edited bundled module or a flipped byte is refused
    before anything in it is loaded (the edit never runs), by its recorded digest or by a
    pinned one; `ctnet predict --export` says so and exits non-zero."""
    out = tmp_path / "x"
    export_checkpoint(checkpoints["tower"], out)
    recorded = json.loads((out / METADATA).read_text())["artifact_sha256"]
    ExportedModel(out, sha256=recorded)  # intact, pinned: loads
    marker = tmp_path / "ran"

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("ctnet_rec/modules/scorer.py"):
            return data + f"\nopen({str(marker)!r}, 'w').close()\n".encode()
        return data

    _rewritten(out / ARTIFACT, edit)
    with pytest.raises(CheckpointError, match="differ from those exported"):
        ExportedModel(out)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "ctnet_rec.cli", "predict", "--export",
                           str(out), "--data", str(tiny_world), "--domain", "A", "--period",
                           "2", "--out", str(tmp_path / "p.parquet")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "differ from those exported" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    # the edit is live: opened without the check, the artifact runs it
    PackageImporter(str(out / ARTIFACT)).load_pickle("ctnet_export", "scorer.pkl")
    assert marker.exists()

    export_checkpoint(checkpoints["tower"], out)  # a flipped byte
    data = bytearray((out / ARTIFACT).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / ARTIFACT).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="differ from those exported"):
        ExportedModel(out)

    export_checkpoint(checkpoints["tower"], out)  # a truncated copy
    data = (out / ARTIFACT).read_bytes()
    (out / ARTIFACT).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="differ from those exported"):
        ExportedModel(out)

    export_checkpoint(checkpoints["tower"], out)  # metadata replaced along with the artifact
    with pytest.raises(CheckpointError, match="not the pinned"):
        ExportedModel(out, sha256="0" * 64)
    meta = json.loads((out / METADATA).read_text())
    del meta["artifact_sha256"]
    (out / METADATA).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="without the artifact's sha256"):
        ExportedModel(out)


def test_the_python_api_takes_paths_as_strings(towers, tiny_world, tmp_path):
    """What docs/python-api.md lists takes a str wherever it takes a local path (a str
    failed deep inside each of these, with AttributeError or TypeError)."""
    from ctnet_rec.training.deployments import Deployment, deploy
    from ctnet_rec.training.loop import train_continual
    from ctnet_rec.training.transfer import transfer_run

    root, world = str(tmp_path), str(tiny_world)
    source, target = str(towers.source(1)), str(towers.target(1))
    train_continual(towers.cfg, world, "B", [2], f"{root}/B", init=target, evaluate=False)
    transfer_init(towers.cfg, source, target, f"{root}/ctnet")
    transfer_run(f"{root}/ctnet", world, "B", [2], str(towers.source_run), evaluate=False)
    deploy(Deployment("dual_embedding"), towers.cfg, source, target, f"{root}/dual")
    export_checkpoint(target, f"{root}/art")
    assert len(ExportedModel(f"{root}/art").score_rows(raw_request(tiny_world, 2, 5))) == 5
