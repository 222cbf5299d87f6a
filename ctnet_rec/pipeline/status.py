"""The pipeline's status, for a person: RUNS/status.json and a static RUNS/status.html (inline
SVG plots, no script, nothing fetched), both rebuilt from the records on disk after every
step, so they never disagree with what was done."""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctnet_rec.files import write_atomic
from ctnet_rec.pipeline.gate import calibration
from ctnet_rec.pipeline.serving import served
from ctnet_rec.training.checkpoint import Manifest, complete_checkpoints
from ctnet_rec.training.loop import trained_periods

if TYPE_CHECKING:
    from ctnet_rec.pipeline.job import Pipeline

STATUS_JSON = "status.json"
STATUS_HTML = "status.html"
GATES_SHOWN = 100  # per target on the page (a pipeline of hourly periods gates 8,760 a year)


def _source_period(run: Path) -> int | None:
    """The source period the newest checkpoint of a CTNet run trained with."""
    from ctnet_rec.pipeline.job import source_of

    done = complete_checkpoints(run) if run.is_dir() else {}
    source = source_of(done[max(done)]) if done else None
    return Manifest.read(source).period if source else None


def status(p: Pipeline) -> dict[str, Any]:
    from ctnet_rec.pipeline.job import SOURCE_RUN, TOWER_RUN, run_name

    ready = p.ready()
    done = p.done()
    source = p.p.source_domain
    out: dict[str, Any] = {
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "newest_ready_period": ready[-1] if ready else None,
        "done_through": done,
        "lag_periods": (ready[-1] - done) if ready else 0,
        "waiting_for": p.waiting_for(done),
        "source": {"domain": source, "trained": trained_periods(p.runs / SOURCE_RUN),
                   "quarantined": {str(t): r["reason"]
                                   for t, r in p.records(source, "quarantine").items()}},
        "targets": {},
        "stopped": (json.loads(p.stopped_record.read_text())
                    if p.stopped_record.exists() else None),
    }
    bad_sources = set(map(int, out["source"]["quarantined"]))
    for domain, model in p.p.targets.items():
        model_run = p.runs / domain / run_name(model)
        gates = []
        for t, g in sorted(p.records(domain, "gate").items()):
            cand, serv = g["candidate"], g["serving"] or {}
            gates.append({
                "period": t, "candidate_through": cand.get("trained_through"),
                "candidate_auc": cand["auc"], "candidate_gauc": cand["gauc"],
                "candidate_calibration": calibration(cand),
                "serving_through": g["serving_period"],
                "serving_auc": serv.get("auc"), "serving_gauc": serv.get("gauc"),
                "promoted": g["promote"], "reason": g["reason"]})
        now = served(p.runs, domain)
        in_use = _source_period(model_run) if model == "ctnet" else None
        newer_bad = sorted(t for t in bad_sources if in_use is not None and t > in_use)
        out["targets"][domain] = {
            "model": model,
            "trained": {"tower": trained_periods(p.runs / domain / TOWER_RUN),
                        model: trained_periods(model_run)} if model != "base"
            else {"tower": trained_periods(p.runs / domain / TOWER_RUN)},
            "serving": {"period": now["period"], "model": now["model"],
                        "sha256": now["sha256"]} if now else None,
            "source_in_use": in_use,
            "source_note": (f"source period(s) {newer_bad} quarantined: on the newest good "
                            "source") if newer_bad else None,
            "gates": gates,
            "promotions": [g["period"] for g in gates if g["promoted"]],
            "quarantined": {str(t): r["reason"]
                            for t, r in p.records(domain, "quarantine").items()},
        }
    return out


def write_status(p: Pipeline) -> dict[str, Any]:
    s = status(p)
    p.runs.mkdir(parents=True, exist_ok=True)
    write_atomic(p.runs / STATUS_JSON, json.dumps(s, indent=1, sort_keys=True) + "\n")
    write_atomic(p.runs / STATUS_HTML, render(s))
    return s


# -- the page ----------------------------------------------------------------------------------

