"""Clinical auto-tagging: accuracy on two labelled sets of optometry notes, plus unit tests.

Run ``pytest tests/test_tagging.py -s`` to see the precision/recall tables (``docs/tagging.md`` has them
before and after the child flags and the blind-spot fixes).

Labelling conventions for ``tests/data/clinical_notes_labelled.csv`` and
``tests/data/clinical_notes_labelled_2.csv`` (each note is labelled by its clinical meaning for *this
patient*, not by what the tagger happens to do):

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

The child flags of the 2002 memorandum (the recall rules apply them by age; a note is labelled without
its age, so an adult's squint or glasses carry the flag too):

* ``binocular_vision_anomaly``: a current strabismus (squint, eso/exo/hyper/hypotropia, SOT/XOT, XT,
  IXT, "L ET", microtropia, accommodative esotropia, incomitant deviations: nerve palsies, Duane's,
  Brown's), amblyopia ("lazy eye") or its treatment (patching, occlusion, atropine penalisation), a
  decompensated or symptomatic heterophoria, convergence insufficiency, or a stated "BV anomaly". Not:
  a compensated or unqualified phoria ("small XOP near"), nystagmus alone, diplopia alone (a symptom),
  pseudo-squint/epicanthus, "squints at the board" (screwing up the eyes), a queried one ("?squint",
  "refer orthoptist ?microtropia"), one in a relative. A past one (squint op, patching as a child)
  counts unless the note says it is over ("BV now normal", "eyes straight now", "VA now 6/6 each
  eye"); an accommodative esotropia controlled by glasses still counts.
* ``corrected_refractive_error``: the patient wears or has been given an optical correction: specs,
  glasses, readers, bifocals/varifocals, contact lenses (ortho-k, MiSight), myopia-control lenses, an
  Rx issued/given/updated, "new Rx", a GOS3 voucher, new or broken frames, "forgot specs today". Not:
  "no Rx needed", "specs not required", refraction results alone ("Ret +0.75 OU", "Rx unchanged"),
  sunglasses, safety or plano glasses, a relative's glasses, interest in contact lenses, "might need
  specs next year", specs the parents declined.
* ``progressive_myopia``: the patient's myopia progresses by 0.50 D a year or more in either eye
  (``RAPID_MYOPIA_D_PER_YEAR``, the usual definition of rapid progression): a rate, or an amount
  divided by its period ("1.00D in 18 months" is 0.67 D/yr; "since last year" and "since the last
  test" are a year, as children are tested yearly), or the prescription then and now ("-2.00 to
  -3.00 in 12 months"). A clinician's "rapidly progressing myopia" counts without a figure. Not: a
  slower change, a change without any period, "stable", a relative's myopia, a hyperopic change.

The blind spots of the diabetes and glaucoma reading, labelled as classes:

* A bare diabetes type is diabetes ("T2 diet controlled", "type 1, pump", "DM II"), and so are
  truncations ("Diab.", "diab (T2)"), whatever a negation of something else nearby says ("no diabetic
  meds, T2 diet controlled", "Meds: nil (T2 - diet)": diet-controlled diabetics take no medication).
  A typed syndrome ("Usher type 2", "type 1 Duane's") or a "T2 weighted" scan is not diabetes.
* A negation that opens a list covers every item of it ("denies diabetes, glaucoma or FHx
  glaucoma"); an item that says more ("no diabetes, glaucoma R eye under HES") is a statement of its
  own and keeps its flag. (The tagger carries a plain "no"/"nil" over only a list closed by "or", as
  "nil DM, POAG" may be two statements and a missed glaucoma costs more; "Nil diabetes, glaucoma,
  cataract.", labelled by its likely meaning, stays a false glaucoma.)
* Pre-diabetes, insulin resistance, PCOS or a weight-loss clinic explain metformin (and GLP-1
  agonists) anywhere in the note; heart failure or CKD explain an SGLT2 inhibitor. Insulin, a
  sulfonylurea or a gliptin is diabetes whatever else the note says.
* Glaucoma abbreviations include AACG, CACG, JOAG, SOAG, OAG, XFG, PCG; "PAC" (primary angle
  closure) is not glaucoma.
* A glaucoma suspicion settled at the HES ("previously ?glaucoma, discharged as normal", "found
  normal, NFA", "physiological cupping") is no flag; one discharged to monitoring, for non-attendance
  or with no outcome stated is still ``glaucoma_suspect``, and one followed by a diagnosis is
  ``glaucoma`` only.

Rows 2-294 of the first CSV are the original set. The rows after them came with the clause-based
tagger: new phrasings (drugs, misspellings, forms, headings, possessives, readings, HES letters) written
and labelled by these conventions in batches, each before the tagger was run on it (and then used to
improve the rules). Notes it still gets wrong stay in, so the figures are not flattered. The first CSV
is labelled for the five original flags only and is scored on those.

The second CSV came with the child flags and the blind-spot fixes, and is scored on all eight flags.
Rows 2-263 were written and labelled before the tagger changed (the "before" figures) and then used to
write the rules, so they flatter it; rows 264-333 are a held-out batch written and labelled after the
first round of rules and scored once before any further change (``docs/tagging.md`` has both figures).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from nvc_pipelines.tagging import (
    OHT_IOP_MMHG,
    RAPID_MYOPIA_D_PER_YEAR,
    InferredFlag,
    infer_from_iop,
    infer_from_text,
    inferred_flags,
)

LABELLED = Path(__file__).parent / "data" / "clinical_notes_labelled.csv"
LABELLED_2 = Path(__file__).parent / "data" / "clinical_notes_labelled_2.csv"
ORIGINAL_FLAGS = ("diabetic", "glaucoma", "glaucoma_suspect", "ocular_hypertension", "glaucoma_family_history")
CHILD_FLAGS = ("binocular_vision_anomaly", "corrected_refractive_error", "progressive_myopia")
FLAGS = ORIGINAL_FLAGS + CHILD_FLAGS
MIN_MICRO = 0.90
MIN_PER_FLAG = 0.80
# The second set: the figures reached (docs/tagging.md) less a margin of about one note per flag; the
# recall of diabetes and glaucoma, the costly misses, is held closest.
MIN_MICRO_2 = 0.95
MIN_PER_FLAG_2 = {  # flag: (precision, recall)
    "diabetic": (0.93, 0.97),
    "glaucoma": (0.90, 0.94),
    "glaucoma_suspect": (0.85, 0.92),
    "ocular_hypertension": (0.80, 0.80),
    "glaucoma_family_history": (0.85, 0.85),
    "binocular_vision_anomaly": (0.93, 0.95),
    "corrected_refractive_error": (0.93, 0.93),
    "progressive_myopia": (0.90, 0.92),
}


def _load(path: Path = LABELLED) -> list[tuple[str, set[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(row["note"], {f for f in row["expected_flags"].split(";") if f}) for row in csv.DictReader(fh)]


def _flags(note: str) -> set[str]:
    return {f.flag for f in infer_from_text(note)}


def _evaluate(
    rows: list[tuple[str, set[str]]], flags: tuple[str, ...] = ORIGINAL_FLAGS
) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    counts = {f: [0, 0, 0] for f in flags}  # tp, fp, fn
    errors: list[str] = []
    for note, expected in rows:
        got = _flags(note) & set(flags)
        for flag in flags:
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
    assert all(expected <= set(ORIGINAL_FLAGS) for _, expected in rows)
    unflagged = sum(1 for _, expected in rows if not expected)
    assert 0.3 <= unflagged / len(rows) <= 0.5
    for flag in ORIGINAL_FLAGS:
        assert sum(1 for _, expected in rows if flag in expected) >= 20, flag


def test_second_labelled_set_is_well_formed() -> None:
    rows = _load(LABELLED_2)
    assert len(rows) >= 150
    notes = {note for note, _ in rows}
    assert len(notes) == len(rows), "duplicate notes"
    assert not notes & {note for note, _ in _load()}, "notes already in the first set"
    assert all(expected <= set(FLAGS) for _, expected in rows)
    unflagged = sum(1 for _, expected in rows if not expected)
    assert 0.3 <= unflagged / len(rows) <= 0.5  # hard negatives: negated, queried, relatives', settled
    for flag in (*CHILD_FLAGS, "diabetic"):
        assert sum(1 for _, expected in rows if flag in expected) >= 20, flag
    for flag in ORIGINAL_FLAGS:
        assert sum(1 for _, expected in rows if flag in expected) >= 5, flag


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


def test_precision_and_recall_on_second_labelled_set() -> None:
    rows = _load(LABELLED_2)
    counts, errors = _evaluate(rows, FLAGS)
    table, micro_p, micro_r = _table(counts, len(rows))
    report = table + ("\nMisclassified notes:\n" + "\n".join(errors) if errors else "\nNo misclassified notes.")
    print("\n" + report)
    assert micro_p >= MIN_MICRO_2 and micro_r >= MIN_MICRO_2, report
    for flag, (tp, fp, fn) in counts.items():
        min_precision, min_recall = MIN_PER_FLAG_2[flag]
        assert _ratio(tp, tp + fp) >= min_precision, f"{flag} precision\n{report}"
        assert _ratio(tp, tp + fn) >= min_recall, f"{flag} recall\n{report}"


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


# --------------------------------------------------------------------------------------------------
# Blind spots of the diabetes and glaucoma reading, as classes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # a bare type is the diabetes type, however a nearby negation of something else reads
        ("T2 diet controlled, no diabetic meds.", {"diabetic"}),
        ("T2 diet controlled", {"diabetic"}),
        ("GH: T2, on metformin.", {"diabetic"}),
        ("Pt type 1 since age 7, pump.", {"diabetic"}),
        ("Type II, diet & exercise. No DR.", {"diabetic"}),
        ("T1D, Libre sensor.", {"diabetic"}),
        # truncations
        ("Diab. on tabs. VA 6/6.", {"diabetic"}),
        ("GOS eligibility: diab.", {"diabetic"}),
        ("Diab T2 - Gliclazide.", {"diabetic"}),
        # ... and what they are not
        ("T2 weighted MRI normal (neuro).", set()),
        ("Usher syndrome type 2, RP.", set()),
        ("Type 2 respiratory failure, home O2.", set()),
        ("Type 1 Duane syndrome L, abduction deficit.", {"binocular_vision_anomaly"}),
        ("?T2 - GP checking bloods.", set()),
        ("Mum T2 diet controlled, pt not diabetic.", set()),
        ("FMH: dad diab., mum T2.", set()),
        ("Diab: N. Glauc: N.", set()),
        ("Diab.: no", set()),
    ],
)
def test_bare_types_and_truncations_of_diabetes(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # a negation reaches its own object and the terms coordinated with it, not a remark after it
        ("Not on diabetic medication (T2 diet controlled).", {"diabetic"}),
        ("Nil diabetic meds (T2 - diet).", {"diabetic"}),
        ("Meds: nil (T2 - diet controlled).", {"diabetic"}),
        ("No diabetic meds.", set()),
        ("Declined insulin, T2 on tablets.", {"diabetic"}),  # a declined drug still says diabetic
        ("Declined glaucoma drops, POAG L.", {"glaucoma"}),
        ("No diabetes or glaucoma.", set()),
        ("Nil DM/glaucoma.", set()),
        ("No diabetic retinopathy or glaucoma.", set()),
        ("Not on any diabetic or glaucoma meds.", set()),
    ],
)
def test_negation_reaches_its_own_object(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # a negation that opens a list covers its bare items
        ("Denies diabetes, glaucoma or FHx glaucoma.", set()),
        ("Denies DM, glaucoma, FHx of glaucoma.", set()),
        ("Pt denies DM, HTN, glaucoma.", set()),
        ("Negative for diabetes, glaucoma and family history of glaucoma.", set()),
        ("No hx of diabetes, glaucoma or eye surgery. IOPs 15/15.", set()),
        ("No DM, HTN, glaucoma or OHT.", set()),
        ("Pt denies any eye disease, diabetes or hypertension.", set()),
        ("IDDM. Denies glaucoma, OHT or FHx.", {"diabetic"}),
        ("Diabetes, glaucoma, FHx glaucoma: all no.", set()),
        # an item that says more is a statement of its own; a plain "no"/"nil" needs a closing "or"
        ("Not diabetic, POAG both eyes on Xalatan.", {"glaucoma"}),
        ("No diabetes, glaucoma R eye under HES.", {"glaucoma"}),
        ("Denies diabetes, glaucoma - under HES.", {"glaucoma"}),
        ("Denies diabetes, FHx glaucoma (dad).", {"glaucoma_family_history"}),
        ("No glaucoma, T2DM on metformin.", {"diabetic"}),
        ("Nil DM, POAG.", {"glaucoma"}),
        ("No diabetes, glaucoma.", {"glaucoma"}),
    ],
)
def test_negated_lists(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # metformin and GLP-1 agonists explained by the patient's pre-diabetes, PCOS, weight-loss clinic
        ("Pre-diabetes, metformin started by GP.", set()),
        ("Pre-diabetic. GP started metformin.", set()),
        ("Pre-DM per GP, started on metformin.", set()),
        ("Insulin resistance; metformin 500mg.", set()),
        ("Pt has PCOS (metformin) and hypothyroid.", set()),
        ("Semaglutide injections - weight loss clinic.", set()),
        # SGLT2 inhibitors by heart failure or CKD
        ("Heart failure - dapagliflozin, furosemide.", set()),
        # ... but not someone else's pre-diabetes, a former one, weight advice, or a diabetes-only drug
        ("Wife pre-diabetic. Pt on metformin.", {"diabetic"}),
        ("Was pre-diabetic, now on metformin.", {"diabetic"}),
        ("Pre-diabetes 2020, now T2DM on metformin.", {"diabetic"}),
        ("Metformin 500mg bd. Advised weight loss.", {"diabetic"}),
        ("Pre-diabetic, gliclazide 40mg.", {"diabetic"}),
        ("Heart failure. Metformin, dapagliflozin.", {"diabetic"}),
        ("Dapagliflozin, metformin, ramipril.", {"diabetic"}),
    ],
)
def test_drugs_explained_by_another_condition(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("AACG R 2016, PI both eyes, IOPs 16/17.", {"glaucoma"}),
        ("Hx AACG L - laser PI under HES.", {"glaucoma"}),
        ("JOAG diagnosed age 30, on Cosopt.", {"glaucoma"}),
        ("Secondary OAG (pigment dispersion) - HES.", {"glaucoma"}),
        ("XFG L.", {"glaucoma"}),
        ("Dad had AACG.", {"glaucoma_family_history"}),
        ("?AACG - red painful eye, refer.", {"glaucoma_suspect"}),
        ("Possible PACG R, urgent HES.", {"glaucoma_suspect"}),
        ("PAC (primary angle closure) - PI both eyes. No glaucoma.", set()),
    ],
)
def test_glaucoma_abbreviations(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # settled at the HES
        ("Previously ?glaucoma, discharged as normal.", set()),
        ("Ex-glaucoma suspect, discharged by HES 2021.", set()),
        ("Glaucoma suspect 2017, found normal at HES, NFA.", set()),
        ("Was referred for suspicious discs in 2019, physiological cupping, discharged.", set()),
        ("Previously monitored as glaucoma suspect; HES discharged, discs healthy.", set()),
        ("Suspect glaucoma, HES: OHT only, discharged.", {"ocular_hypertension"}),
        # not settled: monitoring, no outcome, another clinic, non-attendance, a diagnosis since
        ("Previously glaucoma suspect, now discharged to community monitoring scheme.", {"glaucoma_suspect"}),
        ("Previously ?glaucoma R, no outcome letter received.", {"glaucoma_suspect"}),
        ("?glaucoma R - refer routine. Discharged from cataract clinic 2022.", {"glaucoma_suspect"}),
        ("Previously ?glaucoma. Discharged from cataract clinic.", {"glaucoma_suspect"}),
        ("?glaucoma, DNA x2 - discharged by HES.", {"glaucoma_suspect"}),
        ("?glaucoma R, pt discharged himself from HES.", {"glaucoma_suspect"}),
        ("Previously glaucoma suspect, now POAG on drops.", {"glaucoma"}),
        ("POAG, discharged to community glaucoma scheme.", {"glaucoma"}),
    ],
)
def test_settled_glaucoma_suspicion(note: str, expected: set[str]) -> None:
    assert _flags(note) == expected


# --------------------------------------------------------------------------------------------------
# The child flags
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("Age 5. Cover test: R SOT 15Δ near and distance. Refer HES orthoptics.", True),
        ("Intermittent exotropia (IXT) at distance, good control.", True),
        ("Manifest L XT on near cover test.", True),
        ("Squint op aged 4 (L ET). Small residual L SOT on cover test.", True),
        ("L amblyopia, VA 6/18 L. Patching 2 hrs/day via HES.", True),
        ("Ambylopia R - 6/18 best corrected.", True),
        ("R lazy eye since childhood, never treated.", True),
        ("Decompensated exophoria at near, symptomatic.", True),
        ("Intermittent diplopia, decompensated vertical phoria - Fresnel prism trial.", True),
        ("Convergence insufficiency - NPC 15cm, pencil push-ups advised.", True),
        ("R 6th nerve palsy following head injury.", True),
        ("Duane's syndrome type 1 L.", True),
        ("BV anomaly noted at school screening.", True),
        ("L ET, awaiting squint surgery at HES.", True),
        ("Esotropia R (accommodative), eyes straight with specs on.", True),
        ("Squint op aged 4.", True),  # a past squint counts unless the note says it is over
        # negated, queried, someone else's, over, or not a BV anomaly at all
        ("No squint, no Rx needed, VA 6/6.", False),
        ("Orthoptic report: no manifest squint, small compensated exophoria.", False),
        ("Small XOP near, well compensated, no symptoms.", False),
        ("?squint noted by nursery - cover test today ortho.", False),
        ("Refer orthoptist ?microtropia L.", False),
        ("Possible squint in photos per mum.", False),
        ("Mum has a lazy eye. Child: VA 6/6 R&L, cover test ortho.", False),
        ("Sister has strabismus. Pt: no strabismus, BV normal.", False),
        ("Squint corrected surgically as a child, BV now normal.", False),
        ("Childhood squint op, eyes straight now.", False),
        ("Hx of lazy eye as a child, VA now 6/6 each eye, BV normal.", False),
        ("Pseudo-squint due to wide epicanthus, cover test normal.", False),
        ("Pt squints to see the board at school.", False),
        ("Tends to squint in bright sunlight.", False),
        ("Nystagmus since birth, VA 6/18 binocular.", False),
        ("Screened for lazy eye at school - normal.", False),
    ],
)
def test_binocular_vision_anomaly(note: str, expected: bool) -> None:
    assert ("binocular_vision_anomaly" in _flags(note)) is expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ("First specs - hyperopia +3.00 OU. Wear full time.", True),
        ("Wears specs for school (myopic).", True),
        ("Rx issued - astigmatism -1.50 x 180 OU.", True),
        ("New specs ordered. GOS3 voucher issued.", True),
        ("Lost glasses at school, replacement ordered.", True),
        ("Forgot specs today - VA with pinhole 6/6.", True),
        ("Contact lenses (dailies) for sport.", True),
        ("Pt wears CLs - monthlies, 12 hrs/day.", True),
        ("Ortho-K lenses nightly for myopia control.", True),
        ("Myopia control specs (Stellest) dispensed.", True),
        ("Broken frames, new pair under GOS.", True),
        ("Reading glasses +1.50 from pharmacy.", True),
        ("CL check - good fit.", True),
        # no correction: not needed, only measured, other glasses, someone else's, only an interest
        ("Ret +0.75 OU, VA 6/6 R&L. No Rx needed.", False),
        ("Low hyperopia, specs not required at present.", False),
        ("Doesn't wear specs, VA 6/5 R&L.", False),
        ("Spectacles: none.", False),
        ("Rx unchanged since last year.", False),
        ("Rx -0.50 OU, not issued - VA 6/6 unaided.", False),
        ("Sunglasses advice given.", False),
        ("Safety glasses for work, plano.", False),
        ("Dad wears glasses. Pt: VA 6/6 unaided.", False),
        ("Interested in contact lenses, no Rx.", False),
        ("Might need specs next year, monitor.", False),
        ("Bandage CL R for abrasion.", False),
        ("Pt declined specs, review 6 months.", False),
        ("Specs declined by mum.", False),
        ("Referral within NICE time frames.", False),
    ],
)
def test_corrected_refractive_error(note: str, expected: bool) -> None:
    assert ("corrected_refractive_error" in _flags(note)) is expected


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        # the examples
        ("Myopia progressing -0.75D/yr.", True),
        ("Myopic shift 1.00D in 12 months R&L.", True),
        ("Increased by -0.5DS since last year both eyes.", True),
        # rates, amounts over periods (6/12 is six months), then and now, stated as rapid
        ("Myopia progressed -1.00 over 2 years.", True),  # 0.50 D/yr: at the threshold
        ("Myopic progression of 0.50DS in 6/12.", True),
        ("Myopia increased by 1.00DS in the last 18 months.", True),
        ("Myopia progression approx 0.5 D/annum.", True),
        ("Short-sighted, increased -0.75 since last test.", True),
        ("Myopia getting worse quickly, -1.25 change in 12 months.", True),
        ("R -2.00 to -3.00 in 12 months.", True),
        ("Myopia: R -2.00 (was -1.25 12 months ago).", True),
        ("Rapidly progressing myopia - refer for myopia management.", True),
        # slower, no period, stable, someone else's, not myopia
        ("Myopia progressing 0.4D/yr.", False),
        ("Myopia increased by 0.25D since last year.", False),
        ("Myopic change 0.50D over 3 years.", False),
        ("Myopic progression slowed from 1.00D/yr to 0.25D/yr since starting MiSight.", False),
        ("Myopia progressing, slight change only (-0.25).", False),
        ("Myopia increasing - refer myopia management clinic.", False),
        ("No myopic progression this year.", False),
        ("Dad's myopia progressed rapidly as a teen.", False),
        ("Brother's myopia progressing fast, pt hyperopic +1.00.", False),
        ("Hyperopia reduced by 0.50 since last year.", False),
        ("Mum is very myopic (-8.00). Pt emmetropic.", False),
    ],
)
def test_progressive_myopia(note: str, expected: bool) -> None:
    assert ("progressive_myopia" in _flags(note)) is expected


def test_progressive_myopia_threshold_and_evidence() -> None:
    assert RAPID_MYOPIA_D_PER_YEAR == 0.50
    assert infer_from_text("VA 6/9. Myopia progressing 0.50D/yr. New specs.") == [
        InferredFlag("corrected_refractive_error", "New specs"),
        InferredFlag("progressive_myopia", "Myopia progressing 0.50D/yr"),
    ]
    assert infer_from_text("Myopia progressing 0.49D/yr.") == []


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
