"""Clinical auto-tagging: risk flags inferred from free-text notes and exam measurements.

Inferred flags are marked as such, never overwrite a flag the PMS set, and feed the recall rules.
Precision and recall are measured on two labelled sets of notes in ``tests/test_tagging.py`` (its
docstring has the labelling conventions this module follows; ``docs/tagging.md`` has the figures).

The flags: ``diabetic``, ``glaucoma``, ``glaucoma_suspect``, ``ocular_hypertension``,
``glaucoma_family_history``, and the three child flags of the 2002 memorandum:
``binocular_vision_anomaly``, ``corrected_refractive_error`` and ``progressive_myopia``. The tagger
has no age: it infers these for anyone, and the recall rules apply them to children only.

How a note is read (regular expressions only, so 200,000 notes take seconds):

1. The note is lower-cased and cut into sentences (``.`` not inside a number nor before a form answer
   as in "Diab.: N", ``;``, line breaks) and each sentence into clauses (commas and `` - `` outside
   brackets, "but", "however"...). A clause that is only a relative ("- father", "(mum)") or only a
   form answer ("- no", "- nil", "- yes") is joined to its neighbour, so "FHx glaucoma - no" and "F/H
   glaucoma - father" read as one statement.
2. Section headings ("GH:", "Meds:", "FOH:", "FMH:", "Fam hist:") say whom the rest of the sentence
   is about: the patient, or the patient's family.
3. In each clause, clinical terms are found: diagnoses, abbreviations (T2DM, IDDM, POAG, NTG, OHT;
   any "..OAG"/"..ACG" such as AACG, JOAG, CACG), bare diabetes types ("T2 diet controlled", "type 1,
   pump") and truncations ("Diab."), common misspellings, drugs (brand and generic), glaucoma
   procedures, DESP grades (R0M0); binocular vision anomalies (squint, strabismus, eso/exo/hypertropia,
   SOT/XOT, XT, "L ET", amblyopia, "lazy eye", patching, decompensated phorias, convergence
   insufficiency, nerve palsies, Duane's); refractive corrections (specs, glasses, readers, contact
   lenses, ortho-k, "Rx issued", "new Rx", GOS3 vouchers). Longer terms win over the words inside them,
   so "diabetes insipidus", "pre-diabetic", "glaucoma suspect", "Usher type 2", "type 1 Duane's",
   "T2 weighted", "pseudo-squint" and "sunglasses" are never read as the shorter term.
4. Each term is then qualified by its clause:
   * subject: the patient, a first-degree relative (parent, sibling, child), another relative
     (grandparent, aunt, cousin...), someone else (husband, wife, carer, friend, in-laws), or an
     unspecified family history ("FHx glaucoma"). The nearest person named before the term decides
     ("Pt is a carer for husband who is diabetic"), else one named right after it ("glaucoma in
     father", "FHx POAG (dad)"). Possessives are followed ("pt's mum" is a parent, "mum's sister" an
     aunt), a person who only reports ("carer says ...") is not the subject, and "... as her sister
     has it" gives the sister the condition just named;
   * negation: a cue shortly before the term and in the same scope ("no", "denies", "nil", "non-",
     "not on any"), a verdict right after it ("ruled out", "excluded", "not needed") or a negative
     form answer closing the clause ("Diabetic: N", "FHx glaucoma - no"). A cue reaches the terms
     coordinated with the first one it negates ("no diabetes or glaucoma", "nil DM/glaucoma"), not a
     term after another object ("not on diabetic meds (T2 diet controlled)"), nor a bracket after a
     bare answer ("Meds: nil (T2 - diet controlled)"). A negation that opens a list covers its
     comma-separated bare items ("denies diabetes, glaucoma or FHx glaucoma"; with a plain "no" only
     when the list is closed by "or"/"nor"), and "...: all no" the items before it;
   * uncertainty: "?glaucoma", "query", "possible", "likely", "suspected", "r/o", "might need",
     "referred for glaucoma assessment", and "early" glaucoma ("awaiting squint surgery" is not);
   * topic only: leaflets, screening, tests, risk factors, worries, interest ("leaflet on diabetes",
     "glaucoma screening normal", "asked about glaucoma test", "interested in contact lenses").
5. Flags follow from term and qualifiers: the patient's uncertain glaucoma is ``glaucoma_suspect``, any
   other uncertain condition ("?diabetes", "?OHT", "?squint") is no flag; a first-degree or
   unspecified relative's glaucoma is ``glaucoma_family_history``; anyone else's condition is no flag
   for the patient. A glaucoma suspicion settled later in its sentence ("previously ?glaucoma,
   discharged as normal"; in the next sentence too when it is past) is no flag, nor is a past one in a
   note that diagnoses glaucoma; a binocular vision anomaly stated to be over ("squint op as a child,
   BV now normal") is no flag. A drug given for something else ("metformin for PCOS") is no evidence;
   metformin and GLP-1 agonists in a note where the patient is pre-diabetic (or has insulin resistance,
   PCOS, a weight-loss clinic) and SGLT2 inhibitors in a note with heart failure or CKD are taken to
   treat that. Anti-glaucoma drops in a note that states OHT are taken to treat the OHT, not glaucoma.
6. IOP readings ("IOPs 23/24 GAT", "IOP R 19 L 22", "Tonometry: R 22 L 21") of ``OHT_IOP_MMHG`` or
   more suggest ocular hypertension, unless a Goldmann/Perkins (applanation) reading in the same note
   is below the threshold: it supersedes an NCT screen. Dates, times, acuities, C/D ratios and blood
   pressures are not read as pressures.
7. Myopic progression of ``RAPID_MYOPIA_D_PER_YEAR`` or more in either eye is ``progressive_myopia``:
   a rate ("-0.75D/yr", "0.5D p.a."), an amount over a period ("1.00D in 12 months", "-0.50 in 6/12",
   "over 2 years"; "since last year/test" is a year), a prescription then and now ("-2.00 to -3.00
   in 12 months", "-2.00 (was -1.25 a year ago)"), or stated as rapid ("rapidly progressing myopia").
   Without the word myopia only a minus change counts, and a change with no period is not read.
"""

from __future__ import annotations

import re
import string
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

# IOP at or above this (mmHg) in either eye suggests ocular hypertension (NICE NG81: 24 mmHg refers,
# but optometrists flag from 22 for monitoring, as "IOP 22mmHg" notes do).
OHT_IOP_MMHG = 22.0
# Myopia progressing at this (dioptres a year) or faster in either eye is rapid (the usual definition in
# myopia management; the 2002 memorandum says only "rapidly progressing myopia").
RAPID_MYOPIA_D_PER_YEAR = 0.50


@dataclass(frozen=True, slots=True)
class InferredFlag:
    flag: str
    evidence: str  # the clause (or measurement) it was inferred from


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

# "glaucoma" and its common misspellings (glaucomma, glacoma, galucoma, glucoma, gloucoma), and "glauc".
_GLAUC = r"(?:g[laou]{2,4}c{1,2}o?u?m{1,2}as?|glauc)"
_IOP_WORD = r"(?:iop'?s?|intra-?\s?ocular\s+pressures?)"

_DIABETES_DRUGS = (
    # sulfonylureas, gliptins, glitazone, SGLT2 inhibitors only licensed for diabetes, meglitinides
    r"gliclazide|glimepiride|glibenclamide|glipizide|tolbutamide|"
    r"sitagliptin|januvia|janumet|linagliptin|trajenta|jentadueto|alogliptin|vipidia|saxagliptin|onglyza|"
    r"vildagliptin|galvus|eucreas|pioglitazone|actos|synjardy|"
    r"xigduo|canagliflozin|invokana|vokanamet|ertugliflozin|steglatro|repaglinide|nateglinide|acarbose|"
    r"(?:oral\s+)?hypoglycaemics?|"
    # insulins and glucose monitoring
    r"insulins?|lantus|levemir|novorapid|novomix|humalog|humulin|tresiba|toujeo|abasaglar|apidra|fiasp|"
    r"lyumjev|insulatard|semglee|xultophy|degludec|glargine|detemir|"
    r"(?:freestyle\s+)?libre(?:\s+sensor)?|dexcom"
)
# Diabetes drugs also given without diabetes: metformin and GLP-1 agonists for pre-diabetes, insulin
# resistance, PCOS or weight; SGLT2 inhibitors (dapagliflozin, empagliflozin) for heart failure or CKD.
_METABOLIC_DRUGS = (
    r"metformin|glucophage|liraglutide|victoza|semaglutide|ozempic|rybelsus|dulaglutide|trulicity|exenatide|"
    r"byetta|bydureon|lixisenatide|lyxumia|tirzepatide|mounjaro"
)
_CARDIORENAL_DRUGS = r"empagliflozin|jardiance|dapagliflozin|forxiga"
_GLAUCOMA_DRUGS = (
    # prostaglandin analogues, beta-blockers, carbonic anhydrase inhibitors, alpha agonists, ROCK
    # inhibitors, miotics, and their combinations (brand names as written on UK notes)
    r"latanoprost(?:ene)?|xalatan|xalacom|monopost|medizol|travoprost|travatan|duotrav|bimatoprost|"
    r"lumigan|ganfort|tafluprost|saflutan|taptiqom|timolol|timoptol|tiopex|betaxolol|betoptic|"
    r"levobunolol|carteolol|dorzolamide|trusopt|cosopt|brinzolamide|azopt|azarga|simbrinza|brimonidine|"
    r"alphagan|combigan|apraclonidine|iopidine|netarsudil|rhokiinsa|roclanda|pilocarpine|"
    rf"{_GLAUC}\s+(?:eye\s*)?(?:drops|gtts|meds|medications?|treatment)|"
    # glaucoma procedures (laser iridotomy alone is for narrow angles, not glaucoma)
    r"slt|trabeculoplasty|trabeculectomy|trabs?|istents?|hydrus|xen(?:\s+(?:gel\s+)?stent)?|preserflo|"
    r"baerveldt|ahmed\s+valve|tube\s+(?:shunt|surgery)|cyclodiode|cyclophotocoagulation|migs|"
    r"deep\s+sclerectomy|canaloplasty"
)