def _num(v: Any, digits: int = 4) -> str:
    """A figure as a table cell: its exact value in `data-value`, rounded for the eye."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '<td data-value="">-</td>'
    return f'<td data-value="{v!r}">{v:.{digits}f}</td>'


def _plot(gates: list[dict[str, Any]], metric: str) -> str:
    """An SVG line plot of the candidate's and the served model's `metric` by gate period."""
    series = {who: [(g["period"], g[f"{who}_{metric}"]) for g in gates
                    if g[f"{who}_{metric}"] is not None
                    and math.isfinite(g[f"{who}_{metric}"])]
              for who in ("candidate", "serving")}
    points = [pt for s in series.values() for pt in s]
    w, h, pad = 360, 160, 34
    if not points:
        return f'<svg width="{w}" height="{h}"><text x="10" y="20">no {metric} yet</text></svg>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 0.01

    def at(x: float, y: float) -> str:
        return (f"{pad + (x - x0) / (x1 - x0) * (w - 2 * pad):.1f},"
                f"{h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad):.1f}")

    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="{metric} by period">',
             f'<text x="4" y="14" font-size="12">{metric.upper()} on the gate period</text>',
             f'<text x="4" y="{h - pad + 4}" font-size="10">{y0:.3f}</text>',
             f'<text x="4" y="{pad}" font-size="10">{y1:.3f}</text>',
             f'<text x="{pad}" y="{h - 8}" font-size="10">period {x0}</text>',
             f'<text x="{w - pad - 40}" y="{h - 8}" font-size="10">period {max(xs)}</text>']
    for who, colour in (("candidate", "#1f77b4"), ("serving", "#d62728")):
        pts = series[who]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                         f'points="{" ".join(at(x, y) for x, y in pts)}"/>')
            parts += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" '
                      f'r="3" fill="{colour}"/>' for x, y in pts]
    parts.append(f'<text x="{w - 150}" y="14" font-size="11" fill="#1f77b4">candidate</text>'
                 f'<text x="{w - 80}" y="14" font-size="11" fill="#d62728">served</text>')
    return "".join(parts) + "</svg>"


def render(s: dict[str, Any]) -> str:
    e = html.escape
    stop = s["stopped"]
    rows = [f'<p class="stopped"><strong>Stopped</strong> at {e(stop["at"])}'
            + (f" on period {stop['period']}" if stop["period"] is not None else "")
            + f": {e(stop['error'])}. Nothing runs until the pipeline is started again.</p>"
            ] if stop else []
    rows += [f"<p>Updated {e(s['updated'])}. Data complete through period "
             f"{s['newest_ready_period']}; processed through {s['done_through']} "
             f"(lag {s['lag_periods']} period(s))."
             + (f" Waiting for {e(s['waiting_for'])}." if s["waiting_for"] else "") + "</p>",
             f"<h2>Source domain {e(s['source']['domain'])}</h2>",
             f"<p>Trained periods: {e(str(s['source']['trained']))}</p>",
             _quarantine_table(s["source"]["quarantined"])]
    for domain, t in s["targets"].items():
        serving, gates = t["serving"], t["gates"][-GATES_SHOWN:]
        rows += [f'<h2 id="target-{e(domain)}">Target domain {e(domain)} ({e(t["model"])})</h2>',
                 "<p>Served: " + (f"the model trained through period {serving['period']} "
                                  f"({e(serving['model'])}, sha256 {e(serving['sha256'][:12])})"
                                  if serving else "nothing yet") +
                 f"; source period in use: {t['source_in_use']}"
                 + (f" ({e(t['source_note'])})" if t["source_note"] else "") + "</p>",
                 _plot(gates, "auc"), _plot(gates, "gauc"),
                 *([f"<p>The newest {len(gates)} of {len(t['gates'])} gates; every one is in "
                    f"{STATUS_JSON}.</p>"] if len(gates) < len(t["gates"]) else []),
                 f'<table class="gates" data-domain="{e(domain)}"><tr><th>gate period</th>'
                 "<th>candidate through</th><th>candidate AUC</th><th>candidate GAUC</th>"
                 "<th>calibration</th><th>served through</th><th>served AUC</th>"
                 "<th>served GAUC</th><th>promoted</th><th>why</th></tr>"]
        for g in gates:
            rows.append(f'<tr data-period="{g["period"]}"><td>{g["period"]}</td>'
                        f"<td>{g['candidate_through']}</td>" + _num(g["candidate_auc"])
                        + _num(g["candidate_gauc"]) + _num(g["candidate_calibration"], 3)
                        + f"<td>{g['serving_through'] if g['serving_through'] is not None else '-'}"
                        "</td>" + _num(g["serving_auc"]) + _num(g["serving_gauc"])
                        + f"<td>{'yes' if g['promoted'] else 'no'}</td>"
                        f"<td>{e(g['reason'])}</td></tr>")
        rows += ["</table>", _quarantine_table(t["quarantined"])]
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}svg{margin-right:1em;border:1px solid #eee}"
             ".stopped{background:#fdd;padding:0.5em}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ctnet pipeline"
            f"</title><style>{style}</style></head><body><h1>ctnet pipeline</h1>\n"
            + "\n".join(rows) + "\n</body></html>\n")


def _quarantine_table(quarantined: dict[str, str]) -> str:
    if not quarantined:
        return "<p>No period quarantined.</p>"
    return ('<table class="quarantine"><tr><th>quarantined period</th><th>why</th></tr>'
            + "".join(f"<tr><td>{t}</td><td>{html.escape(r)}</td></tr>"
                      for t, r in sorted(quarantined.items(), key=lambda kv: int(kv[0])))
            + "</table>")
