"""A training process keeps its large freed host blocks for reuse (`host_memory`): a block
allocated again after it was freed is not page-faulted in again, unless the user tuned
malloc, whose settings are then left as they are."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

import ctnet_rec.training.distributed as distributed
from ctnet_rec.training.host_memory import keep_freed_blocks, user_tuned_malloc

ROOT = Path(__file__).resolve().parents[1]

# page faults of allocating (and filling) 64 MB three times after two warm-up allocations,
# before and after `keep_freed_blocks`
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
from ctnet_rec.training.host_memory import keep_freed_blocks
def refaults():
    for _ in range(2):
        b"x" * (64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        b"x" * (64 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(refaults(), keep_freed_blocks(), refaults())
"""


def _probe(env: dict[str, str]) -> tuple[int, bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), out[1] == "True", int(out[2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc parameters")
def test_freed_blocks_are_reused_unless_the_user_tuned_malloc():
    before, kept, after = _probe({"PATH": "/usr/bin:/bin"})
    assert kept and before >= 30 and after * 10 <= before, (before, after)
    # the user's own setting (here glibc's default threshold, fixed) stays in force
    before, kept, after = _probe({"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not kept and after >= before // 2 >= 15, (before, after)


def test_what_counts_as_the_users_own_malloc_settings(monkeypatch):
    assert not user_tuned_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2",
                                  "LD_PRELOAD": "libfoo.so"})
    for env in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}):
        assert user_tuned_malloc(env), env
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    assert not keep_freed_blocks()


def test_every_process_that_trains_or_scores_keeps_its_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "keep_freed_blocks", lambda: calls.append(1))
    distributed.init_distributed("cpu")
    assert calls == [1]
