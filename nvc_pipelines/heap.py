"""The garbage collector of a process that syncs: out of the way of the code it imported.

A run process holds Dagster, the code location and Great Expectations: about a million objects
that live as long as the process. Python's cyclic collector walks all of them in each full
collection, and a full sync allocates enough to trigger dozens: at 50,000 patients the collector
took 5.4-5.8 s of a 20-26 s job (`bench/full_sync.py`, measured with `gc.callbacks`). `settle`
moves what is alive at that moment into the permanent generation (`gc.freeze`: never walked,
still freed by reference counting) and makes young collections rarer; after it the collector took
0.4-0.5 s of the same job (2.5 s of a 74 s job at 200,000, against 7.3 s with the freeze alone).
It runs once per process, and again after the lazy Great Expectations import (`quality`); a
`gc.collect()` first, so no garbage is frozen. Rarer collections keep cycles longer, so the checks
collect after each chunk they validate (`release`), which keeps the peak memory where it was.
"""

from __future__ import annotations

import gc

# Young collections every 20,000 net allocations (default 700): a sync allocates millions of rows'
# objects, nearly all freed by reference counting, so frequent young collections only cost time.
THRESHOLDS = (20_000, 10, 10)

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
    collection (at 200,000 patients: 467 MB peak without, 439 MB with, as before `settle`)."""
    gc.collect()


def freeze() -> None:
    """Collect, then move every object still alive out of the cyclic collector's walks."""
    gc.collect()
    gc.freeze()
