"""`ctnet data validate`: check a dataset against the contract and summarise it per period.

Every file is read once: its values are checked, then counted. A period's new-item share is
the share of its impressions whose item never appeared in an earlier period of the same
domain (in this dataset); likewise for users. Where the synthetic world's true click
probabilities are present, the oracle AUC/GAUC (the best any model can reach) is reported.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctnet_rec.config import FeatureConfig
from ctnet_rec.data.contract import (
    MIN_TRAINING_ROWS,
    DataError,
    check_content,
    check_period_schemas,
    list_domains,
    list_periods,
    period_marks,
    pieces_of,
    raw_id_column,
    read_oracle,
    read_piece,
)
from ctnet_rec.data.storage import DataRoot, join
from ctnet_rec.metrics import auc, gauc
from ctnet_rec.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PeriodSummary:
    domain: str
    period: int
    rows: int
    positive_rate: float
    users: int
    items: int
    new_user_share: float
    new_item_share: float
    oracle_auc: float | None
    oracle_gauc: float | None


def validate_domain(root: DataRoot, domain: str, features: FeatureConfig) -> list[PeriodSummary]:
    """Check every file of a domain (raises DataError) and summarise each period."""
    period_files = list_periods(root, domain)
    being_written = sorted(t for t in period_marks(root, domain)[1] if t not in period_files)
    if being_written:
        log.info("%s: period(s) %s not marked complete (no _SUCCESS, while the domain's other "
                 "periods have one): skipped, as every command skips them",
                 join(root, domain), being_written)
    check_period_schemas(period_files, features)
    seen_users = seen_items = np.zeros(0, np.int64)
    out = []
    pieces = {t: pieces_of({t: files}) for t, files in period_files.items()}
    progress = Progress(sum(len(p) for p in pieces.values()), f"validating {join(root, domain)}",
                        log, unit="row group")
    for t in period_files:
        parts = []
        for piece in pieces[t]:
            progress.tick()
            table = read_piece(piece, list(features.required_columns()))
            check_content(table, features, f"{piece.path} (row group {piece.row_group})")
            parts.append([table.column(features.label_column).to_numpy(),
                          raw_id_column(table, features.user_column),
                          raw_id_column(table, features.item_column)])
        if not parts:
            raise DataError(f"{join(root, domain)}/period={t}: empty period (0 rows)")
        labels, users, items = (np.concatenate(x) for x in zip(*parts, strict=True))
        labels = labels.astype(np.float64)
        if len(labels) < MIN_TRAINING_ROWS:  # valid, and scored as any, but not trainable
            log.warning("%s/period=%d: %d row(s), too few to train on (a training step needs "
                        "%d rows on each rank)", join(root, domain), t, len(labels),
                        MIN_TRAINING_ROWS)
        u_new = ~np.isin(users, seen_users)
        i_new = ~np.isin(items, seen_items)
        oracle = read_oracle(root, domain, t, users, items)
        out.append(PeriodSummary(
            domain=domain,
            period=t,
            rows=len(labels),
            positive_rate=float(labels.mean()),
            users=len(np.unique(users)),
            items=len(np.unique(items)),
            new_user_share=float(u_new.mean()),
            new_item_share=float(i_new.mean()),
            oracle_auc=None if oracle is None else auc(labels, oracle),
            oracle_gauc=None if oracle is None else gauc(labels, oracle, users),
        ))
        seen_users = np.union1d(seen_users, users)
        seen_items = np.union1d(seen_items, items)
    progress.close()
    return out


def validate_dataset(
    root: DataRoot, features: FeatureConfig, domains: list[str] | None = None
) -> list[PeriodSummary]:
    domains = domains or list_domains(root)
    if not domains:
        raise DataError(f"{root}: no domain folders found")
    return [s for d in domains for s in validate_domain(root, d, features)]


def format_summary(rows: list[PeriodSummary]) -> str:
    head = (f"{'domain':<7}{'period':>7}{'rows':>10}{'pos rate':>10}{'users':>8}{'items':>8}"
            f"{'new users':>11}{'new items':>11}{'oracle AUC':>12}{'oracle GAUC':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        oa = "" if r.oracle_auc is None else f"{r.oracle_auc:.4f}"
        og = "" if r.oracle_gauc is None else f"{r.oracle_gauc:.4f}"
        lines.append(
            f"{r.domain:<7}{r.period:>7}{r.rows:>10,}{r.positive_rate:>10.3f}{r.users:>8,}"
            f"{r.items:>8,}{r.new_user_share:>11.1%}{r.new_item_share:>11.1%}{oa:>12}{og:>13}"
        )
    return "\n".join(lines)


def summary_records(rows: list[PeriodSummary]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