# Terms by kind, tried in this order; at one position the first alternative that matches wins, so the
# longer or more specific terms come first ("diabetes insipidus" before "diabetes", "glaucoma suspect"
# before "glaucoma"). Text is lower-cased before matching. The alternatives are compiled into one regex
# dispatched on their first character (``_by_first_character``), which keeps the scan fast however many
# terms there are.
_TERM_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # words that would otherwise be read as a term: a typed syndrome ("Usher type 2", "type 1 ROP") is
    # not diabetes, a "T2 weighted" scan is not a diabetic, a pseudo-squint is not a squint, sunglasses
    # and safety glasses are no refractive correction
    (
        "other",
        (
            r"pseudo[-\s]?(?:squint|strabismus|esotropia|exotropia)",
            r"(?:sun|safety|swimming|ski|blue[-\s]?light|3d|magnifying)[-\s]?(?:glasses|specs|spectacles|goggles)\b",
            r"screen\s+readers?\b|bandage\s+(?:contact\s+lens(?:es)?|cls?)\b",
            r"t[12][-\s]*weighted",
            r"(?:usher|stickler|waardenburg|alport|marfan|neurofibromatosis|nf|rop|mactel|macular\s+telangiectasia)"
            r"(?:'?s)?(?:\s+syndrome)?\s+type\s*(?:[1-4]|i{1,3}|iv)\b",
            r"type\s*(?:[1-4]|i{1,3}|iv)\s+(?:usher|stickler|waardenburg|neurofibromatosis|nf|rop|mactel|"
            r"macular|cnv|mnv|choroid\w*|neovasc\w*|error|respiratory|hypersens\w*|collagen)",
        ),
    ),
    # binocular vision anomalies: strabismus (and its abbreviations: SOT/XOT, XT/IXT, "L ET"), amblyopia
    # and its treatment, decompensated phorias, convergence anomalies, incomitant deviations
    (
        "bv",
        (
            r"type\s*(?:[1-3]|i{1,3})\s+duane'?s?(?:\s+(?:retraction\s+)?syndrome)?",
            r"duane'?s?(?:\s+(?:retraction\s+)?syndrome)?(?:\s+type\s*(?:[1-3]|i{1,3})\b)?",
            r"brown'?s\s+syndrome",
            r"strabism\w*|strab\b|squint\b",
            r"(?:micro|hetero|eso|exo|hyper|hypo|cyclo)tropi\w*|tropias?\b",
            r"(?:[rl]|alt)?(?:sot|xot)\b|(?:[rlai])?xt\b",
            r"(?:r|l|rt|lt|alt(?:ernating)?|accommodative|acc|intermittent|constant|small|residual|micro|infantile|"
            r"manifest)\s+et\b",
            r"amb(?:ly|yl|li|l)op\w*",
            r"lazy\s+eyes?\b",
            r"patching\b|occlusion\s+(?:therapy|treatment)\b|(?:atropine\s+)?penali[sz]ation\b",
            r"(?:bv|binocular(?:\s+vision)?)\s+(?:anomal\w*|problems?|disorders?|dysfunction|defects?|abnormalit\w*)",
            r"conv(?:ergence|\.)?\s+(?:insuff\w*|weakness|excess)",
            r"(?:decompensat\w*|symptomatic)\s+(?:[a-z]+\s+)?(?:(?:eso|exo|hyper|hypo|hetero)(?:phori\w*)?\b|sop\b|xop\b|"
            r"phori\w*)",
            r"(?:(?:eso|exo|hyper|hypo|hetero)phori\w*|sop|xop|eso|exo)\s*[(,-]?\s*decompensat\w*",
            r"(?:(?:3rd|4th|6th|third|fourth|sixth|iii|iv|vi)\s+(?:cranial\s+)?nerve|cn\s*(?:3|4|6|iii|iv|vi))\s+"
            r"(?:pals(?:y|ies)|paresis)",
            r"manifest\s+(?:squint|deviation|strabismus)",
        ),
    ),
    # a refractive correction worn or given: spectacles, contact lenses, an issued prescription
    (
        "rx",
        (
            r"specs\b|spectacles?\b|glasses\b|readers\b|(?:vari|bi|tri)focals?\b|reglaze\w*",
            r"(?:new|broken|damaged|bent|snapped|replacement)\s+frames?\b|"
            r"frames?\s+(?:chosen|ordered|broken|repaired|adjusted|damaged|selected)\b",
            r"contact\s+lens(?:es)?\b|cls\b|cl\s+(?:wearer|wear|aftercare|a/c|fit\w*|trial|check|user|patient|px)\b",
            r"dailies\b|monthlies\b|rgps?\b|ortho[-\s]?k\b|orthokeratology\b|misight\b|stellest\b|miyosmart\b",
            r"rx\s+(?:(?:was|has\s+been|now|today|to\s+be)\s+)?(?:issued|given|dispensed|prescribed|updated|changed|"
            r"supplied|made\s+up|collected|ordered)\b",
            r"(?:new|first|updated)\s+(?:rx|prescription)\b|prescription\s+(?:issued|given|dispensed|updated)\b",
            r"gos\s?3\b|(?:spectacle|gos)\s+vouchers?\b",
        ),
    ),
    # diabetes that is not diabetes mellitus of the patient now; pre-diabetes and other reasons for
    # metformin or an SGLT2 inhibitor (an "indication" explains those drugs anywhere in the note)
    (
        "prediabetes",
        (
            r"pre[-\s]?(?:diabet\w*|diab\b|t2dm\b|dm\b|t2\b)",
            r"borderline\s+(?:type\s*(?:2|ii)\s+)?(?:diabet\w*|dm|sugars?)\b",
            r"insulin\s+resistan\w*",
        ),
    ),
    ("not_diabetes", (r"diabetes\s+insipidus\b", r"non[-\s]?diabet\w*")),
    (
        "metabolic_indication",
        (
            r"pcos\b|polycystic\s+ovar\w*|bariatric\w*|obesity\s+(?:clinic|service)\b|"
            r"weight[-\s](?:loss|management|reduction)\s+(?:clinic|service|programme|program|injections?|jabs?)\b",
        ),
    ),
    ("cardiorenal_indication", (r"heart\s+failure\b|ckd\b|chronic\s+kidney\s+disease\b|hfref\b|ccf\b",)),
    ("gestational", (r"gestational\s+diabet\w*", r"gdm\b", r"diabet\w*\s+(?:in|during|of)\s+pregnancy\b")),
    (
        "diabetes",
        (
            r"non[-\s]?insulin[-\s]dependent(?:\s+diabet\w*)?",
            r"insulin[-\s]dependent(?:\s+diabet\w*)?",
            # diabetes, diabetic and their misspellings (diabeties, diebetic, diabetis, diabtes, daibetic)
            r"d(?:ia|ie|ai|ei|a|i)b(?:e{1,2}|i)?t(?:es|is|ies|ic|ics|c|s|ys)(?:\s+mellitus)?\b",
            r"t[12]\s*dm\b",
            r"t[12]d?\b",  # "T2 diet controlled", "T1 on a pump": a bare type is the diabetes type
            r"type\s*(?:1|2|i{1,2}|one|two)\b",
            r"diab(?:et?)?\b",  # "Diab.", "diab (T2)"
            r"dm\s*(?:t?[12]|type\s*(?:1|2|i{1,2}|one|two))\b",
            r"n?iddm\b",
            r"dm\b",
            r"lada\b",
            r"mody\b",
        ),
    ),
    (
        "diabetic_eye",  # diabetic retinopathy findings, DESP grades, screening programme
        (
            r"background\s+(?:diabetic\s+)?(?:retinopathy|dr)\b",
            r"(?:pre|non)[-\s]?proliferative\s+(?:diabetic\s+)?(?:retinopathy|dr)\b",
            r"proliferative\s+(?:diabetic\s+)?(?:retinopathy|dr)\b",
            r"(?:mild|moderate|severe)\s+dr\b",
            r"n?pdr\b",
            r"bdr\b",
            r"dr\s+(?:screening|grad\w*)",
            r"desp\b",
            r"drss\b",
            r"retinopathy\s+screening",
            r"r[0-3]a?\s*m[01]\b",
        ),
    ),
    ("diabetes_drug", (rf"(?:{_DIABETES_DRUGS})\b",)),
    ("metabolic_drug", (rf"(?:{_METABOLIC_DRUGS})\b",)),
    ("cardiorenal_drug", (rf"(?:{_CARDIORENAL_DRUGS})\b",)),
    ("suspect", (rf"{_GLAUC}\s*(?:suspects?\b|susp\b\.?|query\b|\?)",)),  # glaucoma queried, not diagnosed
    (
        "suspect_sign",  # signs that make glaucoma suspected (in a diagnosed glaucoma, part of it)
        (
            r"glaucomatous\b",
            r"suspicious\s+(?:looking\s+)?(?:optic\s+)?(?:discs?|cupping|cups?|nerves?|onh|nerve\s+heads?|rnfl)\b",
            r"(?:discs?|cupping|onh|optic\s+nerves?)\s*[:\-]?\s+(?:(?:look|looks|looking|appear|appears|are|is)\s+)?"
            r"suspicious\b",
            r"(?:increased|increasing|enlarging|asymmetric(?:al)?|pathological)\s+(?:optic\s+)?(?:disc\s+)?"
            r"(?:cupping|c\s*/\s*d\b(?:\s*ratios?)?)",
            r"c\s*/\s*d\s+asymmetr\w*",
        ),
    ),
    ("fh_glaucoma", (r"fhg\b",)),  # "FHG": family history of glaucoma
    ("glaucoma_drug", (rf"(?:{_GLAUCOMA_DRUGS})\b",)),
    (
        "glaucoma",
        (
            # POAG, COAG, JOAG, SOAG, OAG, AACG, CACG, PACG, ACG, NTG, PXFG/PXG/PEXG/XFG, PDG, NVG, PCG
            rf"(?:[a-z][a-z]?(?:oag|acg)|oag|acg|ntg|ltg|p(?:xf|x|ex)g|xfg|pdg|nvg|pcg|{_GLAUC})\b",
            # acute or chronic angle closure is glaucoma; primary angle closure (suspect), narrow angles are not
            r"(?:acute|chronic)\s+angle[-\s]closure(?!\s+suspects?\b)\b",
        ),
    ),
    (
        "oht",
        (
            r"o\.?h\.?t\b",
            r"ocular\s+(?:hypertens\w*|htn)\b",
            rf"(?:raised|elevated|high|increased)\s+(?:{_IOP_WORD}|(?:eye\s+)?pressures?)\b",
            rf"(?:{_IOP_WORD}|p(?<!blood\sp)ressures?)\s+(?:(?:are|were|is|was|remains?|still|slightly|very|quite)\s+)*"
            r"(?:raised|elevated|high)\b",
        ),
    ),
)


