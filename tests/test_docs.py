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

