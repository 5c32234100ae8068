"""Run directories, their lock, checkpoints written atomically, resume, and HF export."""