def _closing(pattern: str, at: int) -> int:
    """Index of the bracket closing the group that opens at ``at``."""
    depth, i, in_class = 0, at, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced pattern {pattern!r}")


def _top_level(pattern: str) -> list[str]:
    """The pattern's top-level alternatives."""
    parts, start, i, in_class = [], 0, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            i = _closing(pattern, i)
        elif char == "|":
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    return [*parts, pattern[start:]]


def _literal_first(pattern: str) -> list[str]:
    """The pattern as alternatives (in its order of preference) that each start with a literal character
    or a character class, where it can: the regex engine skips such an alternative with one comparison at
    a position it cannot match, which keeps a scan with a few hundred alternatives fast."""
    parts = _top_level(pattern)
    if len(parts) > 1:
        return [alternative for part in parts for alternative in _literal_first(part)]
    if pattern.startswith("(?:"):
        close = _closing(pattern, 0)
        inner, rest = pattern[3:close], pattern[close + 1 :]
        optional = rest.startswith("?") and not rest.startswith("??")
        if optional:
            rest = rest[1:]
        elif rest[:1] in ("*", "+", "{", "?"):
            return [pattern]
        out = [alternative for part in _top_level(inner) for alternative in _literal_first(part + rest)]
        return out + _literal_first(rest) if optional else out
    if len(pattern) > 2 and pattern[0].isalnum() and pattern[1] == "?" and pattern[2] not in "?+*":
        return _literal_first(pattern[0] + pattern[2:]) + _literal_first(pattern[2:])  # "n?iddm"
    return [pattern]


def _by_first_character(patterns: Iterable[tuple[str, str]]) -> tuple[str, tuple[str, ...]]:
    """One regex for (kind, pattern) pairs, dispatched on the first character: ``\\b(?:a(?:...)|b(?:...)|...)``,
    each pattern keeping its order of preference among those that can start at the same character. Each
    alternative ends with an empty group, whose number tells the kind of the term that matched; returns
    the regex and the kind of each group."""
    buckets: dict[str, list[tuple[str, str]]] = {}
    for kind, pattern in patterns:
        for alternative in _literal_first(pattern):
            end = alternative.index("]", 2) + 1 if alternative[0] == "[" else 1
            first, rest = alternative[:end], alternative[end:]
            if first in "\\(.^$" or rest[:1] in ("?", "*", "+", "{"):
                raise ValueError(f"a term must start with a literal character or a class: {alternative!r}")
            chars = [c for c in _FIRST_CHARACTERS if re.fullmatch(first, c)] if end > 1 else [first]
            for char in chars:
                buckets.setdefault(char, []).append((kind, rest))
    kinds = [""]
    parts = []
    for char, entries in buckets.items():
        parts.append(re.escape(char) + "(?:" + "|".join(f"{rest}()" for _, rest in entries) + ")")
        kinds.extend(kind for kind, _ in entries)
    return r"\b(?:" + "|".join(parts) + ")", tuple(kinds)


_FIRST_CHARACTERS = string.ascii_lowercase + string.digits
_TERMS_PATTERN, _KIND_OF_GROUP = _by_first_character((kind, p) for kind, patterns in _TERM_KINDS for p in patterns)
_TERMS = re.compile(_TERMS_PATTERN)
_KINDS_FLAG = {
    "bv": "binocular_vision_anomaly",
    "rx": "corrected_refractive_error",
    "diabetes": "diabetic",
    "diabetic_eye": "diabetic",
    "diabetes_drug": "diabetic",
    "metabolic_drug": "diabetic",
    "cardiorenal_drug": "diabetic",
    "gestational": "diabetic",
    "suspect": "glaucoma_suspect",
    "suspect_sign": "glaucoma_suspect",
    "fh_glaucoma": "glaucoma",
    "glaucoma": "glaucoma",
    "glaucoma_drug": "glaucoma",
    "oht": "ocular_hypertension",
}
_GLAUCOMA_KINDS = frozenset({"glaucoma", "glaucoma_drug", "fh_glaucoma"})
_DRUG_KINDS = frozenset({"diabetes_drug", "metabolic_drug", "cardiorenal_drug", "glaucoma_drug"})
# Terms that are never a flag themselves.
_NO_FLAG_KINDS = frozenset({"other", "not_diabetes"})
# "was pre-diabetic, now on metformin": a former condition explains nothing.
_FORMERLY = re.compile(r"\b(?:was|previously|formerly|no\s+longer|used\s+to\s+be)\s+(?:\w+\s+)?$")
# The patient's conditions that explain a drug ("pre-diabetes ... metformin"), and the drugs they explain.
_INDICATION_OF = {
    "prediabetes": "metabolic_drug",
    "metabolic_indication": "metabolic_drug",
    "cardiorenal_indication": "cardiorenal_drug",
}
_SUSPECT_KINDS = frozenset({"suspect", "suspect_sign"})

# A drug given for something else ("metformin for PCOS", "bimatoprost for lashes").
_OTHER_INDICATION = re.compile(
    r"\b(?:pcos|polycystic|weight\s+(?:loss|management|reduction)|obesity|lashes|eyelash\w*|rosacea|"
    r"presbyop\w*|dry\s+mouth|fertility)\b|\bpre[-\s]?diabet|\binsulin\s+resistan|"
    r"\bfor\s+(?:migraines?|tremor|anxiety|bp|blood\s+pressure|hypertension|heart|angina|palpitations|altitude)\b",
)
# Gestational diabetes that has resolved (in the sentence): a history of it is not diabetes now.
_PAST = re.compile(
    r"\b(?:hx|h/o|history|previous(?:ly)?|prev|past|prior|resolved|former(?:ly)?|(?:19|20)\d\d)\b|"
    r"\b(?:last|previous|earlier|first|second)\s+pregnancy\b",
)
_PREGNANT_NOW = re.compile(
    r"\b(?:\d+\s*(?:/40|weeks?|wks?)\s+pregnant|(?:currently|now)\s+pregnant|pregnant\s+now|current\s+pregnancy)\b"
)

# --------------------------------------------------------------------------------------------------
# Who a mention is about
# --------------------------------------------------------------------------------------------------

_FIRST_DEGREE = (
    r"mother|mum|mom|mam|mummy|mommy|father|dad|daddy|papa|brothers?|bro|sisters?|sis|siblings?|sons?|"
    r"daughters?|children|kids|parents?|twin"
)
_OTHER_RELATIVE = (
    r"(?:mum|mom|mother|dad|father)(?:'s|’s|s)\s+side|(?:maternal|paternal)\s+side|"
    r"great[-\s]?(?:grand\w*|aunts?|uncles?)|"
    r"grand(?:mother|father|ma|pa|ad|dad|parent|child|children|son|daughter|mum|mam)s?|"
    r"gran|granny|grannie|nan|nana|nanna|nanny|aunts?|auntie|aunty|uncles?|cousins?|nieces?|nephews?"
)
_NOT_RELATED = (
    r"(?:mother|father|brother|sister|sons?|daughter|parents?)[-\s]in[-\s]laws?|in[-\s]laws?|"
    r"step[-\s]?(?:mother|father|mum|dad|brothers?|sisters?|sons?|daughters?|parents?|children|child|kids?)|"
    r"ex[-\s]?(?:husband|wife|partner)|husbands?|wife|wives|partners?|spouses?|carers?|care\s+givers?|"
    r"caregivers?|friends?|neighbou?rs?|colleagues?|boyfriend|girlfriend|fianc[eé]e?|flatmates?|"
    r"housemates?|foster\s+\w+|adoptive\s+(?:mother|father|mum|dad|parents?)"
)
_PATIENT_WORD = r"pt'?s?|px'?s?|patient'?s?|client'?s?"
_PERSON = re.compile(
    rf"\b(?:(?P<other>{_NOT_RELATED})|(?P<relative>{_OTHER_RELATIVE})|(?P<first>{_FIRST_DEGREE})|"
    rf"(?P<patient>{_PATIENT_WORD}))\b",
)
_PERSON_WORDS = rf"(?:{_NOT_RELATED}|{_OTHER_RELATIVE}|{_FIRST_DEGREE})"
# A person who only reports something ("carer says diabetic", "mum reports ...") is not its subject.
_REPORTS = re.compile(
    r"\s+(?:reports?|reported|says?|said|states?|stated|confirms?|confirmed|thinks?|believes?|mentions?|"
    r"mentioned|informs?|informed|tells?|told|feels?)\b",
)
_POSSESSIVE = re.compile(r"(?:'s|’s|s')\s+")
_MAX_GROUP = 6  # people coordinated in one subject: "mother, father and brother"
_COORDINATED = re.compile(r"\s*(?:,|&|\+|/|\band\b|\bor\b)?\s*(?:both\s+|his\s+|her\s+|their\s+)?")
# What may stand between a term and the person it belongs to: "glaucoma in father", "FHx POAG (dad)".
_LINK_AFTER = re.compile(
    r"[\s(:=\-–,]*(?:(?:in|of|y|yes|\+ve|the|his|her|their|both|affecting|pt'?s|patient'?s|maternal|paternal|late)\b"
    r"[\s(:=\-–,]*)*",
)
_FAMILY_MARK = re.compile(
    r"\b(?:family\s+(?:history|hx|hist|ocular\s+history|medical\s+history|eye\s+history)|"
    r"fam(?:ily)?\.?\s*(?:hx|hist(?:ory)?)\b|fhx?|f/hx?|fohx?|fmh|fh/o)\b|"
    r"\b(?:in|within|runs\s+in)\s+(?:the\s+|her\s+|his\s+)?family\b",
)
_FAMILY_AFTER = re.compile(
    r"\s*(?:(?:\w+|\(\w+\))\s+){0,2}?(?:in|within|runs\s+in)\s+(?:the\s+|her\s+|his\s+)?family\b|"
    r"\s*(?:fhx?|f/hx?|family\s+(?:history|hx))\b"  # "glaucoma FHx (mother)"
)

