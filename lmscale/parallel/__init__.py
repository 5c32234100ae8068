"""How ranks divide the work: the layout, DeepSpeed's engine and config, Ulysses sequence parallelism."""
