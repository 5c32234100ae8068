"""Data: documents -> tokenizer -> cached token sequences -> length-bucketed batches.

`pipeline` prepares a run's data (`prepare_data`, `prepare_held_out`); `sources`, `tasks` and `streaming` read
it; `locations` says where a path points without importing `datasets` (the launcher's checks).
"""
