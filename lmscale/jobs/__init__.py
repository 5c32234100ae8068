"""Starting jobs: the deepspeed launcher, SLURM batch scripts, and sweeps of runs."""
