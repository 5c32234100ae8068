"""A run, resolved once: its config checked and completed, its DeepSpeed config, its ranks and directory."""
