"""The run process's collector: the imported code frozen out of its walks, young collections rarer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_a_sync_step_settles_the_heap_once_and_great_expectations_is_frozen_after_import() -> None:
    """In a fresh process (this test does not settle the test process; the syncs other tests run in
    process do): `settle` freezes what is alive and raises the thresholds once; objects made
    afterwards are collected as usual, cycles included; warming Great Expectations up for the checks
    freezes its objects too."""
    script = textwrap.dedent(
        """
        import gc, json
        from nvc_pipelines import heap, quality
        before = gc.get_freeze_count()
        heap.settle()
        frozen = gc.get_freeze_count()
        heap.settle()
        again = gc.get_freeze_count()
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        del a, b
        collected = gc.collect()
        quality.warm_up()
        print(json.dumps({"before": before, "frozen": frozen, "again": again, "collected": collected,
                          "threshold": gc.get_threshold(), "after_gx": gc.get_freeze_count()}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0 and seen["frozen"] > 10_000 and seen["again"] == seen["frozen"]
    assert seen["collected"] >= 2  # the cycle made after the freeze was still collected
    assert tuple(seen["threshold"]) == (5_000, 10, 10)
    assert seen["after_gx"] > seen["frozen"] + 100_000  # Great Expectations' objects frozen on import


def test_release_frees_a_cycle_at_once_that_the_raised_thresholds_would_keep() -> None:
    """After a validated chunk the checks call `release`: with the thresholds raised, a big cycle (a
    Great Expectations batch holding its chunk's frame) would otherwise wait for a rare full collection."""
    import gc
    import weakref

    from nvc_pipelines import heap

    class Chunk:
        pass

    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection in between: as with the raised thresholds, only rarer
    try:
        chunk, holder = Chunk(), Chunk()
        chunk.holder, holder.chunk = holder, chunk  # the batch and its frame refer to each other
        alive = weakref.ref(chunk)
        del chunk, holder
        assert alive() is not None  # reference counting alone cannot free a cycle
        heap.release()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()
