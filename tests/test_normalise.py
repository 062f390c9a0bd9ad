import re
from collections import Counter
from datetime import date

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType

from nvc_pipelines.model import PhoneType
from nvc_pipelines.normalise import (
    InvalidValue,
    PatientDraft,
    build_patient,
    collect,
    map_risk_categories,
    normalise_phone,
    normalise_phones,
    parse_uk_date,
)

TODAY = date(2026, 11, 25)


@pytest.mark.parametrize("raw", ["07700 900123", "+44 7700 900123", "447700900123", "7700900123", "(07700) 900-123"])
def test_the_same_drama_mobile_written_five_ways(raw: str) -> None:
    phone = normalise_phone(raw)
    assert phone.e164 == "+447700900123"
    assert phone.type is PhoneType.MOBILE


@pytest.mark.parametrize(
    "raw,e164",
    [
        ("01632 960123", "+441632960123"),
        ("0161 496 0123", "+441614960123"),
        ("020 7946 0999", "+442079460999"),
        ("0191 498 0001", "+441914980001"),
        ("07911 123456", "+447911123456"),  # a real (valid) mobile range
    ],
)
def test_ofcom_drama_and_valid_numbers_are_accepted(raw: str, e164: str) -> None:
    assert normalise_phone(raw).e164 == e164


@pytest.mark.parametrize(
    "raw,reason",
    [
        ("7.7009E+09", "scientific notation"),
        ("12345", "not a valid UK number"),
        ("+33 1 23 45 67 89", "not a UK number"),
        ("call me", "not a phone number"),
        ("", "blank"),
    ],
)
def test_bad_phones_are_refused_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason):
        normalise_phone(raw)


def test_several_numbers_in_one_field_mobile_first() -> None:
    phones, problems = normalise_phones(["0161 496 0123 / 07700 900123; 07700 900123", "nonsense"])
    assert [p.e164 for p in phones] == ["+447700900123", "+441614960123"]
    assert len(problems) == 1


@pytest.mark.parametrize(
    "raw,expected",
    [("15/01/2024", date(2024, 1, 15)), ("2024-01-15", date(2024, 1, 15)), ("15-01-2024", date(2024, 1, 15))],
)
def test_day_first_and_iso_dates(raw: str, expected: date) -> None:
    assert parse_uk_date(raw, "d") == expected


def test_impossible_date_is_refused_not_guessed() -> None:
    with pytest.raises(InvalidValue, match="31/02/2024"):
        parse_uk_date("31/02/2024", "last_eye_test_date")


def test_risk_categories_map_to_flags_and_keep_unknowns() -> None:
    flags, unknown = map_risk_categories("Diabetes; OHT, glaucoma_suspect | high myopia")
    assert flags == ["diabetic", "ocular_hypertension", "glaucoma_suspect"]
    assert unknown == ["high myopia"]
    assert map_risk_categories("standard") == ([], [])


def _draft(**kw) -> PatientDraft:
    base = dict(
        pms_patient_id=None,
        first_name="Siân",
        last_name="O'Neill",
        phones=["07700 900123"],
        last_eye_test_date="15/01/2024",
    )
    return PatientDraft(**{**base, **kw})


def test_strict_row_without_phone_or_test_date_is_rejected_with_every_reason() -> None:
    with pytest.raises(InvalidValue) as info:
        build_patient("p", _draft(phones=[""], last_eye_test_date=""), TODAY, strict=True)
    assert "phone number is missing" in str(info.value)
    assert "last_eye_test_date is missing" in str(info.value)


def test_future_test_date_and_test_before_birth_are_rejected() -> None:
    with pytest.raises(InvalidValue, match="in the future"):
        build_patient("p", _draft(last_eye_test_date="01/01/2027"), TODAY, strict=True)
    with pytest.raises(InvalidValue, match="before date_of_birth"):
        build_patient("p", _draft(date_of_birth="01/01/2020", last_eye_test_date="01/01/2019"), TODAY, strict=True)


