"""Starting jobs: DeepSpeed's launchers, SLURM batch scripts, and sweeps of runs."""
