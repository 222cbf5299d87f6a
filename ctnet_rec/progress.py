"""Progress of a long loop: a tqdm bar on a terminal; anywhere else (a torchx or Slurm job, a
pipe, CI) one log line every `LOG_SECONDS`: done, rows, samples/s, the running loss where the
loop has one, and the time left. A cluster job's log then shows that it is alive and when
it will end."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

LOG_SECONDS = 30.0


class Progress:
    """`update` after each unit of work; `due` says when a log line is next owed (so that a
    caller reads a device loss back only then), `show` gives the bar its figures and, when
    due, the log its line.
    `enabled=False` (ranks other than 0): silent."""

    def __init__(self, total: int, desc: str, log: logging.Logger, unit: str = "batch",
                 initial: int = 0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.log, self.clock = total, desc, log, clock
        self.units = unit + ("es" if unit.endswith(("ch", "sh")) else "s")
        self.tty = enabled and sys.stderr.isatty()
        self.logs = enabled and not self.tty
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                        disable=not self.tty, leave=False)
        self.done, self.start_done, self.rows = initial, initial, 0
        self.start = self.last = clock()

    def update(self, rows: int = 0) -> None:
        self.bar.update()
        self.done += 1
        self.rows += rows

    def due(self) -> bool:
        return self.logs and self.clock() - self.last >= LOG_SECONDS

    def show(self, **figures: Any) -> None:
        """On the bar, `figures` as its postfix; in the log, a line with them if one is due
        (callers may show more often, e.g. for TensorBoard: still one line a LOG_SECONDS)."""
        now = self.clock()
        elapsed = max(now - self.start, 1e-9)
        if self.rows:
            figures = {"samples/s": f"{self.rows / elapsed:,.0f}", **figures}
        if self.tty:
            self.bar.set_postfix(figures)
        if not self.due():
            return
        self.last = now
        rate = (self.done - self.start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else None
        parts = [f"{self.done:,}/{self.total:,} {self.units}"]
        parts += [f"{v} {k}" if k == "samples/s" else f"{k} {v}" for k, v in figures.items()]
        parts.append("ETA " + (str(datetime.timedelta(seconds=round(left)))
                               if left is not None else "unknown"))
        self.log.info("%s: %s", self.desc, ", ".join(parts))

    def tick(self, rows: int = 0) -> None:
        """`update`, then a log line if one is due (for loops with no figures of their own)."""
        self.update(rows)
        if self.due():
            self.show()

    def close(self) -> None:
        self.bar.close()