_FAMILY_HEADINGS = frozenset(
    {
        "foh",
        "fohx",
        "fmh",
        "fh",
        "fhx",
        "f/h",
        "f/hx",
        "fam hist",
        "fam hx",
        "family hx",
        "family history",
        "family ocular history",
        "family medical history",
        "family eye history",
    }
)
_PATIENT_HEADINGS = frozenset(
    {
        "gh",
        "pmh",
        "poh",
        "ph",
        "oh",
        "hx",
        "meds",
        "medication",
        "medications",
        "drugs",
        "general health",
        "gen health",
        "medical history",
        "ocular history",
        "past medical history",
        "past ocular history",
    }
)
_HEADING = re.compile(r"\s*([a-z][a-z/ ]{0,28}?)\s*:\s*")

# --------------------------------------------------------------------------------------------------
# Negation, uncertainty, topic
# --------------------------------------------------------------------------------------------------

# Scope of a negation cue ends at these (as well as at the clause boundary).
_SCOPE_END = re.compile(
    r"\b(?:but|however|although|though|whereas|yet|except|apart\s+from|as(?!\s+per\b)|because|since|who|which|"
    r"whilst|while|and\s+(?:is|has|was|had|on|takes|uses|now))\b",
)
_NEG_BEFORE = re.compile(
    r"\b(?:no|not|nil|nor|neither|denies|denied|deny|without|never|none|negative\s+for|free\s+of|absence\s+of|"
    r"absent|unlikely|ruled\s+out|excluded|n/?k|nobody|no-one|(?:does|did|is|has|was|do|have)n'?t)\b|(?<!\+)-ve\b",
)
_NON_BEFORE = re.compile(r"\bnon[-\s]?$")
# A cue reaches the terms coordinated with the first one it negates ("no diabetes or glaucoma", "nil
# DM/HTN/glaucoma"), not a term after another object ("no diabetic meds (T2 diet controlled)").
_COORDINATED_END = re.compile(r"(?:,|/|&|\+|\b(?:or|and|nor)\b)\s*(?:any\s+|known\s+)?$")
# A bare answer then a bracket ("Meds: nil (T2 - diet controlled)"): the bracket is a remark of its own.
_BRACKET_AFTER_CUE = re.compile(r"\s*\([^()]*$")
# A negation that opens a list carries over the comma-separated items that follow it when they are bare
# conditions ("denies diabetes, glaucoma or FHx glaucoma", "denies DM, HTN, glaucoma"); an item that says
# more (an eye, a drug, a person: "no diabetes, glaucoma R eye"; "denies diabetes, glaucoma - under HES")
# is a statement of its own. A plain "no" or "nil" carries over only a list closed by "or"/"nor" ("no DM,
# HTN, glaucoma or OHT"): "nil DM, POAG" may well be two statements, and a missed glaucoma costs more.
_LIST_CUE = re.compile(
    r"\b(?:denies|denied|deny|negative\s+for|free\s+of|no\s+(?:(?:past\s+|previous\s+|personal\s+)?(?:hx|history|h/o|pmh)"
    r"|known))\b"
)
_LIST_ITEM = re.compile(r"(?:(?:or|nor|and|&)\s+)?(?:any\s+)?[a-z][\w'/.&+-]*(?:\s+[a-z][\w'/.&+-]*){0,5}")
_NOT_LIST_ITEM = re.compile(
    r"\b(?:r|l|re|le|rt|lt|right|left|od|os|ou|both|on|under|since|dx|diagnosed|treated|tx|drops|y|yes|"
    r"confirmed|has|had|have|is|was|are|now|per|with|mild|moderate|severe|early|advanced|only|taking|uses|"
    r"controlled|diet)\b"
)
_LIST_CLOSED = re.compile(r"\b(?:or|nor)\b")
# "Diabetes, glaucoma, FHx glaucoma: all no" negates the whole list before it.
_ALL_NO = re.compile(r"\ball\s*(?:[:=\-–]\s*)?(?:no|nil|n|negative|neg|none|-ve)\s*\.?\s*$")
# "... as her sister has it": a relative with the condition just mentioned.
_ANAPHORA = re.compile(
    r"\b(?:(?:also|too)\s+)?(?:has|had|have|with|suffers?\s+from|suffered\s+from|(?:diagnosed|treated)\s+(?:with|for))"
    r"\s+(?:it|this|that|the\s+same)\b"
)
_NEG_AFTER = re.compile(
    r"\s*(?:(?:(?:has|have)\s+been|was|were|is|been)\s+)?(?:(?:(?!not\b|yet\b)\S+\s+){0,3}?)"
    r"(?:ruled\s+out|r/o|excluded|discounted|unlikely|not\s+confirmed|resolved)\b|"
    r"\s*[:=\-–]?\s*(?:negative|neg|absent|not\s+(?:present|found|seen|detected|known|needed|required|necessary|"
    r"indicated))\b|\s*-ve\b",
)
# A form answer closing the clause: "Diabetic: N", "FHx glaucoma - no", "DM - nil".
_NEG_ANSWER = (
    r"no|n|nil|none(?:\s+known)?|negative|neg|-ve|not\s+known|unknown|not\s+sure|unsure|n/?k|n/?a|absent|resolved"
)
_POS_ANSWER = r"y|yes|\+ve|positive|present"
_ANSWER_NO = re.compile(rf"(?:[:=\-–]|\s)\s*(?:{_NEG_ANSWER})\s*\.?\s*(?:\([^()]{{0,60}}\))?\s*$")
_UNCERTAIN_BEFORE = re.compile(
    r"(?:\?|\b(?:query|qry|possible|possibly|poss|probable|probably|likely|suspect(?:ed)?|suspicion\s+of|"
    r"suspicious\s+(?:for|of)|r/o|rule\s+out|to\s+exclude|exclude|maybe|might\s+have|may\s+have|"
    r"(?:might|may|will\s+probably|will\s+likely)\s+(?:need|require)|"
    r"questionable|borderline)\b)\s*(?:[\w/-]+\s+){0,2}$|"
    r"\b(?:unsure|thinks?|consider(?:ing|ed)?|investigat\w*|awaiting|pending)\s+(?:[\w/-]+\s+)?$",
)
_EARLY_BEFORE = re.compile(r"\bearly\s+$")
# "awaiting squint surgery", "pending glaucoma surgery": the condition is known, the treatment awaited.
_AWAITED = re.compile(r"\b(?:awaiting|pending)\b")
_TREATMENT_AFTER = re.compile(r"\s+(?:surgery|op|operation|treatment|repair|correction|laser)\b")
# An uncertain answer: "Glaucoma - query", "Diabetes: awaiting GP confirmation", "OHT?".
_UNSURE_ANSWER = (
    r"\?+|\(\?\)|query|possibl[ey](?=\W*$)|suspect(?:ed)?|tbc|unconfirmed|to\s+be\s+confirmed|"
    r"(?:awaiting|pending|for)\s+(?:\w+\s+){0,2}?(?:confirmation|diagnosis|investigation|tests?|bloods)"
)
_UNCERTAIN_AFTER = re.compile(
    rf"\s*(?:[:=\-–]\s*)?(?:{_UNSURE_ANSWER}|(?:not\s+yet\s+|to\s+be\s+)(?:ruled\s+out|excluded|confirmed)\b|"
    r"not\s+(?:ruled\s+out|excluded)\b)",
)
# Mentions that are a subject of talk, not a finding: leaflets, screening, tests, risks, worries.
_TOPIC_BEFORE = re.compile(
    r"(?:\b(?:leaflets?|info(?:rmation)?|advice|advised|asked|enquired|worried|anxious|concerned|concerns?|"
    r"tested|testing|tests?|screened|screening|checked|risks?|awareness)"
    r"\s+(?:(?:on|about|re|regarding|for|of|to|the|a|an|her|his|him|developing|whether|if)\s+){1,3}|"
    r"\b(?:explained|discussed|counsell?ed|educated)\s+(?:(?:on|about|re|regarding|the|what|how)\s+){0,3}|"
    r"\b(?:interested|interest)\s+in\s+(?:(?:trying|getting|having|a|an|the)\s+)?)"
    r"(?:\?\s*)?$",
)
_TOPIC_AFTER = re.compile(
    r"[\s-]*(?:leaflets?|tests?|testing|risks?|info(?:rmation)?|awareness|advice|education|questionnaire)\b"
)
_ASSESSMENT_AFTER = re.compile(r"[\s-]*(assessment|opinion|investigations?|work-?up|referral)\b")
_SCREENING_AFTER = re.compile(r"[\s-]*(?:screen(?:ing|ed)?|checks?)\b")