def test_pms_patient_without_phone_is_kept_when_not_strict() -> None:
    patient = build_patient("p", _draft(pms_patient_id="P1", phones=[]), TODAY, strict=False)
    assert patient.phones == [] and patient.pms_patient_id == "P1"


def test_rows_without_ids_get_a_stable_identity_and_duplicates_are_rejected() -> None:
    rows = [
        ("line 2", {"n": 1}, _draft()),
        ("line 3", {"n": 2}, _draft(first_name="SIÂN", phones=["+447700900123"])),
        ("line 4", {"n": 3}, _draft(first_name="Tom")),
    ]
    result = collect("p", rows, TODAY, strict=True)
    assert [p.first_name for p in result.patients] == ["Siân", "Tom"]
    assert result.rejected[0].row_ref == "line 3" and "duplicate of line 2" in result.rejected[0].reason
    assert result.rows_read == 3


def _reference_phone(digits: str) -> tuple[str, PhoneType] | None:
    """The slow, obvious way with the library's own calls: parse, validate, format, classify."""
    import phonenumbers
    from phonenumbers import PhoneNumberType

    from nvc_pipelines.normalise import is_ofcom_drama_number

    try:
        parsed = phonenumbers.parse(digits, "GB")
    except phonenumbers.NumberParseException:
        return None
    national = str(parsed.national_number)
    if parsed.country_code != 44:
        return None
    if is_ofcom_drama_number(national):
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), (
            PhoneType.MOBILE if national.startswith("7") else PhoneType.LANDLINE
        )
    if not phonenumbers.is_valid_number(parsed):
        return None
    kind = phonenumbers.number_type(parsed)
    ours = (
        PhoneType.MOBILE
        if kind == PhoneNumberType.MOBILE
        else PhoneType.LANDLINE
        if kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
        else PhoneType.OTHER
    )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), ours


@settings(max_examples=600, deadline=None)
@given(
    prefix=st.sampled_from(["0", "+44", "+44 ", "0044", "44"]),
    national=st.from_regex(r"[1-9][0-9]{8,10}", fullmatch=True),
)
def test_phone_fast_path_agrees_with_phonenumbers(prefix: str, national: str) -> None:
    """The shortcut for plain `0…`/`+44…` numbers gives what phonenumbers' parse + is_valid gives."""
    raw = prefix + national
    digits = re.sub(r"[^\d+]", "", raw)
    expected = _reference_phone("+" + digits[2:] if digits.startswith("00") else digits)
    try:
        phone = normalise_phone(raw)
    except InvalidValue:
        assert expected is None or raw.startswith("44") and len(national) != 10
        return
    if raw.startswith("44"):  # bare 44 + 10 digits is read as international; otherwise as national
        return
    assert (phone.e164, phone.type) == expected


