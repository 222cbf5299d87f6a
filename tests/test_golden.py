"""Golden curves: per-period training loss and next-period AUC of a tower, CTNet and a
joint row on the tiny world at 1 rank, against `tests/golden/curves-<stack>.json`. Training
is deterministic on one process with a given number of intra-op threads (2 here, whatever
the machine: conftest's `shared_run_threads`), so any change to what a step computes (the loss, an
optimiser, the reader's order, an initialisation, the output fusion's fit) moves a number
here.

One file per set of the supported stack (docs/gpu.md): another torch and fbgemm compute the
same steps with other kernels, and their curves differ by about 1e-3 after a few periods,
far more than a change on one stack may move them. Likewise another CPU instruction set
(torch's CPU capability: its kernels and MKL's pick other code for AVX-512 than for AVX2),
whose curves differ by up to 0.03 AUC on this tiny world: a set's file may have one per
capability beside it (`curves-<set>-AVX512.json`), which that capability reads instead.

A change that is meant to move them: `python -m pytest tests/test_golden.py --update-golden`
on each set (and capability that has its own file) rewrites the file it reads and prints
every value that changed; commit them with the change. A file that no machine at hand can
rewrite (another CPU's) names the curves the change moved under "stale", with why: those are
not compared there, and the warning says so, until `--update-golden` on such a CPU records
them again."""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import fbgemm_gpu
import pytest
import torch
import torchrec

from ctnet_rec.files import read_jsonl
from ctnet_rec.training.joint import JointTrainer, joint_init
from ctnet_rec.training.loop import train_continual

from .conftest import shared_run_threads

STACK = (f"torch{torch.__version__.split('+')[0]}-fbgemm{fbgemm_gpu.__version__}"
         f"-torchrec{torchrec.__version__}")
CAPABILITY = Path(__file__).parent / "golden" / \
    f"curves-{STACK}-{torch.backends.cpu.get_cpu_capability()}.json"
GOLDEN = CAPABILITY if CAPABILITY.exists() else CAPABILITY.with_name(f"curves-{STACK}.json")
TOLERANCE = 1e-5  # float summation order across BLAS builds; a real change moves far more
KEYS = ("train_loss", "auc", "gauc", "fusion_weight")
STALE = "stale"  # curve -> why it was recorded before a change that moved it


def _curve(run: Path) -> list[dict[str, Any]]:
    """Per trained period: its loss, the next period's AUC and GAUC, the fusion weight."""
    out = []
    for m in read_jsonl(run / "metrics.jsonl"):
        row = {"period": m["period"], "train_loss": m["train_loss"]}
        row |= {k: m["eval"][k] for k in ("auc", "gauc") if m.get("eval")}
        if "fusion_weight" in m:
            row["fusion_weight"] = m["fusion_weight"]
        out.append(row)
    return out


@pytest.fixture(scope="module")
def curves(towers, transferred, tiny_world, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """The towers' and CTNet's runs of the shared fixtures; Share Bottom trained here."""
    joint = tmp_path_factory.mktemp("golden") / "joint"
    init = joint_init(towers.cfg, "Share Bottom", "A", towers.source(1), towers.target(1),
                      joint)
    with shared_run_threads():
        train_continual(towers.cfg, tiny_world, "B", [2, 3], joint, init=init,
                        trainer_cls=functools.partial(JointTrainer, model="Share Bottom",
                                                      source_domain="A"))
    return {"tower A": _curve(towers.source_run), "tower B": _curve(towers.target_run),
            "CTNet B": _curve(transferred), "Share Bottom B": _curve(joint)}


def differences(want: dict[str, list[dict[str, Any]]],
                got: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every value that differs by more than TOLERANCE, and every row or key missing."""
    out = []
    for name in sorted(want.keys() | got.keys()):
        w, g = want.get(name, []), got.get(name, [])
        if [r["period"] for r in w] != [r["period"] for r in g]:
            out.append(f"{name}: periods {[r['period'] for r in w]} -> "
                       f"{[r['period'] for r in g]}")
            continue
        for rw, rg in zip(w, g, strict=True):
            for key in KEYS:
                a, b = rw.get(key), rg.get(key)
                if (a is None) != (b is None) or (a is not None and not (
                        math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE))):
                    out.append(f"{name} period {rw['period']} {key}: {a} -> {b}")
    return out


def test_training_curves_match_the_golden_ones(curves, request):
    if request.config.getoption("--update-golden"):
        before = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        print("\n".join(differences(before, curves)) or "golden curves unchanged")
        GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
    assert GOLDEN.exists(), (f"no golden curves for this stack ({GOLDEN.name}): record them "
                             "with --update-golden")
    want = json.loads(GOLDEN.read_text())
    stale = want.pop(STALE, {})
    if stale:
        warnings.warn(f"{GOLDEN.name}: not compared, recorded before a change that moved them "
                      "(record them with --update-golden on this CPU): " +
                      "; ".join(f"{name} ({why})" for name, why in stale.items()), stacklevel=1)
    assert differences(*({k: v for k, v in c.items() if k not in stale}
                         for c in (want, curves))) == []
    assert set(stale) <= set(curves)  # only curves that exist are excused
    assert all(len(rows) >= 2 for rows in curves.values())


def test_the_comparison_catches_a_moved_value():
    curve = {"x": [{"period": 2, "train_loss": 0.5, "auc": 0.6}]}
    moved = {"x": [{"period": 2, "train_loss": 0.5, "auc": 0.6 + 2 * TOLERANCE}]}
    assert differences(curve, curve) == []
    assert differences(curve, moved) == [f"x period 2 auc: 0.6 -> {0.6 + 2 * TOLERANCE}"]
    assert differences(curve, {"x": []}) == ["x: periods [2] -> []"]
    assert differences(curve, {"x": [{"period": 2, "train_loss": 0.5}]}) == [
        "x period 2 auc: 0.6 -> None"]