# A suspicion that has been settled, later in its sentence ("previously ?glaucoma, discharged as normal",
# "suspicious discs - physiological cupping", "found normal at HES, NFA"). A discharge to monitoring
# ("discharged to community monitoring scheme"), for non-attendance, by the patient or from another clinic
# settles nothing; nor do "no glaucoma" or "NAD" (often about a relative, or another part of the eye).
_SUSPECT_RESOLVED = re.compile(
    r"(?<!self[-\s])\bdischarged\b(?!(?:\s+[\w/]+){0,4}?\s+(?:monitoring|scheme|surveillance|review|follow[-\s]?up|care)|"
    r"\s+(?:him|her|them)sel\w+|\s+(?:for|due\s+to|after|as)\s+(?:\w+\s+){0,2}?(?:dna|non[-\s]?attend\w*|missed|failed)|"
    r"\s+from\s+(?:the\s+)?(?:cataract|diabetic|retina\w*|medical\s+retina|uveitis|cornea\w*|eye\s+casualty|a&e|"
    r"oculoplastic\w*|orthoptic\w*|paediatric\w*|amd|macula\w*)\b)|"
    r"\b(?:found|deemed|confirmed|shown)\s+(?:to\s+be\s+)?(?:normal|healthy|clear|fine)\b|"
    r"\bphysiological\b|\bnfa\b|\bno\s+further\s+action\b|\ball\s+clear\b|\bcleared\b"
)
_NOT_SEEN = re.compile(r"\b(?:dna\w*|did\s+not\s+attend|non[-\s]?attend\w*|failed\s+to\s+attend)\b")
_PAST_SUSPICION = re.compile(
    r"\b(?:previously|prev|was|were|ex|formerly|former|hx|h/o|history|(?:19|20)\d\d|last\s+year)\b"
)
# A binocular vision anomaly stated to be over, later in its sentence ("squint op as a child, BV now
# normal", "eyes straight now", "VA now 6/6 each eye"); not eyes straight in the glasses (an accommodative
# esotropia still), nor "BSV present" or "good control" (an intermittent squint has both).
_BV_RESOLVED = re.compile(
    r"\b(?:bv|bsv|binocular\s+(?:single\s+)?vision|cover\s+test|alignment)\s*:?\s+(?:(?:now|is|was|remains?|all)\s+)*"
    r"(?:normal|ortho\w*)\b|"
    r"\beyes?\s+(?:(?:now|are|is)\s+)*straight\b(?!\s+(?:in|with|wearing)\s+(?:the\s+|her\s+|his\s+)?(?:specs|glasses|rx))|"
    r"\b(?:now|since)\s+(?:straight|normal|ortho\w*)\b|\bno\s+residual\s+(?:squint|strabismus|deviation|tropia)\b|"
    r"\b(?:squint|strabismus|amblyopia|turn|deviation)\s+(?:(?:has|now|since|fully)\s+)*resolved\b|"
    r"\b(?:vas?|acuit\w*)\s+now\s+(?:6/[56]|equal)"
)
# "squints at the board", "tends to squint": screwing up the eyes, not a strabismus.
_SQUINT_VERB_AFTER = re.compile(
    r"\s+(?:at\s+(?:the\s+)?(?:board|tv|television|screen|sun|light|things|text|book)|when\s+(?:reading|looking|watching)|"
    r"in\s+(?:the\s+)?(?:bright|sun)|to\s+(?:see|read|focus))\b"
)
# "declined specs", "glasses refused": a correction offered but not taken (declined insulin or drops still
# say the patient has the condition, so this is for corrections only).
_DECLINED_BEFORE = re.compile(
    r"\b(?:declined|refused|declines|refuses|does\s+not\s+want|doesn'?t\s+want)\s+(?:\w+\s+)?$"
)
_DECLINED_AFTER = re.compile(r"\s+(?:\w+\s+)?(?:declined|refused)\b")
_SQUINT_VERB_BEFORE = re.compile(r"\b(?:tends?|tendency|likes?|starts?|started|begins?|seems?)\s+to\s+$")

# Progressive myopia: a myopic change of at least RAPID_MYOPIA_D_PER_YEAR, as a rate ("-0.75D/yr") or an
# amount over a period ("1.00D in 12 months", "-0.50 in 6/12", "since last year"), or stated as rapid.
_MYOPIA_HINT = re.compile(r"myop|short[-\s]?sight|minus|-\s?\d")
_MYOPIA_SENTENCE = re.compile(r"(?:\.(?![\w])|[;\n\r!])+")
_MYOPIA_WORD = re.compile(r"\b(?:myop\w*|short[-\s]?sight\w*|more\s+minus)")
_NOT_MYOPIA = re.compile(r"\b(?:cyl\w*|astig\w*|hyperop\w*|hypermetrop\w*|presby\w*|add|plus|long[-\s]?sight\w*)\b")
_RAPID_MYOPIA = re.compile(
    r"\b(?:rapid(?:ly)?|fast|quick(?:ly)?|accelerat\w*)\s+(?:(?:progressing|progressive|progression\s+of|increasing|"
    r"worsening)\s+)?(?:myop\w*|short[-\s]?sight\w*)|"
    r"\b(?:myop\w*|short[-\s]?sight\w*)\s+(?:is\s+)?(?:progressing|progressed|progression|increasing|worsening|"
    r"getting\s+worse)\s+(?:rapidly|fast|quickly)\b"
)
_CHANGE = re.compile(
    r"(?:\b(?:progress\w*|shift(?:ed|s)?|increas\w*|worse\w*|chang\w*|deteriorat\w*|went\s+up|gone\s+up|up|"
    r"more\s+(?:myopic|minus))\b|↑)(?:\s*(?:by|of|approx\.?|approximately|about|around|roughly|~|:|only|ca\.?|further|"
    r"nearly|almost)\b\.?)*"
)
_AMOUNT = r"[-+]?\s?(?:\d+(?:\.\d+)?|\.\d+)"
_PER_YEAR = r"\s*(?:/|per|a|an|each|every)\s*(?:yr|year|annum|y)\b|\s*p\.?\s?a\b\.?"
# One token after a change word: an amount (with its own rate or not), an eye, or a separator.
_CHANGE_TOKEN = re.compile(
    rf"\s*(?:(?P<amount>{_AMOUNT})(?!\s*/\s*12|\s*x\s*\d)\s*(?:d(?:s|ioptres?|iopters?)?\b)?(?P<rate>{_PER_YEAR})?|"
    r"(?:r|l|re|le|rt|lt|od|os|ou|both(?:\s+eyes)?|r\s*&\s*l|r/l|each\s+eye|and)\b|[,&():])"
)
# "from -1.50 to -2.50", "R -2.00 to -3.00", "from 1.00D/yr to 0.25D/yr"
_FROM_TO = re.compile(
    rf"(?P<a>{_AMOUNT})\s*(?:d(?:s|ioptres?)?\b)?(?P<a_rate>{_PER_YEAR})?\s*(?:to|->|→|>)\s*"
    rf"(?P<b>{_AMOUNT})\s*(?:d(?:s|ioptres?)?\b)?(?P<b_rate>{_PER_YEAR})?"
)
# "-1.25 change in 12 months", "0.75D myopic shift", "a 0.50 increase"
_AMOUNT_THEN_CHANGE = re.compile(
    rf"(?P<amount>{_AMOUNT})\s*(?:d(?:s|ioptres?|iopters?)?\b)?(?P<rate>{_PER_YEAR})?\s*(?:myopic\s+)?"
    r"(?:change|shift|increase|progression|deterioration)\b"
)
# "R -2.00 (was -1.25 a year ago)": the prescription now and before
_NOW_WAS = re.compile(
    rf"(?P<b>{_AMOUNT})\s*(?:d(?:s|ioptres?)?\b)?\s*[(,;-]?\s*(?:was|from|previously|prev|last\s+year)\s*:?\s*"
    rf"(?:[rl]\s*)?(?P<a>{_AMOUNT})"
)
_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "six": 6, "nine": 9, "twelve": 12, "eighteen": 18}
_PERIOD = re.compile(
    r"\b(?:in|over|within|during|across|since|for)\s+(?:the\s+)?(?:last|past|previous|prev)?\s*"
    r"(?:(?P<n>\d+(?:\.\d+)?|a|an|one|two|three|six|nine|twelve|eighteen)\s*)?(?P<unit>months?|mths?|mo|/12|years?|yrs?|y)\b|"
    r"\b(?P<n2>\d+)\s*(?P<unit2>/12|months?|mths?|years?|yrs?)\s+ago\b|"
    r"\bsince\s+(?:the\s+)?(?:last|previous|prev)\s+(?:test|visit|exam\w*|eye\s+test|sight\s+test|appointment|appt|"
    r"check|review|st)\b|\bthis\s+year\b|\((?P<n3>\d+)/12\)"
)

# --------------------------------------------------------------------------------------------------
# Sentences and clauses
# --------------------------------------------------------------------------------------------------

# (not the full stop of an abbreviation that a form answer follows: "Diab.: N", "Hx. - nil")
_SENTENCE_SPLIT = re.compile(r"(?:\.(?!\d|\s*[:=]|\s*[-–]\s*(?:no|n|nil|none|neg|y|yes)\b(?!\s*\w))|[;\n\r!])+")
# Commas and dashes inside brackets ("diabetes (dad, type 2)") do not split: the lookahead finds the
# closing bracket first (within a bracket's usual length, which keeps long notes linear).
_CLAUSE_SPLIT = re.compile(
    r",(?![^()]{0,80}\))|\s[-–—]+\s(?![^()]{0,80}\))|\s[-–—]+(?=\s*$)|\b(?:but|however|although|whereas)\b"
)
# A clause that is only people ("- father", "(mum and sister)") or only a form answer ("- no", ": Y").
_BARE = re.compile(
    r"[\s(]*(?:"
    rf"(?:(?:both|maternal|paternal|late|older|younger|elder)\s+)?{_PERSON_WORDS}(?:'s)?"
    rf"(?:\s*(?:,|&|\+|/|\band\b)\s*{_PERSON_WORDS})*(?:\s+only)?|"
    rf"{_NEG_ANSWER}|{_POS_ANSWER}|{_UNSURE_ANSWER}"
    r")[\s)]*(?:\([^()]*\)\s*)?",
)

# --------------------------------------------------------------------------------------------------
# IOP readings
# --------------------------------------------------------------------------------------------------

