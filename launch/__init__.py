"""torchx components that launch ctnet jobs on local, Kubernetes and Slurm schedulers."""