def test_uk_number_type_is_number_type_for_every_uk_prefix_and_the_table_remembers_it_exactly() -> None:
    """`uk_number_type` matches GB's patterns once where `number_type` matches them twice, and the
    table keeps its answer under the leading digits that decide it: for every four-digit prefix,
    numbers of 10, 9 and 7 digits whose later digits differ (the table answering from what it kept
    for the first), mobiles, landlines, freephone, premium, the Crown dependencies and invalid ones,
    the same type as `number_type`."""
    from nvc_pipelines.normalise import uk_number_type
    from nvc_pipelines.phone_types import TypeTable

    table = TypeTable(uk_number_type)
    assert table.exact and len(table.depths) > 4  # GB's patterns look up to 7 digits in
    kinds: Counter[int] = Counter()
    asked = 0
    for prefix in range(1000, 10000):
        tails = [(f"{t:06d}", f"{t:05d}"[:5], f"{t:03d}"[:3]) for t in (prefix % 997, 999999, 100000, 637281)]
        for tail10, tail9, tail7 in tails:
            for national in (f"{prefix}{tail10}", f"{prefix}{tail9}", f"{prefix}{tail7}"):
                kind = phonenumbers.number_type(
                    phonenumbers.PhoneNumber(country_code=44, national_number=int(national))
                )
                assert uk_number_type(national) == kind, national
                assert table.kind_of(national) == kind, national
                kinds[kind] += 1
                asked += 1
    assert len(table.known) < asked / 3  # most answers came from a kept prefix
    for national in ("1481256789", "1534456789", "1624456789", "7624456789", "7781123456", "7700900123"):
        number = phonenumbers.PhoneNumber(country_code=44, national_number=int(national))
        assert table.kind_of(national) == uk_number_type(national) == phonenumbers.number_type(number), national
    guernsey = phonenumbers.parse("+441481256789")  # GB's patterns refuse it: `number_type` answered
    assert (
        not phonenumbers.is_valid_number_for_region(guernsey, "GB")
        and uk_number_type("1481256789") == PhoneNumberType.FIXED_LINE
    )
    assert {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.TOLL_FREE,
            PhoneNumberType.PREMIUM_RATE, PhoneNumberType.UNKNOWN} <= set(kinds)  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+44 (0)07700 900123", ("+447700900123", PhoneType.MOBILE)),  # a kept zero: typed without it
        ("+44 (0)020 7123 4567", None),  # two zeros: the library types it with one kept, and refuses it
        ("+44 (0)0800 123456", None),
        ("07\u0667" + "00 900123", ("+447700900123", PhoneType.MOBILE)),  # an Arabic-Indic seven typed in
        ("07\u0667" + "11 123456", ("+447711123456", PhoneType.MOBILE)),
    ],
)
def test_numbers_the_type_table_must_not_answer_are_typed_as_before(raw: str, expected: tuple | None) -> None:
    """A national number with a zero kept in front, or typed with other scripts' digits, is typed as
    it always was: the E.164 in ASCII digits, and the table never keeps a prefix of one (a first such
    number once decided the type of every later one sharing its first digit)."""
    from nvc_pipelines.normalise import _UK_TYPES

    for _ in range(2):  # the second time, anything the first left in the table would answer
        if expected is None:
            with pytest.raises(InvalidValue, match="not a valid UK number"):
                normalise_phone(raw)
        else:
            phone = normalise_phone(raw)
            assert (phone.e164, phone.type) == expected
    assert all(prefix.isascii() and not prefix.startswith("0") for _, prefix in _UK_TYPES.known)


@pytest.mark.parametrize("pattern", [r"7\d+", r"7(?=1)\d{9}", r"(7)\1\d{8}"])
def test_a_pattern_the_table_cannot_expand_turns_it_off(pattern: str) -> None:
    """Anything but literals, digit classes, groups, alternatives and bounded repeats cannot be read
    as a finite set of digit sequences: the table then remembers nothing (every number is asked)."""
    import re._parser as sre_parser

    from nvc_pipelines.phone_types import Unsupported, _expand

    with pytest.raises(Unsupported):
        _expand(sre_parser.parse(pattern))


@pytest.mark.parametrize("raw", ["2024-01-15", "2024-02-29", "15/01/2024", "2024-01-15T10:30:00Z"])
def test_iso_fast_path_gives_the_same_dates(raw: str) -> None:
    expected = date.fromisoformat(raw[:10]) if "-" in raw[:5] else date(2024, 1, 15)
    assert parse_uk_date(raw, "d") == expected


@pytest.mark.parametrize("raw", ["2024-02-30", "2024-13-01", "2024-1-155"])
def test_impossible_iso_dates_are_refused_not_guessed(raw: str) -> None:
    with pytest.raises(InvalidValue, match="is not a date"):
        parse_uk_date(raw, "last_eye_test_date")


def test_a_pms_deceased_mark_holds_even_with_a_bad_date() -> None:
    from nvc_pipelines.model import PatientStatus
    from nvc_pipelines.normalise import PatientDraft, build_patient

    for raw in ("31/02/2024", "01/01/2999", "unknown", None):
        draft = PatientDraft("P1", "Ann", "Lee", ["07700 900123"], status="deceased", status_date=raw)
        patient = build_patient("p", draft, date(2026, 11, 25), strict=False)
        assert patient.status == PatientStatus.DECEASED and patient.status_date is None
    ok = build_patient("p", PatientDraft("P1", "Ann", "Lee", status="deceased", status_date="2026-10-01"),
                       date(2026, 11, 25), strict=False)  # fmt: skip
    assert ok.status_date == date(2026, 10, 1)
    with pytest.raises(InvalidValue, match="patient status 'zombie' is not known"):
        build_patient("p", PatientDraft("P1", "Ann", "Lee", status="zombie"), date(2026, 11, 25), strict=False)


