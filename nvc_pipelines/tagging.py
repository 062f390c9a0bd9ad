"""Clinical auto-tagging: risk flags inferred from free-text notes and exam measurements.

Inferred flags are marked as such, never overwrite a flag the PMS set, and feed the recall rules.
Precision and recall are measured on a labelled set of notes in ``tests/test_tagging.py`` (its
docstring has the labelling conventions this module follows).

How a note is read (regular expressions only, so 200,000 notes take seconds):

1. The note is lower-cased and cut into sentences (``.`` not inside a number, ``;``, line breaks)
   and each sentence into clauses (commas and `` - `` outside brackets, "but", "however"...). A clause
   that is only a relative ("- father", "(mum)") or only a form answer ("- no", "- nil", "- yes") is
   joined to its neighbour, so "FHx glaucoma - no" and "F/H glaucoma - father" read as one statement.
2. Section headings ("GH:", "Meds:", "FOH:", "FMH:", "Fam hist:") say whom the rest of the sentence
   is about: the patient, or the patient's family.
3. In each clause, clinical terms are found: diagnoses, abbreviations (T2DM, IDDM, POAG, NTG, OHT),
   common misspellings, drugs (brand and generic), glaucoma procedures, DESP grades (R0M0). Longer
   terms win over the words inside them, so "diabetes insipidus", "pre-diabetic" and "glaucoma
   suspect" are never read as "diabetes" or "glaucoma".
4. Each term is then qualified by its clause:
   * subject: the patient, a first-degree relative (parent, sibling, child), another relative
     (grandparent, aunt, cousin...), someone else (husband, wife, carer, friend, in-laws), or an
     unspecified family history ("FHx glaucoma"). The nearest person named before the term decides
     ("Pt is a carer for husband who is diabetic"), else one named right after it ("glaucoma in
     father", "FHx POAG (dad)"). Possessives are followed ("pt's mum" is a parent, "mum's sister" an
     aunt), a person who only reports ("carer says ...") is not the subject, and "... as her sister
     has it" gives the sister the condition just named;
   * negation: a cue shortly before the term and in the same scope ("no", "denies", "nil", "non-",
     "not on any"), a verdict right after it ("ruled out", "excluded") or a negative form answer
     closing the clause ("Diabetic: N", "FHx glaucoma - no");
   * uncertainty: "?glaucoma", "query", "possible", "likely", "suspected", "r/o", "referred for
     glaucoma assessment", and "early" glaucoma;
   * topic only: leaflets, screening, tests, risk factors, worries ("leaflet on diabetes", "glaucoma
     screening normal", "asked about glaucoma test", "worried about diabetes").
5. Flags follow from term and qualifiers: the patient's uncertain glaucoma is ``glaucoma_suspect``, an
   uncertain diabetes or OHT is no flag; a first-degree or unspecified relative's glaucoma is
   ``glaucoma_family_history``; anyone else's condition is no flag for the patient. A drug given for
   something else ("metformin for PCOS") is no evidence, and anti-glaucoma drops in a note that states
   OHT are taken to treat the OHT, not glaucoma.
6. IOP readings ("IOPs 23/24 GAT", "IOP R 19 L 22", "Tonometry: R 22 L 21") of ``OHT_IOP_MMHG`` or
   more suggest ocular hypertension, unless a Goldmann/Perkins (applanation) reading in the same note
   is below the threshold: it supersedes an NCT screen. Dates, times, acuities, C/D ratios and blood
   pressures are not read as pressures.
"""

from __future__ import annotations

import re
import string
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

