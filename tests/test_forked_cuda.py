"""Processes that fork the ones that use the GPU: the experiment's and the pipeline's job
server (its jobs train with `device = "cuda"`) and the GPU suite (each section in a forked
process). torch lets a forked process use CUDA only if its parent never asked the CUDA runtime
for the devices, and fbgemm_gpu's import asks torch whether CUDA is available: these processes
have torch ask NVML instead (`keep_forks_cuda_capable`). This CPU build never asks the
runtime, so `cuda_runtime_spy` makes it answer as a CUDA build and records the question."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ctnet_rec.experiment.jobs import NVML_CUDA_CHECK

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import os, sys
sys.path[:0] = [{root!r}, {benchmarks!r}]
os.environ.pop({var!r}, None)
from tests import cuda_runtime_spy as spy
from ctnet_rec.cli import EXPERIMENT_JOBS, PIPELINE_JOBS
from ctnet_rec.experiment.jobs import IsolatedRunner
# the job server: it imports the library (on the other core, while this process goes on)
runner = IsolatedRunner(["tests.cuda_runtime_spy", EXPERIMENT_JOBS, PIPELINE_JOBS])

os.environ.pop({var!r}, None)
import gpu_suite  # the suite's parent: it imports the library, then forks each section
spy.assert_the_cuda_runtime_was_not_asked()
runner.submit(spy.assert_the_cuda_runtime_was_not_asked, "probe").result()

os.environ.pop({var!r}, None)  # and the spy sees the question when it is asked
import torch
torch.cuda.is_available()
assert spy.ASKED, "the spy missed the CUDA runtime's question"
print("probed")
"""


def test_processes_that_fork_gpu_work_never_ask_the_cuda_runtime():
    script = PROBE.format(root=str(ROOT), benchmarks=str(ROOT / "benchmarks"),
                          var=NVML_CUDA_CHECK)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("probed"), \
        proc.stdout[-2000:] + proc.stderr[-4000:]
