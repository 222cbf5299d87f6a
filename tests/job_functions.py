"""Jobs for the job runner's tests. A job process imports the module of the function it runs:
this one imports almost nothing, so a job starts in a fraction of a second, not the seconds a
test module's imports take."""

import time
from pathlib import Path

import numpy as np


def stamp(path: Path, nap: float) -> None:
    """Sleep `nap` seconds; write when that began and ended."""
    start = time.time()
    time.sleep(nap)
    path.write_text(f"{start} {time.time()}")


def hold_mb(mb: int) -> None:
    """Touch `mb` megabytes (every page), so that they count in the process's peak RSS."""
    block = np.ones(mb * 1024 * 1024 // 8)
    assert block.sum() == block.size
