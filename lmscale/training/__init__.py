"""The run itself: the worker that wires a rank, the loop, optimizers, LR schedules, signals, watchdog."""
