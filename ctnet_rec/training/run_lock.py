"""One writer per run folder: two jobs writing one run would interleave their periods (one
seed's period 0, the other's periods 1-2) and both exit 0."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctnet_rec.training.checkpoint import CheckpointError

LOCK = ".lock"


@contextmanager
def run_lock(run: Path, held: bool = True) -> Iterator[None]:
    """An exclusive lock on RUN/.lock for the block (`held`: this process writes the run; the
    other ranks of a job leave it to rank 0). A second job is refused, naming the holder; the
    lock goes with the holder's process, so a killed job never leaves the run locked."""
    if not held:
        yield
        return
    run.mkdir(parents=True, exist_ok=True)
    with open(run / LOCK, "a+") as fh:
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
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
