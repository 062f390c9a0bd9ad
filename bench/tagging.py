"""Benchmark: clinical tagging speed on the labelled notes, against a baseline scan of the same text.

    .venv/bin/python bench/tagging.py [--notes 20000]

The labelled notes (both sets, repeated to N) are tagged with `infer_from_text`; the baseline in the
same run lower-cases each note and finds its words with one regular expression (what any reader of
the text costs at least). A 200,000-patient practice's notes must tag in seconds. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from pathlib import Path

from _harness import JsonFigures, add_json_argument

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notes", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    add_json_argument(parser)
    args = parser.parse_args()
    out = JsonFigures(args.json, "tagging")
    from nvc_pipelines.tagging import infer_from_text

    notes: list[str] = []
    for name in ("clinical_notes_labelled.csv", "clinical_notes_labelled_2.csv"):
        with (REPO / "tests" / "data" / name).open(newline="", encoding="utf-8") as fh:
            notes += [row["note"] for row in csv.DictReader(fh)]
    batch = (notes * (args.notes // len(notes) + 1))[: args.notes]
    words = re.compile(r"\w+")
    tagger, baseline = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for note in batch:
            words.findall(note.lower())
        baseline.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for note in batch:
            infer_from_text(note)
        tagger.append(time.perf_counter() - t0)
    tagger.sort()
    baseline.sort()
    mid = args.repeat // 2
    print(f"{args.notes:,} notes, median of {args.repeat} runs")
    print(f"  baseline (lower + word scan)  {baseline[mid]:8.3f} s")
    print(f"  infer_from_text               {tagger[mid]:8.3f} s   x baseline {tagger[mid] / baseline[mid]:.1f}")
    print(f"  per 200,000 notes             {tagger[mid] * 200_000 / args.notes:8.1f} s")
    out.figure("notes", args.notes)
    out.figure("baseline_s", baseline[mid])
    out.figure("tagger_s", tagger[mid])
    out.figure("tagger_vs_baseline", tagger[mid] / baseline[mid])
    out.figure("tagger_per_200000_notes_s", tagger[mid] * 200_000 / args.notes)
    out.write()


if __name__ == "__main__":
    main()