# IOP at or above this (mmHg) in either eye suggests ocular hypertension (NICE NG81: 24 mmHg refers,
# but optometrists flag from 22 for monitoring, as "IOP 22mmHg" notes do).
OHT_IOP_MMHG = 22.0


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
    # biguanide, sulfonylureas, gliptins, glitazone, SGLT2 inhibitors, meglitinides, GLP-1 agonists
    r"metformin|glucophage|gliclazide|glimepiride|glibenclamide|glipizide|tolbutamide|"
    r"sitagliptin|januvia|janumet|linagliptin|trajenta|jentadueto|alogliptin|vipidia|saxagliptin|onglyza|"
    r"vildagliptin|galvus|eucreas|pioglitazone|actos|empagliflozin|jardiance|synjardy|dapagliflozin|forxiga|"
    r"xigduo|canagliflozin|invokana|vokanamet|ertugliflozin|steglatro|repaglinide|nateglinide|acarbose|"
    r"liraglutide|victoza|semaglutide|ozempic|rybelsus|dulaglutide|trulicity|exenatide|byetta|bydureon|"
    r"lixisenatide|lyxumia|tirzepatide|mounjaro|(?:oral\s+)?hypoglycaemics?|"
    # insulins and glucose monitoring
    r"insulins?|lantus|levemir|novorapid|novomix|humalog|humulin|tresiba|toujeo|abasaglar|apidra|fiasp|"
    r"lyumjev|insulatard|semglee|xultophy|degludec|glargine|detemir|"
    r"(?:freestyle\s+)?libre(?:\s+sensor)?|dexcom"
)
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
# before "glaucoma"). Text is lower-cased before matching, and every alternative starts with a literal
# character, which keeps the scan fast.
_TERM_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # diabetes that is not diabetes mellitus of the patient now
    (
        "not_diabetes",
        (
            r"pre[-\s]?diabet\w*",
            r"borderline\s+(?:type\s*(?:2|ii)\s+)?(?:diabet\w*|dm|sugars?)\b",
            r"diabetes\s+insipidus\b",
            r"insulin\s+resistan\w*",
            r"non[-\s]?diabet\w*",
        ),
    ),
    ("gestational", (r"gestational\s+diabet\w*", r"gdm\b", r"diabet\w*\s+(?:in|during|of)\s+pregnancy\b")),
    (
        "diabetes",
        (
            r"non[-\s]?insulin[-\s]dependent(?:\s+diabet\w*)?",
            r"insulin[-\s]dependent(?:\s+diabet\w*)?",
            # diabetes, diabetic and their misspellings (diabeties, diebetic, diabetis, diabtes, daibetic)
            r"d(?:ia|ie|ai|ei|a|i)b(?:e{1,2}|i)?t(?:es|is|ies|ic|ics|c|s|ys)(?:\s+mellitus)?\b",
            r"t[12]\s*dm\b",
            r"t[12]d\b",
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
            rf"(?:poag|coag|pacg|cacg|ntg|ltg|pxfg|pexg|pdg|acg|nvg|{_GLAUC})\b",
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
            rf"(?:{_IOP_WORD}|(?<!blood\s)pressures?)\s+(?:(?:are|were|is|was|remains?|still|slightly|very|quite)\s+)*"
            r"(?:raised|elevated|high)\b",
        ),
    ),
)
# Each alternative ends with an empty group, whose number tells the kind of the term that matched.
_TERMS = re.compile(r"\b(?:" + "|".join(f"{p}()" for _, patterns in _TERM_KINDS for p in patterns) + ")")
_KIND_OF_GROUP = ("",) + tuple(kind for kind, patterns in _TERM_KINDS for _ in patterns)
_KINDS_FLAG = {
    "diabetes": "diabetic",
    "diabetic_eye": "diabetic",
    "diabetes_drug": "diabetic",
    "gestational": "diabetic",
    "suspect": "glaucoma_suspect",
    "suspect_sign": "glaucoma_suspect",
    "fh_glaucoma": "glaucoma",
    "glaucoma": "glaucoma",
    "glaucoma_drug": "glaucoma",
    "oht": "ocular_hypertension",
}
_GLAUCOMA_KINDS = frozenset({"glaucoma", "glaucoma_drug", "fh_glaucoma"})
_DRUG_KINDS = frozenset({"diabetes_drug", "glaucoma_drug"})
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
# "... as her sister has it": a relative with the condition just mentioned.
_ANAPHORA = re.compile(
    r"\b(?:(?:also|too)\s+)?(?:has|had|have|with|suffers?\s+from|suffered\s+from|(?:diagnosed|treated)\s+(?:with|for))"
    r"\s+(?:it|this|that|the\s+same)\b"
)
_NEG_AFTER = re.compile(
    r"\s*(?:(?:(?:has|have)\s+been|was|were|is|been)\s+)?(?:(?:(?!not\b|yet\b)\S+\s+){0,3}?)"
    r"(?:ruled\s+out|r/o|excluded|discounted|unlikely|not\s+confirmed|resolved)\b|"
    r"\s*[:=\-–]?\s*(?:negative|neg|absent|not\s+(?:present|found|seen|detected|known))\b|\s*-ve\b",
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
    r"questionable|borderline)\b)\s*(?:[\w/-]+\s+){0,2}$|"
    r"\b(?:unsure|thinks?|consider(?:ing|ed)?|investigat\w*|awaiting|pending)\s+(?:[\w/-]+\s+)?$",
)
_EARLY_BEFORE = re.compile(r"\bearly\s+$")
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
    r"\b(?:explained|discussed|counsell?ed|educated)\s+(?:(?:on|about|re|regarding|the|what|how)\s+){0,3})"
    r"(?:\?\s*)?$",
)
_TOPIC_AFTER = re.compile(
    r"[\s-]*(?:leaflets?|tests?|testing|risks?|info(?:rmation)?|awareness|advice|education|questionnaire)\b"
)
_ASSESSMENT_AFTER = re.compile(r"[\s-]*(assessment|opinion|investigations?|work-?up|referral)\b")
_SCREENING_AFTER = re.compile(r"[\s-]*(?:screen(?:ing|ed)?|checks?)\b")