_IOP_KEY = re.compile(
    rf"\b(?:{_IOP_WORD}|(?<!blood\s)(?<!systolic\s)(?<!diastolic\s)(?<!pulse\s)pressures?|tonometry|"
    r"(?P<method>nct|gat|goldmann|perkins|applanation|i-?care|tono-?pen|pulsair))\b",
)
# One token of a reading: a pressure (not part of a time, a date, a decimal, or a Snellen acuity such as
# 6/24 or 3/60), a method, an eye, a unit, a separator or a repeat. Anything else ends the reading.
_IOP_TOKEN = re.compile(
    r"\s*(?:(?P<value>(?<![\d.])(?![1236]\s*/\s*(?:5|6|7\.5|9|12|18|24|36|60)\b)[1-7]?\d(?:\.\d)?)"
    r"(?![\d:]|\.\d|\s*/\s*\d{2,4}\s*/)|"
    r"(?:(?:on|with|by|using|via)\s+)?(?P<method>nct|gat|goldmann|perkins|applanation|i-?care|tono-?pen|pulsair)\b|"
    r"(?:r|l|re|le|od|os|rt|lt)(?=\d)|"
    r"(?:r|l|re|le|od|os|ou|rt|lt|right|left|eyes?|both|and|mm\s?hg|avg|average|today|were|was|is|are|of|"
    r"readings?|measured|raised|high|elevated|repeated|repeat|normal|(?:[-–]\s*)?(?:repeat(?:ed)?|rpt|recheck(?:ed)?)|"
    r"at\s+(?:the\s+)?(?:hes|hospital|eye\s+hospital|eye\s+clinic|clinic))\b|[:=(),/&+])",
)
_APPLANATION = frozenset({"gat", "goldmann", "perkins", "applanation"})
_IOP_HINT = re.compile(r"iop|press|tono|nct|gat|goldmann|perkins|applanation|care|pulsair")


# --------------------------------------------------------------------------------------------------
# Reading a clause
# --------------------------------------------------------------------------------------------------


