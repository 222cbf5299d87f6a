"""torchx components for ctnet-rec's jobs, for any torchx scheduler (local_cwd, slurm,
kubernetes, ...). Each is `torchx.components.dist.ddp` running `python -m ctnet_rec.cli` under
torchrun on NNODES x NPROC processes; arguments after `--` go to the command unchanged.

    torchx run -s local_cwd launch/components.py:transfer --nproc 2 -- \\
        --run-dir runs/ctnet-B --data runs/demo/data --domain B --periods 6:8 \\
        --source-ckpts runs/demo/A

The device (and with it the backend: nccl on cuda, gloo on cpu) is the config's
`[train] device`; set `--gpu` to the GPUs per node to match. Defaults for the resources live in
`.torchxconfig` at the repository root.

torchx reads these signatures to build its command line, hence the typing module's spellings
(`Optional`, `Dict`) it parses and no postponed annotations."""

from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components import dist

# the processes' own threads: one per core of the replica unless the caller sets it
THREADS_ENV = "OMP_NUM_THREADS"
ROLE = "ctnet"


def _ddp(command: List[str], name: str, nnodes: int, nproc: int, cpu: int, gpu: int,
         memMB: int, h: Optional[str], image: str, env: Optional[Dict[str, str]],
         max_retries: int, rdzv_port: int) -> specs.AppDef:
    env = dict(env or {})
    env.setdefault(THREADS_ENV, str(max(1, cpu // nproc)))
    app = dist.ddp(*command, m="ctnet_rec.cli", name=name, j=f"{nnodes}x{nproc}", cpu=cpu,
                   gpu=gpu, memMB=memMB, h=h, image=image, env=env, max_retries=max_retries,
                   rdzv_port=rdzv_port)
    app.roles[0].name = ROLE  # (ddp names it after the module: "cli")
    return app


def train(
    *args: str,
    config: str,
    name: str = "ctnet-train",
    nnodes: int = 1,
    nproc: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Single-domain continual training: `ctnet train --config CONFIG ARGS`.

    Args:
        args: the rest of `ctnet train`'s arguments (--data, --domain, --periods, --run-dir,
            --resume, --init, --sharding)
        config: the TOML config, a path the replicas can read
        name: job name
        nnodes: nodes
        nproc: processes (ranks) per node
        cpu: CPUs per node
        gpu: GPUs per node (the config's [train] device must be "cuda")
        memMB: memory per node in MB
        h: a registered named resource (instead of cpu, gpu and memMB)
        image: the image (local_cwd: the current directory)
        env: environment variables for the processes
        max_retries: restarts the scheduler may make after a failure
        rdzv_port: the rendezvous port on the first node (several nodes only)
    """
    return _ddp(["train", "--config", config, *args], name, nnodes, nproc, cpu, gpu, memMB, h,
                image, env, max_retries, rdzv_port)


def transfer(
    *args: str,
    name: str = "ctnet-transfer",
    nnodes: int = 1,
    nproc: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """CTNet's continual transfer (Algorithm 1): `ctnet transfer run ARGS`. The config is the
    one `ctnet transfer init` recorded in RUN/init.

    Args:
        args: `ctnet transfer run`'s arguments (--run-dir, --data, --domain, --periods,
            --source-ckpts, --sharding)
        name: job name
        nnodes: nodes
        nproc: processes (ranks) per node
        cpu: CPUs per node
        gpu: GPUs per node (the config's [train] device must be "cuda")
        memMB: memory per node in MB
        h: a registered named resource (instead of cpu, gpu and memMB)
        image: the image (local_cwd: the current directory)
        env: environment variables for the processes
        max_retries: restarts the scheduler may make after a failure
        rdzv_port: the rendezvous port on the first node (several nodes only)
    """
    return _ddp(["transfer", "run", *args], name, nnodes, nproc, cpu, gpu, memMB, h, image,
                env, max_retries, rdzv_port)


def evaluate(
    *args: str,
    name: str = "ctnet-eval",
    nnodes: int = 1,
    nproc: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """A checkpoint's metrics on one period: `ctnet eval ARGS`.

    Args:
        args: `ctnet eval`'s arguments (--ckpt, --data, --domain, --period, --out, --config,
            --sharding)
        name: job name
        nnodes: nodes
        nproc: processes (ranks) per node
        cpu: CPUs per node
        gpu: GPUs per node (used when the checkpoint was trained on "cuda", or with
            --device cuda among ARGS)
        memMB: memory per node in MB
        h: a registered named resource (instead of cpu, gpu and memMB)
        image: the image (local_cwd: the current directory)
        env: environment variables for the processes
        max_retries: restarts the scheduler may make after a failure
        rdzv_port: the rendezvous port on the first node (several nodes only)
    """
    return _ddp(["eval", *args], name, nnodes, nproc, cpu, gpu, memMB, h, image, env,
                max_retries, rdzv_port)


def predict(
    *args: str,
    name: str = "ctnet-predict",
    nnodes: int = 1,
    nproc: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Scores for one period: `ctnet predict ARGS`.

    Args:
        args: `ctnet predict`'s arguments (--ckpt, --data, --domain, --period, --out,
            --batch-size, --sharding)
        name: job name
        nnodes: nodes
        nproc: processes (ranks) per node
        cpu: CPUs per node
        gpu: GPUs per node (used when the checkpoint was trained on "cuda", or with
            --device cuda among ARGS)
        memMB: memory per node in MB
        h: a registered named resource (instead of cpu, gpu and memMB)
        image: the image (local_cwd: the current directory)
        env: environment variables for the processes
        max_retries: restarts the scheduler may make after a failure
        rdzv_port: the rendezvous port on the first node (several nodes only)
    """
    return _ddp(["predict", *args], name, nnodes, nproc, cpu, gpu, memMB, h, image, env,
                max_retries, rdzv_port)
