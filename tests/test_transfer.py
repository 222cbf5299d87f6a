"""Continual transfer (Algorithm 1) end to end on the tiny world: deployment, per-period source
refresh, variants, resume, refusals, and scoring any checkpoint."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctnet_rec.cli import main
from ctnet_rec.modules.adapters import LinearAdapter
from ctnet_rec.training.checkpoint import (
    MANIFEST,
    CheckpointError,
    Manifest,
    complete_checkpoints,
    lineage_path,
)
from ctnet_rec.training.inference import open_checkpoint, predict_checkpoint
from ctnet_rec.training.output_fusion import PooledEvidence, best_weight
from ctnet_rec.training.transfer import INIT, transfer_init, transfer_run

from .conftest import shared_run_threads, two_rank_cli


def _local(t: torch.Tensor) -> torch.Tensor:
    shards = t.local_shards() if hasattr(t, "local_shards") else None
    return shards[0].tensor if shards else t


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Model tensors by key (sharded tables as their local shard), cloned."""
    return {k[len(prefix):]: _local(v).detach().clone() for k, v in state.items()
            if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optim_tensors(trainer) -> dict[str, torch.Tensor]:
    state = trainer.state()
    out = {}
    for param, entries in state["optim"]["state"].items():
        out |= {f"optim/{param}/{k}": _local(v).clone() for k, v in entries.items()}
    for param, entries in state["dense_optim"].items():
        out |= {f"dense/{param}/{k}": v.clone() for k, v in entries.items()
                if isinstance(v, torch.Tensor)}
    return out


def test_deployed_ctnet_predicts_as_the_target(towers, deployed, tiny_world):
    ctnet, manifest = open_checkpoint(deployed / INIT)
    base, _ = open_checkpoint(towers.target(1))
    got = ctnet.predict(tiny_world, "B", 2)
    want = base.predict(tiny_world, "B", 2)
    assert np.abs(got["p"] - want["p"]).max() < 1e-4
    assert not np.array_equal(got["p"], want["p"])  # the adapters are there, just small
    assert manifest.kind == "ctnet" and manifest.period == 1
    assert manifest.lineage["source_period"] == 1
    assert lineage_path(deployed / INIT, manifest.lineage["target_checkpoint"]) == \
        towers.target(1).resolve()
    # all target parameters and optimiser state reused: only the adapters are new
    want_model = _tensors(base.dmp.state_dict())
    assert _equal(_tensors(ctnet.dmp.state_dict(), "target."), want_model)
    b_optim = {k.replace("optim/", "optim/target.").replace("dense/", "dense/target."): v
               for k, v in _optim_tensors(base).items()}
    mine = {k: v for k, v in _optim_tensors(ctnet).items() if "adapters." not in k}
    assert b_optim.keys() == mine.keys() and all(torch.equal(b_optim[k], mine[k]) for k in mine)
    source, _ = open_checkpoint(towers.source(1))
    assert _equal(_tensors(ctnet.dmp.state_dict(), "source."),
                  _tensors(source.dmp.state_dict()))
    assert ctnet.seen["users"].size == base.seen["users"].size > 0


def test_source_refresh_swaps_in_the_source_and_nothing_else(towers, deployed):
    trainer, _ = open_checkpoint(deployed / INIT)
    others = _tensors({k: v for k, v in trainer.dmp.state_dict().items()
                       if not k.startswith("source.")})
    optim = _optim_tensors(trainer)
    seen = {k: v.copy() for k, v in trainer.seen.items()}
    old_source = _tensors(trainer.dmp.state_dict(), "source.")
    trainer.load_source(towers.source(3))
    new_source = _tensors(trainer.dmp.state_dict(), "source.")
    a3, _ = open_checkpoint(towers.source(3))
    assert _equal(new_source, _tensors(a3.dmp.state_dict()))
    assert not _equal(new_source, old_source)
    assert _equal(_tensors({k: v for k, v in trainer.dmp.state_dict().items()
                            if not k.startswith("source.")}), others)
    assert _equal(_optim_tensors(trainer), optim)
    assert all(np.array_equal(seen[k], trainer.seen[k]) for k in seen)
    assert trainer.source_period == 3


def test_transfer_run_refreshes_the_source_and_trains_target_and_adapters(
        towers, deployed, transferred, tiny_world):
    done = complete_checkpoints(transferred)
    assert sorted(done) == [2, 3]
    for t in (2, 3):
        m = Manifest.read(done[t])
        # Algorithm 1: training on t uses the source in service then, trained through t - 1
        assert m.kind == "ctnet" and m.lineage["source_period"] == t - 1
        assert lineage_path(done[t], m.lineage["source_checkpoint"]) == \
            towers.source(t - 1).resolve()
        assert "source." not in json.dumps(sorted(m.schema))  # the schema, not weights
    metrics = [json.loads(line) for line in (transferred / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["period"] for m in metrics] == [2, 3] and metrics[0]["eval_period"] == 3
    init, _ = open_checkpoint(deployed / INIT)
    last, _ = open_checkpoint(done[3])
    # the recorded AUC is the trained model's on period 3, counted pair by pair; the source's
    # share of it shows as a different AUC without the adapters
    p = open_checkpoint(done[2])[0].predict(tiny_world, "B", 3)["p"]
    labels = pq.read_table(tiny_world / "B" / "period=3", columns=["label"])["label"].to_numpy()
    pos, neg = p[labels == 1][:, None], p[labels == 0][None, :]
    pairs = (pos > neg).mean() + 0.5 * (pos == neg).mean()
    assert metrics[0]["eval"]["auc"] == pytest.approx(pairs, abs=1e-6)
    assert metrics[0]["eval"]["auc"] != metrics[0]["eval"]["without_adapters"]["auc"]
    before, after = init.dmp.state_dict(), last.dmp.state_dict()
    for part in ("adapters.0.value.weight", "adapters.1.gate.weight",
                 "target.mlp.linears.0.weight"):
        assert not torch.equal(before[part], after[part]), part
    tables = [k for k in after if k.startswith("target.") and "embedding" in k]
    assert any(not torch.equal(_local(before[k]), _local(after[k])) for k in tables)
    # the frozen source inside the newest CTNet is bit-identical to A's period-2 tower
    a2, _ = open_checkpoint(towers.source(2))
    assert _equal(_tensors(after, "source."), _tensors(a2.dmp.state_dict()))


def test_resume_equals_the_uninterrupted_run(towers, deployed, transferred, tiny_world,
                                             tmp_path):
    run = tmp_path / "run"
    shutil.copytree(deployed / INIT, run / INIT)
    with shared_run_threads():  # as `transferred` trained
        transfer_run(run, tiny_world, "B", [2], towers.source_run)  # "crash" after period 2
        assert transfer_run(run, tiny_world, "B", [2, 3], towers.source_run)[0]["train_rows"]
    want = [json.loads(x) for x in (transferred / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["period"] for m in got] == [2, 3]
    for w, g in zip(want, got, strict=True):
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert g.get("eval", {}).get("auc") == pytest.approx(w.get("eval", {}).get("auc"),
                                                              abs=1e-6)
    assert "eval" in got[0]
    assert transfer_run(run, tiny_world, "B", [2, 3], towers.source_run) == []


@pytest.mark.parametrize(("refresh", "adapter", "lag"), [("once", "glu", 1),
                                                         ("every_period", "linear", 0)])
def test_variants_train(towers, tiny_world, tmp_path, refresh, adapter, lag):
    cfg = copy.deepcopy(towers.cfg)
    cfg.ctnet.source_refresh, cfg.ctnet.adapter, cfg.ctnet.source_lag = refresh, adapter, lag
    run = tmp_path / "run"
    transfer_init(cfg, towers.source(1), towers.target(1), run)
    transfer_run(run, tiny_world, "B", [2, 3],
                 None if refresh == "once" else towers.source_run)
    sources = [Manifest.read(p).lineage["source_period"]
               for p in complete_checkpoints(run).values()]
    # once: the deployed source throughout; every period with lag 0: period t's own source
    assert sources == ([1, 1] if refresh == "once" else [2, 3])
    init, _ = open_checkpoint(run / INIT)
    last, _ = open_checkpoint(run / "checkpoints" / "period=3")
    net = last.dmp.module
    assert all(isinstance(a, LinearAdapter) for a in net.adapters) == (adapter == "linear")
    assert not torch.equal(init.dmp.state_dict()["adapters.0.value.weight"],
                           last.dmp.state_dict()["adapters.0.value.weight"])
    a1, _ = open_checkpoint(towers.source(sources[-1]))
    assert _equal(_tensors(last.dmp.state_dict(), "source."), _tensors(a1.dmp.state_dict()))


def test_refusals_name_the_problem(towers, deployed, tiny_world, tmp_path):
    other = copy.deepcopy(towers.cfg)
    other.features.tables[1].num_embeddings = 777
    with pytest.raises(CheckpointError, match=r"target checkpoint: .*schema differs.*777"):
        transfer_init(other, towers.source(1), towers.target(1), tmp_path / "x")
    deeper = copy.deepcopy(towers.cfg)
    deeper.model.mlp_hidden = [64, 32]
    with pytest.raises(CheckpointError, match=r"source checkpoint: .*model config differs "
                                              r"\(model\.mlp_hidden: .* vs config \[64, 32\]\)"):
        transfer_init(towers.cfg, towers.source(1), towers.target(1), tmp_path / "x", deeper)
    assert not (tmp_path / "x").exists()

    run = tmp_path / "run"
    shutil.copytree(deployed / INIT, run / INIT)
    late = tmp_path / "late"  # source checkpoints from period 2 on only
    shutil.copytree(towers.source(2), late / "checkpoints" / "period=2")
    with pytest.raises(CheckpointError, match=r"no source checkpoint of a period <= 1"):
        transfer_run(run, tiny_world, "B", [2, 3], late)
    with pytest.raises(CheckpointError, match=r"/missing: no such folder"):  # a typo
        transfer_run(run, tiny_world, "B", [2, 3], tmp_path / "missing")
    bad = tmp_path / "bad" / "period=1"  # a source checkpoint of another schema
    shutil.copytree(towers.source(1), bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["schema"]["tables"]["item"][0] = 5
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"source checkpoint: .*period=1.*schema differs"):
        transfer_run(run, tiny_world, "B", [2, 3], bad.parent)
    with pytest.raises(CheckpointError, match="needs --source-ckpts"):
        transfer_run(run, tiny_world, "B", [2, 3], None)
    assert complete_checkpoints(run) == {}  # refused before any training
    with pytest.raises(CheckpointError, match="ctnet transfer init"):
        transfer_run(tmp_path / "empty", tiny_world, "B", [2], late)


@pytest.mark.parametrize("which", ["tower", "ctnet"])
def test_predict_writes_one_score_per_row(towers, transferred, tiny_world, tmp_path, which):
    ckpt = towers.target(1) if which == "tower" else transferred / "checkpoints" / "period=3"
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--ckpt", str(ckpt), "--data", str(tiny_world), "--domain", "B",
                 "--period", "3", "--out", str(out), "--batch-size", "65536"]) == 0
    scores = pq.read_table(out)
    period = pq.read_table(tiny_world / "B" / "period=3", columns=["user_id", "item_id"])
    assert scores.column_names == ["user_id", "item_id", "label", "score"]
    assert scores["user_id"].to_pylist() == period["user_id"].to_pylist()
    assert scores["item_id"].to_pylist() == period["item_id"].to_pylist()
    s = scores["score"].to_numpy()
    assert ((s > 0) & (s < 1)).all() and s.std() > 0
    small = tmp_path / "small.parquet"  # eval mode: a row's score does not depend on its batch
    predict_checkpoint(ckpt, tiny_world, "B", 3, small, batch_size=7)
    np.testing.assert_allclose(pq.read_table(small)["score"].to_numpy(), s, atol=1e-5)


def test_fp16_source_tables_halve_the_source_and_score_within_tolerance(towers, transferred,
                                                                        tiny_world):
    """fp16 keeps about 3 significant digits of each source weight. Scores move by 1e-5 on
    average; the few rows that move more are those whose ETA retrieval changes: a SimHash
    signature bit flips when a projection is within rounding of zero (a discontinuity of the
    retrieval, not a drift)."""
    from ctnet_rec.config import ShardingConfig

    ckpt = complete_checkpoints(transferred)[3]
    fp32, _ = open_checkpoint(ckpt)
    fp16, _ = open_checkpoint(ckpt, sharding=ShardingConfig(source_table_dtype="fp16"))
    for name, trainer, size in (("fp32", fp32, 4), ("fp16", fp16, 2)):
        source = {k: _local(v) for k, v in trainer.dmp.state_dict().items()
                  if k.startswith("source.embeddings.") and k.endswith(".weight")}
        assert source and all(v.element_size() == size for v in source.values()), name
    target = [_local(v) for k, v in fp16.dmp.state_dict().items()
              if k.startswith("target.embeddings.") and k.endswith(".weight")]
    assert all(v.dtype == torch.float32 for v in target)  # the trained tables stay fp32
    diff = np.abs(fp32.predict(tiny_world, "B", 3)["p"] - fp16.predict(tiny_world, "B", 3)["p"])
    assert diff.mean() < 1e-4 and np.quantile(diff, 0.99) < 1e-3 and diff.max() < 1e-2


def test_items_only_the_source_has_seen_get_the_source_towers_learned_rows(towers, deployed):
    """Cold start, the point of the transfer: an item B never had (so B's row for it is
    still the initial one) reaches CTNet through the source tower's row, which A learned."""
    from ctnet_rec.data.ids import map_ids
    from ctnet_rec.training.checkpoint import read_seen_ids

    key = "embeddings.sequence.embeddings.item.weight"
    table = towers.cfg.features.table("item")
    policy = towers.cfg.features.id_policy
    seen_a = read_seen_ids(towers.source(1))["items"]
    seen_b = read_seen_ids(towers.target(1))["items"]
    rows_b = set(map_ids(seen_b, table.num_embeddings, policy).tolist())
    cold = [r for r in np.unique(map_ids(np.setdiff1d(seen_a, seen_b), table.num_embeddings,
                                         policy)) if r not in rows_b]
    assert len(cold) >= 20
    a, _ = open_checkpoint(towers.source(1))
    b, _ = open_checkpoint(towers.target(1))
    ctnet, _ = open_checkpoint(deployed / INIT)
    a_rows = _tensors(a.dmp.state_dict())[key][cold]
    b_rows = _tensors(b.dmp.state_dict())[key][cold]
    state = _tensors(ctnet.dmp.state_dict())
    assert torch.equal(state[f"source.{key}"][cold], a_rows)  # the source's learned rows
    assert torch.equal(state[f"target.{key}"][cold], b_rows)  # the target's, untouched
    assert (a_rows - b_rows).abs().amax(1).min() > 0  # A trained every one of them


def test_eval_with_zero_adapters_scores_the_target_tower_alone(towers, transferred, tiny_world,
                                                              tmp_path):
    """`ctnet eval --zero-adapters` = the metrics each CTNet period records as
    "without_adapters"; refused on a tower checkpoint."""
    ckpt = complete_checkpoints(transferred)[2]
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(tiny_world), "--domain", "B",
                 "--period", "3", "--zero-adapters", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    recorded = Manifest.read(ckpt).metrics["eval"]
    assert got["zero_adapters"] is True
    assert got["auc"] == pytest.approx(recorded["without_adapters"]["auc"], abs=1e-9)
    assert got["auc"] != pytest.approx(recorded["auc"], abs=1e-9)
    assert main(["eval", "--ckpt", str(towers.target(1)), "--data", str(tiny_world),
                 "--domain", "B", "--period", "2", "--zero-adapters",
                 "--out", str(tmp_path / "x.json")]) == 2


def test_a_moved_runs_folder_still_loads_its_source(towers, tiny_world, tmp_path):
    """A CTNet checkpoint names its source relative to itself: move the folder holding both
    runs and the CTNet still opens and scores as before (the old place is gone)."""
    old = tmp_path / "runs"
    shutil.copytree(towers.source(1), old / "A" / "checkpoints" / "period=1")
    transfer_init(towers.cfg, old / "A" / "checkpoints" / "period=1", towers.target(1),
                  old / "B-ctnet")
    trainer, _ = open_checkpoint(old / "B-ctnet" / INIT)
    want = trainer.predict(tiny_world, "B", 2)["p"]
    new = tmp_path / "elsewhere" / "runs"
    shutil.move(old, new)
    moved, _ = open_checkpoint(new / "B-ctnet" / INIT)
    assert moved.source_ckpt == (new / "A" / "checkpoints" / "period=1").resolve()
    np.testing.assert_array_equal(moved.predict(tiny_world, "B", 2)["p"], want)
    shutil.move(new / "A", tmp_path / "A-alone")  # the source run alone moved: named missing
    with pytest.raises(CheckpointError, match=r"the source checkpoint its lineage names, "
                                              r".*A/checkpoints/period=1, is missing"):
        open_checkpoint(new / "B-ctnet" / INIT)


def test_a_source_replaced_at_its_path_is_refused(towers, tmp_path):
    """The lineage records the source's contents, not only its path: a source retrained at
    the same place no longer opens the CTNet built on it."""
    source = tmp_path / "A" / "checkpoints" / "period=1"
    shutil.copytree(towers.source(1), source)
    transfer_init(towers.cfg, source, towers.target(1), tmp_path / "run")
    open_checkpoint(tmp_path / "run" / INIT)
    shutil.rmtree(source)
    shutil.copytree(towers.source(2), source)  # same path, other contents
    with pytest.raises(CheckpointError, match="other contents than the one it was trained with"):
        open_checkpoint(tmp_path / "run" / INIT)


def test_deploying_into_a_run_that_has_trained_is_refused(towers, deployed, tiny_world,
                                                          tmp_path):
    """Its periods would go on from their own deployment, whatever the new one says."""
    run = tmp_path / "run"
    shutil.copytree(deployed / INIT, run / INIT)
    transfer_run(run, tiny_world, "B", [2], towers.source_run, evaluate=False)
    before = (run / INIT / "manifest.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"holds checkpoints of periods \[2\], trained "
                                              "from its deployment; deploy into a new run"):
        transfer_init(towers.cfg, towers.source(0), towers.target(1), run)
    assert (run / INIT / "manifest.json").read_bytes() == before


def test_checkpoints_of_the_wrong_domain_are_refused(towers, deployed, tiny_world, tmp_path):
    """Source and target given the wrong way round, a CTNet trained for another --domain, a
    tower started from another domain's model: refused, unless said to be meant."""
    from ctnet_rec.training.loop import train_continual

    with pytest.raises(CheckpointError, match="both trained on domain 'A'"):
        transfer_init(towers.cfg, towers.source(1), towers.source(2), tmp_path / "x")
    with pytest.raises(CheckpointError, match="through period 2, after the target's 1"):
        transfer_init(towers.cfg, towers.source(2), towers.target(1), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    shutil.copytree(deployed / INIT, run / INIT)
    with pytest.raises(CheckpointError, match=r"domain 'B'.*--domain is 'C'"):
        transfer_run(run, tiny_world, "C", [2], towers.source_run)
    with pytest.raises(CheckpointError, match="trained on domain 'B', the target's own"):
        transfer_run(run, tiny_world, "B", [2], towers.target_run)
    assert not (run / "metrics.jsonl").exists()
    with pytest.raises(CheckpointError, match="trained on domain 'A'.*--allow-domain-change"):
        train_continual(towers.cfg, tiny_world, "B", [2], tmp_path / "ft", init=towers.source(1))
    train_continual(towers.cfg, tiny_world, "B", [2], tmp_path / "ft", init=towers.source(1),
                    allow_domain_change=True, evaluate=False)


def test_the_source_stays_bit_identical_at_two_ranks(towers, tiny_world, tmp_path):
    """At 2 ranks the target's batch-norm statistics are averaged at each period end; the
    frozen source's are not touched (averaging equal values still moves their last bits):
    after a period, every source tensor equals the source checkpoint's, bit for bit. The
    output fusion's weight and pooled evidence, fitted from both ranks' shares of the period,
    are the one rank's."""
    cfg = copy.deepcopy(towers.cfg)
    cfg.ctnet.output_fusion, cfg.ctnet.output_fusion_evidence = True, "pooled"
    run = tmp_path / "run"
    transfer_init(cfg, towers.source(1), towers.target(1), run)
    two_rank_cli("transfer", "run", "--run-dir", str(run), "--data", str(tiny_world), "--domain",
                 "B", "--periods", "2", "--source-ckpts", str(towers.source_run))
    after, _ = open_checkpoint(complete_checkpoints(run)[2])
    source, _ = open_checkpoint(towers.source(1))
    got, want = _tensors(after.dmp.state_dict(), "source."), _tensors(source.dmp.state_dict())
    assert any("running_mean" in k for k in got)
    assert _equal(got, want)
    init, _ = open_checkpoint(run / INIT)
    net = init.dmp.module
    parts = init.predict(tiny_world, "B", 2, outputs=lambda b: net.output_parts(b.sparse,
                                                                                b.dense))
    offset = parts["p"][:, 1].mean()
    fitted = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert fitted["fusion_offset"] == pytest.approx(offset, abs=1e-5)
    evidence = PooledEvidence().add(parts["labels"], parts["p"][:, 0], parts["p"][:, 1] - offset)
    assert fitted["fusion_weight"] == evidence.weight(cfg.ctnet.output_fusion_min_z)
    recorded = PooledEvidence.from_json(fitted["fusion_evidence"])
    assert recorded.fits == 1
    np.testing.assert_allclose(recorded.gain, evidence.gain, atol=1e-6)


def test_output_fusion_starts_as_the_target_and_fits_its_weight_before_training(
        towers, tiny_world, tmp_path):
    """`[ctnet] output_fusion`: w = 0 at deployment (CTNet scores as the target model); then
    per period t, w and c fitted on t's rows before anything trains on them, by the model as
    it stands with the source of period t - 1: with source_lag 0 (here) not t's own, which has
    seen period t (lag 1 is the two-rank test's); the served score is sigmoid(target + w
    (source - c))."""
    lag = 0
    cfg = copy.deepcopy(towers.cfg)
    cfg.ctnet.output_fusion, cfg.ctnet.source_lag = True, lag
    cfg.ctnet.output_fusion_evidence = "period"  # the pooled fit: the two-rank test's
    run = tmp_path / "run"
    transfer_init(cfg, towers.source(1), towers.target(1), run)
    init, _ = open_checkpoint(run / INIT)
    base, _ = open_checkpoint(towers.target(1))
    assert float(init.dmp.module.fusion_weight) == 0.0
    assert np.abs(init.predict(tiny_world, "B", 2)["p"]
                  - base.predict(tiny_world, "B", 2)["p"]).max() < 1e-4
    transfer_run(run, tiny_world, "B", [2, 3], towers.source_run)
    recorded = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for t, before, got in zip([2, 3], [run / INIT, run / "checkpoints" / "period=2"], recorded,
                              strict=True):
        trainer, _ = open_checkpoint(before)
        trainer.load_source(towers.source(t - 1))
        net = trainer.dmp.module
        parts = trainer.predict(tiny_world, "B", t,
                                outputs=lambda b, net=net: net.output_parts(b.sparse, b.dense))
        offset = parts["p"][:, 1].mean()
        assert got["fusion_offset"] == pytest.approx(offset, abs=1e-5), t
        assert got["fusion_weight"] == best_weight(parts["labels"], parts["p"][:, 0],
                                                   parts["p"][:, 1] - offset,
                                                   cfg.ctnet.output_fusion_min_z), t
    last, _ = open_checkpoint(run / "checkpoints" / "period=3")
    net = last.dmp.module
    w, c = float(net.fusion_weight), float(net.fusion_offset)
    parts = last.predict(tiny_world, "B", 3, outputs=lambda b: net.output_parts(b.sparse,
                                                                                b.dense))
    served = last.predict(tiny_world, "B", 3)["p"]
    np.testing.assert_allclose(served, 1 / (1 + np.exp(-(parts["p"][:, 0]
                                                           + w * (parts["p"][:, 1] - c)))),
                               atol=1e-6)


def test_ctnet_with_output_fusion_resumes_inside_a_period_as_if_never_stopped(
        towers, tiny_world, tmp_path, monkeypatch):
    """Stopped right after a mid-period checkpoint of its second period, CTNet resumes inside
    that period (the fused output's weight restored with the model and its pooled evidence
    with the manifest, neither fitted again on rows it has half trained on) and ends with the
    uninterrupted run's metrics, to 1e-6."""
    from ctnet_rec.training.transfer import CTNetTrainer

    cfg = copy.deepcopy(towers.cfg)
    cfg.ctnet.output_fusion, cfg.ctnet.output_fusion_evidence = True, "pooled"
    cfg.train.checkpoint_every_rows = 512
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for run in (whole, stopped):
        transfer_init(cfg, towers.source(1), towers.target(1), run)
    transfer_run(whole, tiny_world, "B", [2, 3], towers.source_run)

    save = CTNetTrainer._save_position

    def stop_inside_period_3(self, period, *args):
        save(self, period, *args)
        if period == 3:
            raise KeyboardInterrupt  # as a kill right after the checkpoint

    monkeypatch.setattr(CTNetTrainer, "_save_position", stop_inside_period_3)
    with pytest.raises(KeyboardInterrupt):
        transfer_run(stopped, tiny_world, "B", [2, 3], towers.source_run)
    monkeypatch.undo()
    assert sorted(complete_checkpoints(stopped)) == [2]
    assert Manifest.read(stopped / "checkpoints" / "mid-period").period == 3
    fits = []
    monkeypatch.setattr(CTNetTrainer, "fit_output_fusion",
                        lambda self, *a: fits.append(a))  # must not be called
    transfer_run(stopped, tiny_world, "B", [2, 3], towers.source_run)
    assert fits == []
    got, want = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
                 for r in (stopped, whole))
    assert [m["period"] for m in got] == [2, 3]
    for g, w in zip(got, want, strict=True):
        for key in ("train_loss", "fusion_weight", "fusion_offset"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), key
        assert g["fusion_evidence"]["fits"] == w["fusion_evidence"]["fits"]
        np.testing.assert_allclose(g["fusion_evidence"]["gain"], w["fusion_evidence"]["gain"],
                                   atol=1e-6)
        assert g.get("eval", {}).get("auc") == pytest.approx(w.get("eval", {}).get("auc"),
                                                              abs=1e-6)
    assert "eval" in got[0]  # the tiny world ends at period 3: only period 2 is tested
    assert [m["fusion_evidence"]["fits"] for m in got] == [1, 2]  # period 3 adds to period 2's


def test_the_prequential_pass_trains_the_adapters_and_nothing_else(towers, deployed,
                                                                   tiny_world):
    """`adapter_pass`: after a pass over a period, every target tensor (tables, dense
    layers, batch-norm statistics) and the tables' optimiser state are bit-identical; the
    adapters and their optimiser state have moved."""
    trainer, _ = open_checkpoint(deployed / INIT)
    before = _tensors(trainer.dmp.state_dict())
    optim_before = _optim_tensors(trainer)
    trainer.adapter_pass(tiny_world, "B", 2)
    after = _tensors(trainer.dmp.state_dict())
    optim_after = _optim_tensors(trainer)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("adapters.") for k in moved), sorted(moved)
    assert "adapters.0.value.weight" in moved
    optim_moved = {k for k in optim_before if not torch.equal(optim_before[k], optim_after[k])}
    assert optim_moved and all(k.startswith("dense/adapters.") for k in optim_moved), \
        sorted(optim_moved)
    assert trainer.dmp.module.target.training  # back in train mode for the period's pass