@pytest.mark.parametrize(
    ("first", "problem"),
    [
        ("\u200f\u200e\u202e", "first_name has no letters"),  # only bidi marks and an RTL override
        ("\x81\x8d", "first_name contains control characters"),  # undecodable Windows-1252 bytes
        ("Ann\x07", "first_name contains control characters"),
        ("Badÿþ", "looks garbled by a wrong text encoding"),  # a UTF-16 byte-order mark read as Latin-1
        ("JosÃ©", "looks garbled by a wrong text encoding"),  # UTF-8 read as Windows-1252
        ("Ann\ufffd", "looks garbled by a wrong text encoding"),
        ("1234", "first_name has no letters"),
        ("\u202eeeL", "first_name holds a text-direction override"),  # shown as "Lee", stored reversed
        ("Ann\u202d", "first_name holds a text-direction override"),
    ],
)
def test_names_that_are_not_names_are_rejected_with_the_reason(first: str, problem: str) -> None:
    from nvc_pipelines.normalise import PatientDraft, build_patient

    with pytest.raises(InvalidValue, match=problem):
        build_patient("p", PatientDraft("P1", first, "Lee", ["07700 900123"]), date(2026, 11, 25), strict=False)


def test_a_guardians_name_follows_the_same_rules_as_the_patients() -> None:
    from nvc_pipelines.normalise import PatientDraft, build_patient

    def child(guardian: str | None) -> PatientDraft:
        return PatientDraft("P1", "Tom", "Lee", ["07700 900123"], date_of_birth="01/01/2020", guardian_name=guardian)

    today = date(2026, 11, 25)
    assert build_patient("p", child("  Mary\u200f  Lee "), today, strict=False).guardian_name == "Mary Lee"
    assert build_patient("p", child("   "), today, strict=False).guardian_name is None
    for garbled, problem in (("Mary\x07", "control characters"), ("Mar\u202eyL", "text-direction override")):
        with pytest.raises(InvalidValue, match=f"guardian_name .*{problem}|guardian_name {problem}"):
            build_patient("p", child(garbled), today, strict=False)


def test_invisible_characters_around_a_real_name_are_removed() -> None:
    from nvc_pipelines.normalise import PatientDraft, build_patient

    patient = build_patient(
        "p", PatientDraft("P1", "\u200fSiân\u202c", "O'Neill\u200d", ["07700 900123"]), date(2026, 11, 25), strict=False
    )
    assert (patient.first_name, patient.last_name) == ("Siân", "O'Neill")


@pytest.mark.parametrize(
    ("first", "last", "review"),
    [
        ("Anna", "Lee", None),
        ("Siân", "Ó Súilleabháin", None),  # accents are Latin letters, not another script
        ("Иван", "Petrov", None),  # a whole word in one script is a name, not a look-alike
        ("\u0410nna", "Lee", "first_name mixes Cyrillic and Latin letters"),  # Cyrillic А in "Anna"
        ("Ann", "Sm\u0456th-Jones", "last_name mixes Cyrillic and Latin letters"),  # Ukrainian і
        ("\u0391lex", "Lee", "first_name mixes Greek and Latin letters"),  # Greek Alpha
    ],
)
def test_a_name_mixing_look_alike_scripts_is_kept_but_flagged_for_review(
    first: str, last: str, review: str | None
) -> None:
    from nvc_pipelines.normalise import PatientDraft, build_patient

    draft = PatientDraft("P1", first, last, ["07700 900123"], last_eye_test_date="01/02/2024")
    patient = build_patient("p", draft, date(2026, 11, 25), strict=True)
    assert patient.first_name == first and patient.phones  # kept and callable
    if review is None:
        assert patient.name_review is None
    else:
        assert patient.name_review is not None and patient.name_review.startswith(review)
