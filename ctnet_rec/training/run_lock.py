"""One writer per run folder: two jobs writing one run would interleave their periods (one
seed's period 0, the other's periods 1-2) and both exit 0. Taking the lock also checks that
the folder can take the run's next checkpoint."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctnet_rec.training.checkpoint import CheckpointError, complete_checkpoints

LOCK = ".lock"


@contextmanager
def run_lock(run: Path, held: bool = True) -> Iterator[None]:
    """An exclusive lock on RUN/.lock for the block (`held`: this process writes the run; the
    other ranks of a job leave it to rank 0). A second job is refused, naming the holder; the
    lock goes with the holder's process, so a killed job never leaves the run locked. A run
    folder this call created and that holds nothing else at the end (a job refused before it
    wrote anything) is removed."""
    if not held:
        yield
        return
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        fh = open(run / LOCK, "a+")  # noqa: SIM115 (held for the block, closed below)
    except OSError as e:
        raise CheckpointError(f"{run}: cannot write the run here ({e.strerror})") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise CheckpointError(f"{run}: another job is writing this run ({fh.read().strip()}); "
                                  "wait for it to end or use another run folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            _check_room(run)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            if created and [p.name for p in run.iterdir()] == [LOCK]:
                shutil.rmtree(run)


def _check_room(run: Path) -> None:
    """Refuse to start when the disk cannot take another checkpoint the size of the run's
    newest (with a fifth to spare): a full disk would end the job mid-save."""
    done = complete_checkpoints(run)
    if not done:
        return
    newest = done[max(done)]
    need = 1.2 * sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    free = shutil.disk_usage(run).free
    if free < need:
        raise CheckpointError(f"{run}: {free / 2**30:.1f} GiB free, a checkpoint needs about "
                              f"{need / 2**30:.1f} GiB (no space left on the device)")