def _segments(pattern: re.Pattern[str], text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The stripped, non-empty stretches of text[start:end] between matches of pattern."""
    bounds = [start]
    for sep in pattern.finditer(text, start, end):
        bounds += sep.span()
    bounds.append(end)
    out = []
    for i in range(0, len(bounds), 2):
        part_start, part_end = bounds[i], bounds[i + 1]
        part = text[part_start:part_end]
        stripped = part.strip()
        if stripped:
            part_start += len(part) - len(part.lstrip())
            out.append((part_start, part_start + len(stripped)))
    return out


class _Clause(NamedTuple):
    evidence: str  # the clause as written
    body: str  # lower-cased, without its heading
    family_heading: bool  # a family heading is in force ("FOH: ...")
    sentence: str  # the lower-cased sentence it belongs to
    number: int  # the sentence's number in the note
    offset: int  # where the clause starts in its sentence
    after_comma: bool  # the clause follows a comma (an item of a list, perhaps)
    next_sentence: str  # the lower-cased sentence after it ("" at the end)
    has_term: bool  # a term of the note overlaps it (else there is nothing in it to flag)


_ANYWHERE = ((0, 1 << 62),)


def _clauses(text: str, low: str, terms: Sequence[tuple[int, int]] = _ANYWHERE) -> Iterable[_Clause]:
    """The clauses of the sentences that ``terms`` (spans of the note's terms, in order) overlap."""
    sentences = _segments(_SENTENCE_SPLIT, low, 0, len(low))
    starts = [start for start, _ in terms]
    for number, (s_start, s_end) in enumerate(sentences):
        last = bisect_left(starts, s_end) - 1
        if last < 0 or terms[last][1] <= s_start:
            continue  # no term in the sentence: nothing to read in it
        sentence = low[s_start:s_end]
        next_sentence = low[sentences[number + 1][0] : sentences[number + 1][1]] if number + 1 < len(sentences) else ""
        family = False
        # clauses as [evidence parts, body parts, family heading, offset, after a comma, has a term]: a
        # bare part joins the clause before it, or the one after it when it comes first
        clauses: list[list[Any]] = []
        pending: list[Any] = [[], [], family, -1, False, False]
        previous_end = s_start
        for c_start, c_end in _segments(_CLAUSE_SPLIT, low, s_start, s_end):
            evidence, body = text[c_start:c_end], low[c_start:c_end]
            after_comma = low.find(",", previous_end, c_start) >= 0
            previous_end = c_end
            if ":" in body:
                heading = _HEADING.match(body)
                if heading:
                    name = " ".join(heading.group(1).split())
                    if name in _FAMILY_HEADINGS or name in _PATIENT_HEADINGS:
                        family = name in _FAMILY_HEADINGS
                        body = body[heading.end() :]
                        if not body:
                            continue
            last = bisect_left(starts, c_end) - 1
            has_term = last >= 0 and terms[last][1] > c_start
            if _BARE.fullmatch(body):
                parts = clauses[-1] if clauses else pending
                parts[0].append(evidence)
                parts[1].append(body)
                parts[5] = parts[5] or has_term
                if parts[3] < 0:
                    parts[2], parts[3] = family, c_start - s_start
                continue
            if pending[0]:
                clauses.append(
                    [
                        [*pending[0], evidence],
                        [*pending[1], body],
                        family,
                        pending[3],
                        after_comma,
                        has_term or pending[5],
                    ]
                )
                pending = [[], [], family, -1, False, False]
            else:
                clauses.append([[evidence], [body], family, c_start - s_start, after_comma, has_term])
        if pending[0] and not clauses:  # only a bare part: "Meds: nil (T2 - diet controlled)"
            clauses.append(pending)
        for evidences, bodies, heading_family, offset, after_comma, has_term in clauses:
            yield _Clause(
                evidences[0] if len(evidences) == 1 else " - ".join(evidences),
                bodies[0] if len(bodies) == 1 else " - ".join(bodies),
                heading_family,
                sentence,
                number,
                offset,
                after_comma,
                next_sentence,
                has_term,
            )


def _person_class(match: re.Match[str]) -> str:
    return match.lastgroup or "patient"


def _persons(clause: str) -> list[tuple[int, int, str]]:
    """People named in a clause, as (start, end, class), possessives and reporters resolved."""
    found = list(_PERSON.finditer(clause))
    out: list[tuple[int, int, str]] = []
    for i, match in enumerate(found):
        cls = _person_class(match)
        nxt = found[i + 1] if i + 1 < len(found) else None
        gap = clause[match.end() : nxt.start()] if nxt else ""
        if nxt is not None and cls == "patient" and match.group().endswith("s") and gap.isspace():
            continue  # "pt's mum", "pts mum": the mum is the subject
        if nxt is not None and _POSSESSIVE.fullmatch(gap):
            continue  # "mum's sister": the sister is the subject, an aunt (resolved below)
        if _REPORTS.match(clause, match.end()):
            continue
        if i > 0 and cls != "patient":
            before = found[i - 1]
            if _person_class(before) != "patient" and _POSSESSIVE.fullmatch(clause, before.end(), match.start()):
                # a relative of a relative is not first-degree; anyone's relative by marriage is not family
                cls = "other" if _person_class(before) == "other" or cls == "other" else "relative"
        out.append((match.start(), match.end(), cls))
    return out


def _group_class(group: list[tuple[int, int, str]]) -> str:
    classes = {cls for _, _, cls in group}
    for cls in ("first", "relative", "other"):
        if cls in classes:
            return cls
    return "patient"


class _People:
    """The people and family-history markers of one clause, found once however many terms it has."""

    __slots__ = ("clause", "family_heading", "_persons", "_starts", "_family_ends")

    def __init__(self, clause: str, family_heading: bool) -> None:
        self.clause = clause
        self.family_heading = family_heading
        self._persons: list[tuple[int, int, str]] | None = None
        self._starts: list[int] = []
        self._family_ends: list[int] = []

    def _load(self) -> list[tuple[int, int, str]]:
        if self._persons is None:
            self._persons = _persons(self.clause)
            self._starts = [p[0] for p in self._persons]
            self._family_ends = [m.end() for m in _FAMILY_MARK.finditer(self.clause)]
        return self._persons

    def subject(self, start: int, end: int) -> str:
        """Who a term at clause[start:end] is about: patient, first (first-degree relative), family
        (unspecified family history), relative (not first-degree) or other (not a blood relative)."""
        clause, people = self.clause, self._load()
        # the last person named before the term, with anyone coordinated with them ("mother and sister")
        last = bisect_right(self._starts, start) - 1
        while last >= 0 and people[last][1] > start:
            last -= 1
        index = bisect_right(self._family_ends, start) - 1
        family_at = self._family_ends[index] if index >= 0 else -1
        if last >= 0 and people[last][0] > family_at:
            group = [people[last]]
            for person in reversed(people[max(0, last - _MAX_GROUP) : last]):
                if not _COORDINATED.fullmatch(clause, person[1], group[0][0]):
                    break
                group.insert(0, person)
            cls = _group_class(group)
            if cls != "patient":
                return cls
            return "family" if self.family_heading else "patient"
        # else someone named right after it: "glaucoma in father", "FHx POAG (dad)", "glaucoma FHx (mum)"
        family_after = _FAMILY_AFTER.match(clause, end)
        link = _LINK_AFTER.match(clause, family_after.end() if family_after else end)
        first = bisect_left(self._starts, link.end()) if link else len(people)
        if link and first < len(people) and people[first][0] == link.end():
            group = [people[first]]
            for person in people[first + 1 : first + 1 + _MAX_GROUP]:
                if not _COORDINATED.fullmatch(clause, group[-1][1], person[0]):
                    break
                group.append(person)
            cls = _group_class(group)
            if cls != "patient":
                return cls
        if family_at >= 0 or self.family_heading or family_after:
            return "family"
        return "patient"


def _negated(
    clause: str, start: int, end: int, answer_at: int, spans: Sequence[tuple[int, int]] = (), earlier: int = 0
) -> bool:
    """Negated by a cue before the term (same scope), a verdict after it, or a form answer closing the
    clause at ``answer_at`` ("FHx glaucoma - no"). ``spans[:earlier]`` are the spans of the clause's terms
    before this one: a cue reaches past them only through a coordination ("no diabetes or glaucoma")."""
    if end <= answer_at <= len(clause):
        return True
    scope_start = max(0, start - 50)
    for stop in _SCOPE_END.finditer(clause, scope_start, start):
        scope_start = stop.end()
    cue_end = -1
    if _NON_BEFORE.search(clause, scope_start, start):
        cue_end = start
    else:
        for cue in _NEG_BEFORE.finditer(clause, scope_start, start):
            cue_end = cue.end()
    if cue_end >= 0:
        if _BRACKET_AFTER_CUE.fullmatch(clause, cue_end, start):
            return False  # "Meds: nil (T2 - diet controlled)"
        # "not on diabetic medication (T2 diet controlled)": the cue negated the medication, not the T2
        if earlier == 0 or spans[earlier - 1][0] < cue_end:
            return True  # no other term between the cue and this one
        return _COORDINATED_END.search(clause, spans[earlier - 1][1], start) is not None
    return _NEG_AFTER.match(clause, end) is not None


def _uncertain(clause: str, start: int, end: int, kind: str) -> bool:
    before = clause[max(0, start - 40) : start]
    cue = _UNCERTAIN_BEFORE.search(before)
    if cue and not (_AWAITED.search(cue.group()) and _TREATMENT_AFTER.match(clause, end)):
        return True
    if kind in _GLAUCOMA_KINDS and _EARLY_BEFORE.search(before):
        return True
    if kind == "glaucoma" and _referred_for_assessment(clause, start, end):
        return True
    return _UNCERTAIN_AFTER.match(clause, end) is not None


def _referred_for_assessment(clause: str, start: int, end: int) -> bool | None:
    """True for "refer for glaucoma assessment", "glaucoma referral"; False for "glaucoma assessment: normal"
    (a topic); None when the term is not followed by such a word."""
    after = _ASSESSMENT_AFTER.match(clause, end)
    if after is None:
        return None
    return after.group(1) == "referral" or "refer" in clause[:start]


def _topic(clause: str, start: int, end: int, kind: str) -> bool:
    if _TOPIC_BEFORE.search(clause, max(0, start - 50), start):
        return True
    if _TOPIC_AFTER.match(clause, end):
        return True
    if kind == "glaucoma" and _referred_for_assessment(clause, start, end) is False:
        return True
    # "glaucoma screening", "diabetes check" (a test for it), but "diabetic (eye) screening" is a
    # diabetic's own screening programme, an "OHT check" monitors a known OHT and a "CL check" the lenses.
    return (
        kind not in ("diabetic_eye", "oht", "rx")
        and not clause[start:end].endswith("ic")
        and bool(_SCREENING_AFTER.match(clause, end))
    )


def _answer_at(clause: str) -> int:
    """Where a negative form answer closes the clause ("Diabetic: N"), or past its end if none does."""
    answer = _ANSWER_NO.search(clause)
    return answer.start() if answer else len(clause) + 1


def _clause_flags(
    c: _Clause, previous_kind: str | None, negate_all: bool = False
) -> tuple[list[tuple[int, str, str]], str | None, bool, set[str]]:
    """What one clause says about the patient.

    Returns (position, flag, kind of the term) for each flag the clause asserts, the kind of its last
    term (which "it" in the next clause may refer to), whether it names the patient's OHT at all
    (even negated or queried), and the kinds of drug the patient's stated conditions explain
    ("pre-diabetic" explains metformin). ``previous_kind`` is the last kind earlier in the sentence;
    ``negate_all`` says a negated list before the clause covers it ("denies diabetes, glaucoma").
    """
    clause, sentence = c.body, c.sentence
    out: list[tuple[int, str, str]] = []
    kinds: list[tuple[int, str]] = []
    spans: list[tuple[int, int]] = []  # of the terms, for the scope of a negation
    names_oht = False
    explained: set[str] = set()
    other_indication: bool | None = None
    people = _People(clause, c.family_heading)
    answer_at = -1  # where a negative form answer closes the clause (found on first need)
    for match in _TERMS.finditer(clause):
        start, end = match.span()
        kind = _KIND_OF_GROUP[match.lastindex or 0]
        kinds.append((start, kind))
        earlier = len(spans)
        spans.append((start, end))
        if kind in _NO_FLAG_KINDS:
            continue
        if kind == "bv" and clause.startswith("squint", start) and _squint_is_a_verb(clause, start, end):
            continue
        if kind == "rx" and (
            _DECLINED_BEFORE.search(clause, max(0, start - 40), start) or _DECLINED_AFTER.match(clause, end)
        ):
            continue
        if kind in _DRUG_KINDS:
            if other_indication is None:
                other_indication = _OTHER_INDICATION.search(clause) is not None
            if other_indication:
                continue
        if kind == "gestational" and _PAST.search(sentence) and not _PREGNANT_NOW.search(sentence):
            continue
        if _topic(clause, start, end, kind):
            continue
        if answer_at < 0:
            answer_at = _answer_at(clause)
        negated = negate_all or _negated(clause, start, end, answer_at, spans, earlier)
        if negated and kind != "oht":
            continue
        subject = "family" if kind == "fh_glaucoma" else people.subject(start, end)
        if kind == "oht" and subject == "patient":
            names_oht = True
        if negated:
            continue
        if kind in _INDICATION_OF:
            if (
                subject == "patient"
                and not _uncertain(clause, start, end, kind)
                and not _FORMERLY.search(clause, max(0, start - 30), start)
            ):
                explained.add(_INDICATION_OF[kind])
            continue
        uncertain = kind not in _SUSPECT_KINDS and _uncertain(clause, start, end, kind)
        if subject == "patient":
            flag = _KINDS_FLAG[kind]
            if uncertain:
                if flag != "glaucoma":
                    continue  # "?diabetes", "?OHT", "?squint": not a flag until confirmed (raised readings count)
                flag = "glaucoma_suspect"
            # settled later in the sentence: "previously ?glaucoma, discharged", "squint op, BV now normal"
            if flag == "glaucoma_suspect":
                if _suspicion_settled(c):
                    continue
                if _PAST_SUSPICION.search(clause, 0, start):
                    kind = "past_suspect"  # superseded if the note diagnoses glaucoma
            if flag == "binocular_vision_anomaly" and _BV_RESOLVED.search(sentence, c.offset):
                continue
            out.append((start, flag, kind))
        elif subject in ("first", "family") and kind in _GLAUCOMA_KINDS and not uncertain:
            out.append((start, "glaucoma_family_history", kind))
    if kinds or previous_kind in _GLAUCOMA_KINDS:
        if answer_at < 0:
            answer_at = _answer_at(clause)
        for match in _ANAPHORA.finditer(clause):
            referent = next((k for at, k in reversed(kinds) if at < match.start()), previous_kind)
            if (
                referent in _GLAUCOMA_KINDS
                and not _negated(clause, match.start(), match.start(), answer_at)
                and people.subject(match.start(), match.start()) == "first"
            ):
                out.append((match.start(), "glaucoma_family_history", "glaucoma"))
    return out, (kinds[-1][1] if kinds else previous_kind), names_oht, explained


def _suspicion_settled(c: _Clause) -> bool:
    """A glaucoma suspicion settled later in its sentence, or in the next one when it is past ("previously
    monitored as glaucoma suspect; HES discharged"). A discharge for non-attendance is no outcome."""
    if _NOT_SEEN.search(c.sentence) or _NOT_SEEN.search(c.next_sentence):
        return False
    if _SUSPECT_RESOLVED.search(c.sentence, c.offset):
        return True
    return bool(c.next_sentence and _PAST_SUSPICION.search(c.sentence) and _SUSPECT_RESOLVED.search(c.next_sentence))


def _squint_is_a_verb(clause: str, start: int, end: int) -> bool:
    """Whether "squint" is the verb ("squints at the board", "tends to squint"): screwing up the eyes."""
    return bool(_SQUINT_VERB_AFTER.match(clause, end) or _SQUINT_VERB_BEFORE.search(clause, max(0, start - 30), start))


def _bare_item(body: str) -> bool:
    """A list item that only names a condition ("glaucoma", "or FHx glaucoma", "high blood pressure")."""
    return (
        _LIST_ITEM.fullmatch(body) is not None and _NOT_LIST_ITEM.search(body) is None and _PERSON.search(body) is None
    )


def _list_negations(clauses: list[_Clause]) -> set[int]:
    """Indexes of the clauses a negated list covers: the bare items after "denies diabetes, ..." (or after
    "no X, ..." when the list is closed by "or"), and those before "...: all no"."""
    covered: set[int] = set()
    count = len(clauses)
    for i, c in enumerate(clauses):
        following = i + 1 < count and clauses[i + 1].after_comma and clauses[i + 1].number == c.number
        if following and (_NEG_BEFORE.search(c.body) or "non" in c.body):
            term = _TERMS.search(c.body) if c.has_term else None
            if term is not None:
                head_negated = _negated(c.body, term.start(), term.end(), len(c.body) + 1)
                head_end = term.start()
            else:  # "denies any eye disease, diabetes or ...": a head that names no term of ours
                cue_end = max((cue.end() for cue in _NEG_BEFORE.finditer(c.body)), default=-1)
                head_negated = cue_end >= 0 and _bare_item(c.body[cue_end:].strip())
                head_end = len(c.body)
            if head_negated:
                chain: list[int] = []
                j = i + 1
                while (
                    j < count
                    and clauses[j].number == c.number
                    and clauses[j].after_comma
                    and _bare_item(clauses[j].body)
                    and (j + 1 == count or clauses[j + 1].number != c.number or clauses[j + 1].after_comma)
                ):
                    chain.append(j)
                    j += 1
                if chain and (
                    _LIST_CUE.search(c.body, 0, head_end) or any(_LIST_CLOSED.search(clauses[k].body) for k in chain)
                ):
                    covered.update(chain)
        if c.after_comma and "all" in c.body and _ALL_NO.search(c.body):
            j = i - 1
            while j >= 0 and clauses[j].number == c.number and _bare_item(clauses[j].body):
                covered.add(j)
                if not clauses[j + 1].after_comma or not clauses[j].after_comma:
                    break
                j -= 1
    return covered


# --------------------------------------------------------------------------------------------------
# Progressive myopia
# --------------------------------------------------------------------------------------------------


def _progressive_myopia(text: str, low: str) -> str | None:
    """The first sentence saying the patient's myopia progresses rapidly, or None."""
    for start, end in _segments(_MYOPIA_SENTENCE, low, 0, len(low)):
        if _myopia_progresses(low[start:end]):
            return text[start:end]
    return None


def _myopia_progresses(sentence: str) -> bool:
    word = _MYOPIA_WORD.search(sentence)
    change = _CHANGE.search(sentence) or _FROM_TO.search(sentence) or _NOW_WAS.search(sentence)
    rapid = _RAPID_MYOPIA.search(sentence) if word else None
    anchor = word or change  # the myopia named, or else the change
    if anchor is None:
        return False
    if word is None and _NOT_MYOPIA.search(sentence):
        return False  # a change of astigmatism, hyperopia or the add
    people = _People(sentence, False)

    def about_the_patient(start: int, end: int) -> bool:
        return (
            people.subject(start, end) == "patient"
            and not _negated(sentence, start, end, len(sentence) + 1)
            and not _topic(sentence, start, end, "myopia")
        )

    if not about_the_patient(anchor.start(), anchor.end()):
        return False
    if rapid is not None and about_the_patient(rapid.start(), rapid.end()):
        return True
    years = _period_years(sentence)
    rates: list[float] = []
    for change in _CHANGE.finditer(sentence):
        if _negated(sentence, change.start(), change.end(), len(sentence) + 1):
            continue
        pos = change.end()
        while (token := _CHANGE_TOKEN.match(sentence, pos)) is not None and token.end() > pos:
            pos = token.end()
            if token.group("amount") is None:
                continue
            amount = float(token.group("amount").replace(" ", ""))
            if word is None and amount >= 0:
                continue  # without the word "myopia", only a minus change is myopic
            if token.group("rate"):
                rates.append(abs(amount))
            elif years:
                rates.append(abs(amount) / years)
    for before in _AMOUNT_THEN_CHANGE.finditer(sentence):
        amount = float(before.group("amount").replace(" ", ""))
        if (word is not None or amount < 0) and not _negated(sentence, before.start(), before.end(), len(sentence) + 1):
            if before.group("rate"):
                rates.append(abs(amount))
            elif years:
                rates.append(abs(amount) / years)
    for pair in _NOW_WAS.finditer(sentence):
        a, b = float(pair.group("a").replace(" ", "")), float(pair.group("b").replace(" ", ""))
        period = years or (1.0 if "last year" in pair.group() else None)
        if period and b < a <= 0:
            rates.append((a - b) / period)
    for pair in _FROM_TO.finditer(sentence):
        a, b = float(pair.group("a").replace(" ", "")), float(pair.group("b").replace(" ", ""))
        if pair.group("a_rate") and pair.group("b_rate"):
            if word is not None:
                rates.append(abs(b))  # "slowed from 1.00D/yr to 0.25D/yr": the rate now
        elif not pair.group("a_rate") and not pair.group("b_rate") and years and b < a <= 0:
            rates.append((a - b) / years)  # "from -1.50 to -2.50 in 12 months"
    return any(RAPID_MYOPIA_D_PER_YEAR - 1e-9 <= rate <= 6 for rate in rates)


def _period_years(sentence: str) -> float | None:
    """The period a change in the sentence took, in years ("in 12 months", "over 2 yrs", "in 6/12",
    "since last year"; "since the last test" is a year: children's sight tests are yearly)."""
    period = _PERIOD.search(sentence)
    if period is None:
        return None
    number = period.group("n") or period.group("n2") or period.group("n3")
    unit = period.group("unit") or period.group("unit2") or ("/12" if period.group("n3") else "year")
    count = (_NUMBER_WORDS.get(number) or float(number)) if number else 1.0
    years = count / 12 if unit.startswith(("m", "/")) else count
    return years if years > 0 else None


# --------------------------------------------------------------------------------------------------
# IOP readings in text
# --------------------------------------------------------------------------------------------------


def _iop_readings(text: str) -> list[tuple[float, str | None, int]]:
    """(mmHg, method or None, position) for each pressure reading in the text.

    A method named before the numbers applies to the numbers after it ("NCT 23/24, GAT 23/23",
    "IOPs (GAT) 24 and 23"); named after them, to the numbers before it ("IOPs 25/26 NCT, 19/20 GAT").
    """
    readings: list[tuple[float, str | None, int]] = []
    pos = 0
    while True:
        key = _IOP_KEY.search(text, pos)
        if key is None:
            return readings
        method = key.group("method").replace("-", "") if key.group("method") else None
        pending: list[int] = []  # readings whose method may still be named after them
        pos = key.end()
        while True:
            token = _IOP_TOKEN.match(text, pos)
            if token is None or token.end() == pos:
                break
            pos = token.end()
            if token.group("value"):
                value = float(token.group("value"))
                if 4 <= value <= 80:
                    readings.append((value, method, token.start("value")))
                    if method is None:
                        pending.append(len(readings) - 1)
            elif token.group("method"):
                named = token.group("method").replace("-", "")
                if pending:
                    for index in pending:
                        readings[index] = (readings[index][0], named, readings[index][2])
                    pending, method = [], None
                else:
                    method = named


def _oht_from_readings(text: str) -> int | None:
    """Position of a raised reading that counts, or None (a Goldmann reading supersedes an NCT screen)."""
    if not _IOP_HINT.search(text):
        return None
    readings = _iop_readings(text)
    applanation = [r for r in readings if r[1] in _APPLANATION]
    counted = applanation or readings
    raised = [r for r in counted if r[0] >= OHT_IOP_MMHG]
    return raised[0][2] if raised else None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def infer_from_text(text: str | None) -> list[InferredFlag]:
    """Flags a note asserts for the patient, in note order, each with its evidence (the clause)."""
    if not text:
        return []
    return list(_infer_cached(text)) if len(text) <= _CACHED_NOTE_CHARS else _infer(text)


# Short notes are the ones practices repeat ("Routine check, no change."); a long one is read each
# time, so the cache stays a few MB and holds no one's long history.
_CACHED_NOTE_CHARS = 512


@lru_cache(maxsize=8192)
def _infer_cached(text: str) -> tuple[InferredFlag, ...]:
    """Practices write the same notes again and again ("Routine check, no change."): a recall pass over
    a practice reads each distinct note once. The answer depends on the text alone."""
    return tuple(_infer(text))


def _infer(text: str) -> list[InferredFlag]:
    low = text.translate(_ASCII_LOWER)  # the vocabulary is ASCII; this keeps every position in place
    out: dict[str, InferredFlag] = {}
    terms = [match.span() for match in _TERMS.finditer(low)]
    if terms:  # most notes name no condition at all: only pressures to read
        for flag, evidence in _flags_from_clauses(text, low, terms):
            out.setdefault(flag, InferredFlag(flag, evidence))
    if "ocular_hypertension" not in out:
        at = _oht_from_readings(low)
        if at is not None:
            out["ocular_hypertension"] = InferredFlag("ocular_hypertension", _sentence_at(text, low, at))
    if _MYOPIA_HINT.search(low):
        sentence = _progressive_myopia(text, low)
        if sentence is not None:
            out["progressive_myopia"] = InferredFlag("progressive_myopia", sentence.strip())
    return list(out.values())


def _flags_from_clauses(text: str, low: str, terms: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
    """(flag, evidence) for each flag a clause asserts, in note order (only sentences with a term are read)."""
    clauses = list(_clauses(text, low, terms))
    negated_lists = _list_negations(clauses) if len(clauses) > 1 else set()
    found: list[tuple[int, int, str, str, str]] = []  # clause index, position, flag, evidence, kind of term
    previous_kind: str | None = None
    previous_sentence = -1
    names_oht = False
    explained: set[str] = set()
    for index, c in enumerate(clauses):
        if c.number != previous_sentence:
            previous_kind, previous_sentence = None, c.number
        if not c.has_term and previous_kind not in _GLAUCOMA_KINDS:
            continue  # no term, and no glaucoma before it that "as her sister has it" could refer to
        flags, previous_kind, oht, drugs = _clause_flags(c, previous_kind, index in negated_lists)
        names_oht = names_oht or oht
        explained |= drugs
        found.extend((index, position, flag, c.evidence, kind) for position, flag, kind in flags)
    # Anti-glaucoma drops in a note about the patient's OHT treat the OHT ("OHT on latanoprost").
    if names_oht:
        found = [f for f in found if not (f[2] == "glaucoma" and f[4] == "glaucoma_drug")]
    # Metformin in a note that says "pre-diabetic" treats the pre-diabetes.
    if explained:
        found = [f for f in found if f[4] not in explained]
    # Glaucomatous signs in a diagnosed glaucoma are part of it, not a new suspicion, and a past suspicion
    # ("previously glaucoma suspect, now POAG") has been settled by the diagnosis.
    if any(f[2] == "glaucoma" and f[4] == "glaucoma" for f in found):
        found = [f for f in found if f[4] not in ("suspect_sign", "past_suspect")]
    return [(flag, evidence) for _, _, flag, evidence, _ in sorted(found, key=lambda f: (f[0], f[1]))]


def _sentence_at(text: str, low: str, position: int) -> str:
    start = max((m.end() for m in _SENTENCE_SPLIT.finditer(low, 0, position)), default=0)
    end_match = _SENTENCE_SPLIT.search(low, position)
    return text[start : end_match.start() if end_match else len(text)].strip()


def infer_from_iop(right: float | None, left: float | None) -> list[InferredFlag]:
    high = [v for v in (right, left) if v is not None and float(v) >= OHT_IOP_MMHG]
    if not high:
        return []
    return [InferredFlag("ocular_hypertension", f"IOP {max(high):g} mmHg (>= {OHT_IOP_MMHG:g})")]


def inferred_flags(pms_flags: Iterable[str], evidence: Iterable[InferredFlag]) -> dict[str, str]:
    """Inferred flags the PMS did not already set, with their evidence (a PMS flag always wins)."""
    pms = set(pms_flags)
    out: dict[str, str] = {}
    for item in evidence:
        if item.flag not in pms and item.flag not in out:
            out[item.flag] = item.evidence
    return out