def test_ctnet_candidates_train_end_to_end(towers, tiny_world, tmp_path):
    """Both taps, gates, normalised states and the prequential pass together, through
    `transfer_run`: trains, saves, and restores into the same model."""
    cfg = copy.deepcopy(towers.cfg)
    cfg.ctnet.adapter_tap, cfg.ctnet.adapter_gate = "both", True
    cfg.ctnet.adapter_input_norm, cfg.ctnet.adapter_prequential_pass = True, True
    run = tmp_path / "run"
    transfer_init(cfg, towers.source(1), towers.target(1), run)
    init, _ = open_checkpoint(run / INIT)
    assert init.predict(tiny_world, "B", 3)["p"] == pytest.approx(
        open_checkpoint(towers.target(1))[0].predict(tiny_world, "B", 3)["p"], abs=1e-4)
    transfer_run(run, tiny_world, "B", [2, 3], towers.source_run)
    assert sorted(complete_checkpoints(run)) == [2, 3]
    last, _ = open_checkpoint(run / "checkpoints" / "period=3")
    state = last.dmp.state_dict()
    for key in ("adapters.0.scale", "input_adapters.1.value.weight"):
        assert not torch.equal(init.dmp.state_dict()[key], state[key]), key


def test_a_checkpoint_with_malformed_fusion_evidence_is_refused(transferred, tmp_path):
    """The pooled evidence a CTNet checkpoint records is checked when it is restored: a record
    over other weights is refused, naming the manifest and the key, before anything runs."""
    folder = tmp_path / "period=3"
    shutil.copytree(complete_checkpoints(transferred)[3], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["metrics"]["fusion_evidence"]["fits"] == 2  # the default pools
    manifest["metrics"]["fusion_evidence"] = {"gain": [0.0] * 3, "variance": [0.0] * 3,
                                              "fits": 1}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest\.json: metrics\.fusion_evidence .*"
                                              r"over 3 weights"):
        open_checkpoint(folder)
