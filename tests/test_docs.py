"""The documentation cannot drift from the code: every shell block of README.md and docs/
marked `<!-- runnable -->` runs here, in order, in a fresh folder per page (with the
repository's examples/ beside it), and every relative link points at a file that exists."""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from ctnet_rec.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*```(?:bash|sh)\n(.*?)```", re.S)


def runnable_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def run(args: list[str]) -> None:
    """`ctnet ...` through the CLI's entry point, `python FILE ...` as a script, in this
    process (a new process per command would spend most of the test importing torch)."""
    if args[0] == "ctnet":
        assert main(args[1:]) == 0, args
    elif args[0] == "python" and args[1].endswith(".py"):
        argv = sys.argv
        sys.argv = args[1:]
        try:
            runpy.run_path(args[1], run_name="__main__")
        finally:
            sys.argv = argv
    else:
        raise AssertionError(f"not a command this test can run: {shlex.join(args)}")


PAGES_WITH_BLOCKS = [p for p in PAGES if runnable_blocks(p)]


def test_the_docs_mark_runnable_blocks():
    names = {p.name for p in PAGES_WITH_BLOCKS}
    assert {"training.md", "python-api.md", "scale.md", "your-data.md"} <= names, names


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=lambda p: p.name)
def test_runnable_blocks_run(page, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    for block in runnable_blocks(page):
        for args in commands(block):
            run(args)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"



RESULTS = ROOT / "benchmarks" / "results"
FIGURE = re.compile(r"(?<![\w.])[+-]?(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)x?(?![\w.])")


def _numbers(obj: object) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [x for v in obj for x in _numbers(v)] if isinstance(obj, list) else []


def _table_bodies(section: str) -> list[list[str]]:
    """The body rows of every Markdown table in `section`, as cells (headers left out)."""
    lines = section.splitlines()
    rows, body = [], False
    for line in lines:
        if line.startswith("|---"):
            body = True
        elif line.startswith("| ") and body:
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            body = False
    return rows


def quoted_figures_not_in_results(text: str) -> list[str]:
    """Every figure in a table of a section that names a results file (`X.json` of
    benchmarks/results) that no number of those files gives at the figure's printed
    rounding (GB: the files' MB / 1000 or / 1024). First columns are labels, cells with
    code are settings; a row whose label starts with "before" quotes an earlier version's
    run, not the results."""
    import json

    out = []
    for section in re.split(r"\n(?=#{2,3} )", text):
        files = dict.fromkeys(n for n in re.findall(r"([\w-]+\.json)", section)
                              if (RESULTS / n).exists())
        values = [v for n in files for v in _numbers(json.loads((RESULTS / n).read_text()))]
        for row in _table_bodies(section) if files else []:
            if row[0].lower().startswith("before"):
                continue
            for cell in row[1:]:
                if "`" in cell:  # a setting (`source_lag = 1`), not a figure
                    continue
                for m in FIGURE.finditer(cell):
                    figure = m.group(0).rstrip("x")
                    places = len(figure.split(".")[1]) if "." in figure else 0
                    x = float(figure.replace(",", ""))
                    scales = (1, 1000, 1024) if "GB" in cell else (1,)
                    half = 0.5 * 10 ** -places + 1e-9  # x is v rounded, either way at .5
                    if not any(abs(v / s - x) <= half for v in values for s in scales):
                        out.append(f"{section.splitlines()[0]}: {figure} in {cell!r} "
                                   f"(from {', '.join(files)})")
    return out


@pytest.mark.parametrize("doc", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_figures_quoted_beside_a_results_file_are_in_it(doc):
    assert quoted_figures_not_in_results((ROOT / doc).read_text()) == []


def test_a_stale_figure_is_caught():
    text = ("## X\n\n`python benchmarks/vs_peer.py` (`vs_peer.json`)\n\n| batch | ours |\n"
            "|---|---|\n| 512 | {} |\n")
    import json
    runs = json.loads((RESULTS / "vs_peer.json").read_text())["runs"]
    ours = next(r["samples_per_s"] for r in runs if r["batch_size"] == 512)
    assert quoted_figures_not_in_results(text.format(f"{ours:,.0f}")) == []
    assert len(quoted_figures_not_in_results(text.format(f"{ours + 1000:,.0f}"))) == 1
