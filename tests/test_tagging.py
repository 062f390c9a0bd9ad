"""Clinical auto-tagging: accuracy on a labelled set of optometry notes, plus unit tests.

Run ``pytest tests/test_tagging.py -s`` to see the precision/recall table.

Labelling conventions for ``tests/data/clinical_notes_labelled.csv`` (each note is labelled by its
clinical meaning for *this patient*, not by what the tagger happens to do):

* ``diabetic``: the patient has diabetes now (any type, including current gestational diabetes).
  Diabetes medication (metformin for diabetes, insulin, gliclazide...) and diabetic eye screening
  results / diabetic retinopathy grading imply it. Pre-diabetes, "borderline", resolved gestational
  diabetes, diabetes insipidus, metformin for PCOS, or diabetes only in relatives, carers or spouses
  do not. A leaflet about diabetes given to a carer is not evidence either.
* ``glaucoma``: a diagnosed glaucoma (POAG/COAG/NTG/angle closure/secondary...) or glaucoma
  treatment (anti-glaucoma drops, SLT, trabeculectomy) with no other stated reason. Drops for a
  stated OHT are ``ocular_hypertension`` only.
* ``glaucoma_suspect``: glaucoma queried but not diagnosed: "?glaucoma", "glaucoma suspect",
  suspicious discs/cupping, glaucomatous field defects, "possible"/"early" glaucoma, referral ?POAG.
* ``ocular_hypertension``: OHT stated (including "?OHT" with raised readings), "raised IOP", or any
  IOP reading >= 22 mmHg (``OHT_IOP_MMHG``) in either eye - except when a Goldmann (GAT) repeat in
  the same note is below the threshold, which supersedes a raised NCT screen.
* ``glaucoma_family_history``: a first-degree relative (parent, sibling, child) with glaucoma, or an
  unspecified "family history of glaucoma" (the NHS GOS eligibility criterion). Grandparents, aunts,
  cousins and spouses do not count.

Further conventions, for cases the ones above leave open:

* A condition that is only queried is no flag ("?diabetes", "?OHT" without a raised reading, "mum
  possibly had glaucoma"), except the patient's own queried glaucoma, which is ``glaucoma_suspect``.
* Glaucomatous signs (cupping, field loss) in a note that diagnoses glaucoma are part of the
  glaucoma, not a separate ``glaucoma_suspect``.
* Treatment that was stopped does not undo the diagnosis ("stopped Xalatan himself" is ``glaucoma``).
* Relatives "on dad's side" or "maternal" ones (grandparent, aunt...) are not first-degree; notes on
  half-siblings are left out as ambiguous.

Rows 2-294 of the CSV are the original set. The rows after them came with the clause-based tagger:
new phrasings (drugs, misspellings, forms, headings, possessives, readings, HES letters) written and
labelled by these conventions in batches, each before the tagger was run on it (and then used to
improve the rules). Notes it still gets wrong stay in, so the figures are not flattered.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from nvc_pipelines.tagging import OHT_IOP_MMHG, InferredFlag, infer_from_iop, infer_from_text, inferred_flags

LABELLED = Path(__file__).parent / "data" / "clinical_notes_labelled.csv"
FLAGS = ("diabetic", "glaucoma", "glaucoma_suspect", "ocular_hypertension", "glaucoma_family_history")
MIN_MICRO = 0.90
MIN_PER_FLAG = 0.80


def _load() -> list[tuple[str, set[str]]]:
    with LABELLED.open(newline="", encoding="utf-8") as fh:
        return [(row["note"], {f for f in row["expected_flags"].split(";") if f}) for row in csv.DictReader(fh)]


def _flags(note: str) -> set[str]:
    return {f.flag for f in infer_from_text(note)}


def _evaluate(rows: list[tuple[str, set[str]]]) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    counts = {f: [0, 0, 0] for f in FLAGS}  # tp, fp, fn
    errors: list[str] = []
    for note, expected in rows:
        got = _flags(note)
        for flag in FLAGS:
            if flag in got and flag in expected:
                counts[flag][0] += 1
            elif flag in got:
                counts[flag][1] += 1
            elif flag in expected:
                counts[flag][2] += 1
        if got != expected:
            missed, extra = sorted(expected - got), sorted(got - expected)
            errors.append(f"  {note!r}: missed={missed} extra={extra}")
    return {f: tuple(c) for f, c in counts.items()}, errors


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def _table(counts: dict[str, tuple[int, int, int]], n_notes: int) -> tuple[str, float, float]:
    lines = [
        f"Clinical note tagging on {n_notes} labelled notes",
        f"{'flag':<26}{'support':>8}{'tp':>5}{'fp':>5}{'fn':>5}{'precision':>11}{'recall':>8}",
    ]
    for flag, (tp, fp, fn) in counts.items():
        lines.append(
            f"{flag:<26}{tp + fn:>8}{tp:>5}{fp:>5}{fn:>5}{_ratio(tp, tp + fp):>11.3f}{_ratio(tp, tp + fn):>8.3f}"
        )
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    micro_p, micro_r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    lines.append(f"{'micro-average':<26}{tp + fn:>8}{tp:>5}{fp:>5}{fn:>5}{micro_p:>11.3f}{micro_r:>8.3f}")
    return "\n".join(lines), micro_p, micro_r


def test_labelled_set_is_well_formed() -> None:
    rows = _load()
    assert len(rows) >= 220
    assert len({note for note, _ in rows}) == len(rows), "duplicate notes"
    assert all(expected <= set(FLAGS) for _, expected in rows)
    unflagged = sum(1 for _, expected in rows if not expected)
    assert 0.3 <= unflagged / len(rows) <= 0.5
    for flag in FLAGS:
        assert sum(1 for _, expected in rows if flag in expected) >= 20, flag


def test_precision_and_recall_on_labelled_notes() -> None:
    rows = _load()
    counts, errors = _evaluate(rows)
    table, micro_p, micro_r = _table(counts, len(rows))
    report = table + ("\nMisclassified notes:\n" + "\n".join(errors) if errors else "\nNo misclassified notes.")
    print("\n" + report)
    assert micro_p >= MIN_MICRO and micro_r >= MIN_MICRO, report
    for flag, (tp, fp, fn) in counts.items():
        assert _ratio(tp, tp + fp) >= MIN_PER_FLAG, f"{flag} precision\n{report}"
        assert _ratio(tp, tp + fn) >= MIN_PER_FLAG, f"{flag} recall\n{report}"


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("Type 2 diabetes - annual review", {"diabetic"}),
        ("family history of glaucoma", {"glaucoma_family_history"}),
        ("IOP 22mmHg", {"ocular_hypertension"}),
        ("glaucoma suspect", {"glaucoma_suspect"}),
        ("no family history of glaucoma", set()),
        ("not diabetic", set()),
        ("", set()),
        (None, set()),
    ],
)
def test_brief_examples(note: str | None, expected: set[str]) -> None:
    assert {f.flag for f in infer_from_text(note)} == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # plain negations, before and after the term
        ("Denies diabetes.", set()),
        ("Non-diabetic.", set()),
        ("nondiabetic", set()),
        ("No FHx glaucoma.", set()),
        ("Nil relevant family history.", set()),
        ("OHT ruled out.", set()),
        ("Glaucoma excluded at HES.", set()),
        ("Diabetic: N", set()),
        ("FHx glaucoma - no", set()),
        # negation scope stops at the clause / conjunction
        ("No FHx glaucoma but T2DM on metformin.", {"diabetic"}),
        ("Not diabetic. Mum has glaucoma.", {"glaucoma_family_history"}),
        ("Denies diabetes, IOPs 24/25.", {"ocular_hypertension"}),
        ("No diabetes, no glaucoma, no FHx. IOPs 13/14.", set()),
        # "no diabetic retinopathy" negates the retinopathy, not the diabetes
        ("No diabetic retinopathy seen, R0M0 both eyes.", {"diabetic"}),
        ("Discs healthy, no glaucomatous cupping.", set()),
    ],
)
def test_negation(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("Mum has glaucoma.", {"glaucoma_family_history"}),
        ("Brother on drops for glaucoma.", {"glaucoma_family_history"}),
        ("Grandmother had glaucoma.", set()),
        ("Husband has glaucoma.", set()),
        ("Mum is diabetic; pt fit and well.", set()),
        ("Leaflet on diabetes given to carer.", set()),
        ("Mum glaucoma, dad diabetic.", {"glaucoma_family_history"}),
        ("OHT on latanoprost; brother has POAG.", {"ocular_hypertension", "glaucoma_family_history"}),
    ],
)
def test_family_members_and_other_people(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("IOPs 21/20 NCT.", set()),
        ("IOPs 21.5/20", set()),
        ("IOP 22mmHg", {"ocular_hypertension"}),
        ("IOPs 23/24 GAT", {"ocular_hypertension"}),
        ("IOP R 19 L 22", {"ocular_hypertension"}),
        ("NCT 24/23, repeat with GAT 18/19 - normal.", set()),
        ("Seen 22/03/2024, IOPs 13/14.", set()),
        ("VA 6/6 R&L, IOPs 15/14 at 10:22am.", set()),
        ("Hypertension on amlodipine.", set()),
    ],
)
def test_iop_in_text(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # drugs (brand and generic), procedures, DESP grades, abbreviations, misspellings
        ("Meds: Jardiance, Trulicity.", {"diabetic"}),
        ("On Levemir and Novorapid.", {"diabetic"}),
        ("DESP: R1 M0 both eyes.", {"diabetic"}),
        ("Pt diabeteic? no - diabtes type 2 on tabs", {"diabetic"}),
        ("Trabeculectomy R 2012, iStent L.", {"glaucoma"}),
        ("Drops: Azopt bd, Lumigan nocte.", {"glaucoma"}),
        ("Known PACG, laser PI.", {"glaucoma"}),
        ("glaucomma L", {"glaucoma"}),
        # a drug given for something else, and near-diagnoses that are not the condition
        ("Metformin for PCOS.", set()),
        ("Timolol for migraine.", set()),
        ("Bimatoprost for eyelashes.", set()),
        ("Pre-diabetic, diet only.", set()),
        ("Diabetes insipidus.", set()),
        ("Gestational diabetes 2019, resolved.", set()),
        ("Gestational diabetes, 28 weeks pregnant.", {"diabetic"}),
        ("Primary angle closure suspect - PI done.", set()),
        # drops for a stated OHT treat the OHT
        ("OHT on Xalatan.", {"ocular_hypertension"}),
        ("Xalatan nocte.", {"glaucoma"}),
    ],
)
def test_vocabulary(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("?glaucoma R - refer.", {"glaucoma_suspect"}),
        ("Possible early glaucoma L.", {"glaucoma_suspect"}),
        ("Glaucoma - query, refer for fields.", {"glaucoma_suspect"}),
        ("Refer r/o glaucoma.", {"glaucoma_suspect"}),
        ("Referred for glaucoma assessment.", {"glaucoma_suspect"}),
        ("Glaucoma not ruled out, repeat fields.", {"glaucoma_suspect"}),
        ("Suspicious discs, refer.", {"glaucoma_suspect"}),
        ("POAG R with glaucomatous field loss.", {"glaucoma"}),
        ("?diabetes - GP to check HbA1c.", set()),
        ("Diabetes: awaiting GP confirmation.", set()),
        ("?OHT - repeat IOPs.", set()),
        ("Mum possibly had glaucoma.", set()),
    ],
)
def test_uncertainty(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("Glaucoma leaflet given.", set()),
        ("Given leaflet on diabetes.", set()),
        ("Glaucoma screening normal.", set()),
        ("Glaucoma risk factors explained.", set()),
        ("Pt asked whether diabetes affects eyes.", set()),
        ("Tested for diabetes at GP - negative.", set()),
        ("Pt at risk of diabetes.", set()),
        # a diabetic's own screening is evidence, a test for diabetes is not
        ("Diabetic eye screening up to date.", {"diabetic"}),
        ("Diabetes screening at GP next week.", set()),
        ("Eligible for NHS sight test: diabetic.", {"diabetic"}),
    ],
)
def test_topic_mentions(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("Diabetic: Y", {"diabetic"}),
        ("Glaucoma: yes (HES). Diabetic: no.", {"glaucoma"}),
        ("Diabetes - Y; Glaucoma - N; FHx glaucoma - N", {"diabetic"}),
        ("FHx glaucoma: Y (mother)", {"glaucoma_family_history"}),
        ("FHx of glaucoma: unknown (adopted).", set()),
        ("DM - nil", set()),
        ("GH: nil. Meds: nil. FOH: nil.", set()),
        ("No meds except insulin.", {"diabetic"}),
        ("Pt doesn't have diabetes.", set()),
    ],
)
def test_forms_and_negation_scope(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # headings say whom a sentence is about
        ("GH: T2DM. FOH: glaucoma (mum).", {"diabetic", "glaucoma_family_history"}),
        ("FOH: mother - POAG", {"glaucoma_family_history"}),
        ("FMH: diabetes (dad)", set()),
        ("FOH: glaucoma - maternal grandmother.", set()),
        # people named after the term, coordinated, possessive, or only reporting
        ("Glaucoma in father.", {"glaucoma_family_history"}),
        ("Mother and grandmother had glaucoma.", {"glaucoma_family_history"}),
        ("Pt's mum has glaucoma.", {"glaucoma_family_history"}),
        ("Mum's sister has glaucoma.", set()),
        ("Pt's mother-in-law has glaucoma.", set()),
        ("Step-father has glaucoma.", set()),
        ("Family hx glaucoma: dad's side (uncle).", set()),
        ("Pt is a carer for husband who is diabetic.", set()),
        ("Carer says pt is diabetic.", {"diabetic"}),
        ("Diabetic daughter.", set()),
        ("Pt concerned about glaucoma as sister has it.", {"glaucoma_family_history"}),
        ("Explained glaucoma, pt anxious as friend has it.", set()),
        ("Brother has OHT.", set()),
        ("Dad ?glaucoma.", set()),
    ],
)
def test_subject_of_each_clause(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("IOP R24 L25", {"ocular_hypertension"}),
        ("Tonometry: R 22 L 21.", {"ocular_hypertension"}),
        ("IOPs (GAT) 24 and 23 mmHg", {"ocular_hypertension"}),
        ("IOP 26 L on Perkins, R 18.", {"ocular_hypertension"}),
        ("IOPs at HES 26/28 (GAT).", {"ocular_hypertension"}),
        # an applanation reading in the note supersedes a raised NCT screen, wherever it is named
        ("IOPs 25/26 NCT, 19/20 GAT - within normal.", set()),
        ("IOPs 22/18 NCT - repeated 19/17 GAT.", set()),
        ("NCT 23/24, GAT 23/23, refer OHT.", {"ocular_hypertension"}),
        # numbers that are not pressures
        ("IOPs 25/24 @ 14:10 Perkins.", {"ocular_hypertension"}),
        ("IOPs 12/13 (NCT 14:32)", set()),
        ("IOPs 15/16, VA 6/24 R.", set()),
        ("IOPs 15/16, 6/24 R.", set()),
        ("IOPs 13/14 on 22/03/2024.", set()),
        ("Blood pressure 95/60.", set()),
        ("Large cupped discs 0.75/0.8, IOPs 17/18.", set()),
    ],
)
def test_iop_readings(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


def test_flags_in_note_order_with_their_clause() -> None:
    flags = infer_from_text("FOH: glaucoma (mum). GH: T2DM, HTN. IOPs 23/24 GAT.")
    assert flags == [
        InferredFlag("glaucoma_family_history", "FOH: glaucoma (mum)"),
        InferredFlag("diabetic", "GH: T2DM"),
        InferredFlag("ocular_hypertension", "IOPs 23/24 GAT"),
    ]


def test_evidence_keeps_the_original_case_and_form_answer() -> None:
    assert infer_from_text("Glaucoma - Y (HES)") == [InferredFlag("glaucoma", "Glaucoma - Y (HES)")]


@pytest.mark.parametrize(
    "note",
    [
        "glaucoma " * 5000,
        "mum " * 3000 + "glaucoma " * 300,
        "no, " * 5000 + "diabetic",
        "(" * 3000 + "glaucoma, " * 2000,
        "IOP " + "1/" * 5000,
    ],
)
def test_long_or_odd_notes_finish(note: str) -> None:
    """Pathological input must not hang the tagger (no catastrophic backtracking): it returns."""
    start = time.perf_counter()
    assert isinstance(infer_from_text(note), list)
    print(f"{len(note)} chars in {time.perf_counter() - start:.3f} s")


def test_evidence_is_the_clause() -> None:
    flags = infer_from_text("VA 6/6. T2DM on metformin. IOPs 15/16.")
    assert flags == [InferredFlag("diabetic", "T2DM on metformin")]


def test_infer_from_iop() -> None:
    assert infer_from_iop(None, None) == []
    assert infer_from_iop(21.9, 15) == []
    assert infer_from_iop(OHT_IOP_MMHG, None) == [InferredFlag("ocular_hypertension", "IOP 22 mmHg (>= 22)")]
    assert infer_from_iop(18, 25.5) == [InferredFlag("ocular_hypertension", "IOP 25.5 mmHg (>= 22)")]
    assert [f.flag for f in infer_from_iop(30, 24)] == ["ocular_hypertension"]


def test_pms_flags_win() -> None:
    evidence = infer_from_text("T2DM. FHx glaucoma (mum).") + infer_from_iop(24, 18)
    out = inferred_flags(["diabetic"], evidence)
    assert set(out) == {"glaucoma_family_history", "ocular_hypertension"}
    assert "diabetic" not in out  # the PMS already set it: never reported as inferred
    assert out["ocular_hypertension"].startswith("IOP 24")
    assert inferred_flags(["diabetic", "glaucoma_family_history", "ocular_hypertension"], evidence) == {}
    assert inferred_flags([], []) == {}


def test_first_evidence_wins() -> None:
    evidence = [InferredFlag("glaucoma", "first"), InferredFlag("glaucoma", "second")]
    assert inferred_flags([], evidence) == {"glaucoma": "first"}


def test_fast_enough() -> None:
    notes = [note for note, _ in _load()]
    batch = (notes * (20_000 // len(notes) + 1))[:20_000]
    start = time.perf_counter()
    for note in batch:
        infer_from_text(note)
    elapsed = time.perf_counter() - start
    # 200,000 notes must take seconds: allow 2 s per 20,000 (20 s for 200k) even on a slow CI box.
    assert elapsed < 2.0, f"{elapsed:.2f}s for 20,000 notes"
