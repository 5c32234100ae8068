"""Leave the process without the interpreter's last garbage collection.

A training process ends holding millions of small objects (tokenized data, the model, DeepSpeed's and
transformers' module state). Python's shutdown walks all of them in one last collection, which took
1.5-2.5 s per rank here after the run had already written everything: time every job pays, and every
test that starts one. Freezing the heap at exit moves those objects out of the collector's reach; the
operating system frees the memory anyway. It runs from `atexit`, so a caller that imports lmscale and
calls `main()` in its own process (the test suite) keeps a collected heap until it exits itself.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """Freeze the heap when the interpreter exits (once per process, whoever asks)."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
