"""Training: the process group, the period loop, checkpoints and evaluation."""
