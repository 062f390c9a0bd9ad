"""The garbage collector of a process that syncs: out of the way of the code it imported.

A run process holds Dagster, the code location and Great Expectations: about a million objects
that live as long as the process. Python's cyclic collector walks all of them in each full
collection, and a full sync allocates enough to trigger dozens: at 50,000 patients the collector
took 5.4-5.8 s of a 20-26 s job (`bench/full_sync.py`, measured with `gc.callbacks`). `settle`
moves what is alive at that moment into the permanent generation (`gc.freeze`: never walked,
still freed by reference counting) and makes young collections rarer (`THRESHOLDS`). It runs
once per process, and again after the lazy Great Expectations import (`quality`); a
`gc.collect()` first, so no garbage is frozen. Rarer collections keep cycles longer, so the checks
also collect after each chunk they validate (`release`). Figures: docs/performance.md.
"""

from __future__ import annotations

import gc

# Young collections every 5,000 net allocations (default 700): a sync allocates millions of rows'
# objects, nearly all freed by reference counting, so frequent young collections only cost time.
# Full sync of 200,000 patients, peak memory: 500 MB at 20,000, 443 MB at 5,000, 441 MB at 2,000
# (and 440 MB at the default): rarer collections leave cycles alive longer.
THRESHOLDS = (5_000, 10, 10)

_settled = False


def settle() -> None:
    """Freeze what the process has imported and raise the collection thresholds (once a process)."""
    global _settled
    if _settled:
        return
    freeze()
    gc.set_threshold(*THRESHOLDS)
    _settled = True


def release() -> None:
    """Collect now: after work that leaves big reference cycles behind (a Great Expectations batch
    holds its chunk's frame), which the raised thresholds would otherwise keep until a rare full
    collection."""
    gc.collect()


def freeze() -> None:
    """Collect, then move every object still alive out of the cyclic collector's walks."""
    gc.collect()
    gc.freeze()