# --------------------------------------------------------------------------------------------------
# Sentences and clauses
# --------------------------------------------------------------------------------------------------

_SENTENCE_SPLIT = re.compile(r"(?:\.(?!\d)|[;\n\r!])+")
# Commas and dashes inside brackets ("diabetes (dad, type 2)") do not split: the lookahead finds the
# closing bracket first (within a bracket's usual length, which keeps long notes linear).
_CLAUSE_SPLIT = re.compile(
    r",(?![^()]{0,80}\))|\s[-–—]+\s(?![^()]{0,80}\))|\s[-–—]+(?=\s*$)|\b(?:but|however|although|whereas)\b"
)
# A clause that is only people ("- father", "(mum and sister)") or only a form answer ("- no", ": Y").
_BARE = re.compile(
    r"[\s(]*(?:"
    rf"(?:(?:both|maternal|paternal|late|older|younger|elder)\s+)?{_PERSON_WORDS}(?:'s)?"
    rf"(?:\s*(?:,|&|\+|/|\band\b)\s*{_PERSON_WORDS})*|"
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


def _segments(pattern: re.Pattern[str], text: str, start: int, end: int) -> Iterable[tuple[int, int]]:
    """The stripped, non-empty stretches of text[start:end] between matches of pattern."""
    pos = start
    for sep in pattern.finditer(text, start, end):
        yield from _stripped(text, pos, sep.start())
        pos = sep.end()
    yield from _stripped(text, pos, end)


def _stripped(text: str, start: int, end: int) -> Iterable[tuple[int, int]]:
    part = text[start:end]
    stripped = part.strip()
    if stripped:
        start += len(part) - len(part.lstrip())
        yield start, start + len(stripped)


def _clauses(text: str, low: str) -> Iterable[tuple[str, str, bool, str, int]]:
    """(evidence, lower-cased clause, family heading in force, lower-cased sentence, sentence number)."""
    for number, (s_start, s_end) in enumerate(_segments(_SENTENCE_SPLIT, low, 0, len(low))):
        sentence = low[s_start:s_end]
        family = False
        # clauses as lists of (evidence, body) parts: a bare part joins the clause before it, or the
        # one after it when it comes first
        clauses: list[tuple[list[str], list[str], bool]] = []
        pending: tuple[list[str], list[str]] = ([], [])
        for c_start, c_end in _segments(_CLAUSE_SPLIT, low, s_start, s_end):
            evidence, body = text[c_start:c_end], low[c_start:c_end]
            heading = _HEADING.match(body)
            if heading:
                name = " ".join(heading.group(1).split())
                if name in _FAMILY_HEADINGS or name in _PATIENT_HEADINGS:
                    family = name in _FAMILY_HEADINGS
                    body = body[heading.end() :]
                    if not body:
                        continue
            if _BARE.fullmatch(body):
                parts = clauses[-1] if clauses else pending
                parts[0].append(evidence)
                parts[1].append(body)
                continue
            clauses.append(([*pending[0], evidence], [*pending[1], body], family))
            pending = ([], [])
        for evidences, bodies, heading_family in clauses:
            yield " - ".join(evidences), " - ".join(bodies), heading_family, sentence, number


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
        if first < len(people) and people[first][0] == link.end():
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


def _negated(clause: str, start: int, end: int, answer_at: int) -> bool:
    """Negated by a cue before the term (same scope), a verdict after it, or a form answer closing the
    clause at ``answer_at`` ("FHx glaucoma - no")."""
    if end <= answer_at <= len(clause):
        return True
    scope_start = max(0, start - 50)
    for stop in _SCOPE_END.finditer(clause, scope_start, start):
        scope_start = stop.end()
    before = clause[scope_start:start]
    if _NEG_BEFORE.search(before) or _NON_BEFORE.search(before):
        return True
    return _NEG_AFTER.match(clause, end) is not None


def _uncertain(clause: str, start: int, end: int, kind: str) -> bool:
    before = clause[max(0, start - 40) : start]
    if _UNCERTAIN_BEFORE.search(before):
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
    # diabetic's own screening programme and an "OHT check" monitors a known OHT.
    return (
        kind not in ("diabetic_eye", "oht")
        and not clause[start:end].endswith("ic")
        and bool(_SCREENING_AFTER.match(clause, end))
    )


def _answer_at(clause: str) -> int:
    """Where a negative form answer closes the clause ("Diabetic: N"), or past its end if none does."""
    answer = _ANSWER_NO.search(clause)
    return answer.start() if answer else len(clause) + 1


def _clause_flags(
    clause: str, family_heading: bool, sentence: str, previous_kind: str | None
) -> tuple[list[tuple[int, str, str]], str | None, bool]:
    """What one clause says about the patient.

    Returns (position, flag, kind of the term) for each flag the clause asserts, the kind of its last
    term (which "it" in the next clause may refer to), and whether it names the patient's OHT at all
    (even negated or queried). ``previous_kind`` is the last kind earlier in the sentence.
    """
    out: list[tuple[int, str, str]] = []
    kinds: list[tuple[int, str]] = []
    names_oht = False
    other_indication: bool | None = None
    people = _People(clause, family_heading)
    answer_at = -1  # where a negative form answer closes the clause (found on first need)
    for match in _TERMS.finditer(clause):
        start, end = match.span()
        kind = _KIND_OF_GROUP[match.lastindex or 0]
        kinds.append((start, kind))
        if kind == "not_diabetes":
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
        negated = _negated(clause, start, end, answer_at)
        if negated and kind != "oht":
            continue
        subject = "family" if kind == "fh_glaucoma" else people.subject(start, end)
        if kind == "oht" and subject == "patient":
            names_oht = True
        if negated:
            continue
        uncertain = kind not in _SUSPECT_KINDS and _uncertain(clause, start, end, kind)
        if subject == "patient":
            flag = _KINDS_FLAG[kind]
            if uncertain:
                if flag != "glaucoma":
                    continue  # "?diabetes", "?OHT": not a flag until confirmed (raised readings count)
                flag = "glaucoma_suspect"
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
    return out, (kinds[-1][1] if kinds else previous_kind), names_oht


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
    low = text.translate(_ASCII_LOWER)  # the vocabulary is ASCII; this keeps every position in place
    found: list[tuple[int, int, str, str, str]] = []  # clause index, position, flag, evidence, kind of term
    if _TERMS.search(low) is None:  # most notes name no condition at all: only pressures to read
        at = _oht_from_readings(low)
        return [] if at is None else [InferredFlag("ocular_hypertension", _sentence_at(text, low, at))]
    previous_kind: str | None = None
    previous_sentence = -1
    names_oht = False
    for index, (evidence, clause, family_heading, sentence, number) in enumerate(_clauses(text, low)):
        if number != previous_sentence:
            previous_kind, previous_sentence = None, number
        flags, previous_kind, oht = _clause_flags(clause, family_heading, sentence, previous_kind)
        names_oht = names_oht or oht
        found.extend((index, position, flag, evidence, kind) for position, flag, kind in flags)
    # Anti-glaucoma drops in a note about the patient's OHT treat the OHT ("OHT on latanoprost").
    if names_oht:
        found = [f for f in found if not (f[2] == "glaucoma" and f[4] == "glaucoma_drug")]
    # Glaucomatous signs in a diagnosed glaucoma are part of it, not a new suspicion.
    if any(f[2] == "glaucoma" and f[4] == "glaucoma" for f in found):
        found = [f for f in found if f[4] != "suspect_sign"]
    out: dict[str, InferredFlag] = {}
    for _, _, flag, evidence, _ in sorted(found, key=lambda f: (f[0], f[1])):
        out.setdefault(flag, InferredFlag(flag, evidence))
    if "ocular_hypertension" not in out:
        at = _oht_from_readings(low)
        if at is not None:
            out["ocular_hypertension"] = InferredFlag("ocular_hypertension", _sentence_at(text, low, at))
    return list(out.values())


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
