"""TensorBoard for a run (`RUN/tb/`, rank 0): training scalars every few steps, evaluation
scalars per period. Under `ctnet experiment` every model's run has its own, so
`tensorboard --logdir OUT` compares the rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TB_DIR = "tb"
EVAL_SCALARS = ("auc", "gauc", "ne", "logloss")  # and calibration: predicted / actual CTR


class TensorBoardSink:
    """Scalars of one run. Training scalars are indexed by the rows trained in the run so far
    (so a resumed run continues the curve), evaluation scalars by the trained period."""

    def __init__(self, run: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / TB_DIR))

    def training(self, rows: int, loss: float, samples_s: float, lrs: dict[str, float]) -> None:
        self.writer.add_scalar("train/loss", loss, rows)
        self.writer.add_scalar("train/samples_per_s", samples_s, rows)
        for group, lr in lrs.items():
            self.writer.add_scalar(f"train/lr/{group}", lr, rows)

    def period(self, period: int, metrics: dict[str, Any]) -> None:
        """A period's training loss and its evaluation: overall, per cold-start slice, and the
        oracle's where known; an empty slice writes nothing."""
        self.writer.add_scalar("period/train_loss", metrics["train_loss"], period)
        ev = metrics.get("eval")
        if ev:
            parts = {"eval": ev, **{f"eval/{k}": v for k, v in ev.get("slices", {}).items()}}
            if "oracle" in ev:
                parts["eval/oracle"] = ev["oracle"]
            for prefix, m in parts.items():
                for name in EVAL_SCALARS:
                    self._finite(f"{prefix}/{name}", m[name], period)
                if m["ctr_true"] > 0:
                    self._finite(f"{prefix}/calibration", m["ctr_pred"] / m["ctr_true"], period)
        self.writer.flush()

    def _finite(self, tag: str, value: float, step: int) -> None:
        if math.isfinite(value):  # an AUC of a one-class slice is NaN: not a point
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()
