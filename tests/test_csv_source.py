from datetime import date
from pathlib import Path

import pytest

from nvc_pipelines.model import PatientStatus, PmsKind, Practice
from resources.csv_source import CsvFileRefused, CsvResource, parse_csv, template_text
from resources.protocol import PmsConnectionFailed

TODAY = date(2026, 11, 25)
HEADER = "first_name,last_name,phone_number,last_eye_test_date,risk_category,last_clinical_test_date,clinical_condition_notes"


def practice(path: Path) -> Practice:
    return Practice("csv-1", "CSV practice", PmsKind.CSV, {"path": str(path)}, "connected")


def test_template_round_trips_through_the_importer() -> None:
    result = parse_csv(template_text(), "p", "template.csv", TODAY)
    assert len(result.patients) == 3 and not result.rejected
    sian, tom, alfie = result.patients
    assert sian.first_name == "Siân" and sian.phones[0].e164 == "+447700900123"
    assert sian.risk_flags == ["diabetic"] and sian.last_eye_test_date == date(2024, 1, 15)
    assert sian.contact.may_phone and sian.status == PatientStatus.ACTIVE
    assert tom.contact.may_phone and tom.phones == alfie.phones
    assert alfie.guardian_name == "Tom O'Neill" and alfie.date_of_birth == date(2017, 5, 20)


@pytest.mark.parametrize(
    ("deceased", "do_not_call", "status", "died_on", "may_phone"),
    [
        ("", "", PatientStatus.ACTIVE, None, True),
        ("no", "N", PatientStatus.ACTIVE, None, True),
        ("Yes", "true", PatientStatus.DECEASED, None, False),
        ("1", "0", PatientStatus.DECEASED, None, True),
        ("03/11/2026", "", PatientStatus.DECEASED, date(2026, 11, 3), True),
        ("2026-10-01", "y", PatientStatus.DECEASED, date(2026, 10, 1), False),
        ("FALSE", "yes", PatientStatus.ACTIVE, None, False),
    ],
)
def test_deceased_and_do_not_call_columns(deceased, do_not_call, status, died_on, may_phone) -> None:
    text = (
        f"{HEADER},Deceased,Do Not Call,Guardian Name\nAnn,Lee,07700 900100,15/01/2024,,,,{deceased},{do_not_call},\n"
    )
    result = parse_csv(text, "p", "f.csv", TODAY)
    assert not result.rejected, result.rejected
    ann = result.patients[0]
    assert (ann.status, ann.status_date, ann.contact.may_phone) == (status, died_on, may_phone)


@pytest.mark.parametrize(
    ("deceased", "do_not_call", "reason"),
    [
        ("maybe", "", "deceased 'maybe' is neither yes/no nor a date"),
        ("", "perhaps", "do_not_call 'perhaps' is not yes or no"),
        ("31/02/2026", "", "deceased '31/02/2026' is neither yes/no nor a date"),
        ("01/01/2099", "", "date of death 2099-01-01 is in the future"),
    ],
)
def test_bad_contact_cells_are_rejected_with_their_reason(deceased, do_not_call, reason) -> None:
    text = f"{HEADER},deceased,do_not_call\nAnn,Lee,07700 900100,15/01/2024,,,,{deceased},{do_not_call}\n"
    result = parse_csv(text, "p", "f.csv", TODAY)
    assert not result.patients and reason in result.rejected[0].reason


def test_headers_match_ignoring_case_spaces_underscores_and_bom() -> None:
    text = "\ufeffFirst Name;LAST_NAME;Phone Number;Last Eye Test Date\nZoë;Ng;07700 900001;2024-02-01\n"
    result = parse_csv(text, "p", "f.csv", TODAY)
    assert result.patients[0].first_name == "Zoë"


def test_every_bad_row_is_kept_with_its_reason() -> None:
    text = "\n".join(
        [
            HEADER,
            "Ann,Lee,07700 900100,15/01/2024,standard,,",
            ",,07700 900101,15/01/2024,,,",
            "Bob,Kay,,15/01/2024,,,",
            "Cat,Roe,07700 900102,31/02/2024,,,",
            "Dan,Fox,07700 900103,01/01/2030,,,",
            "Eve,Ray,7.7009E+09,01/01/2024,,,",
            "Fay,Orr,07700 900104,01/01/2024,high myopia,,",
            "",
        ]
    )
    result = parse_csv(text, "p", "f.csv", TODAY)
    assert result.rows_read == 7
    assert sorted(p.first_name for p in result.patients) == ["Ann", "Fay"]
    fay = next(p for p in result.patients if p.first_name == "Fay")
    assert fay.unknown_risk_values == ["high myopia"]
    reasons = {r.row_ref: r.reason for r in result.rejected}
    assert "name is missing" in reasons["f.csv:line 3"]
    assert "phone number is missing" in reasons["f.csv:line 4"]
    assert "31/02/2024" in reasons["f.csv:line 5"]
    assert "in the future" in reasons["f.csv:line 6"]
    assert "scientific notation" in reasons["f.csv:line 7"]
    assert result.rejected[0].raw["first_name"] == ""


def test_missing_required_column_refuses_the_whole_file_naming_it() -> None:
    with pytest.raises(CsvFileRefused, match="missing the required column\\(s\\) phone_number"):
        parse_csv("first_name,last_name,last_eye_test_date\nA,B,01/01/2024\n", "p", "f.csv", TODAY)


@pytest.mark.parametrize("text,problem", [("", "empty_file"), ("   \n", "empty_file"), (HEADER + "\n", "no_rows")])
def test_empty_and_header_only_files_are_refused(text: str, problem: str) -> None:
    with pytest.raises(CsvFileRefused) as info:
        parse_csv(text, "p", "f.csv", TODAY)
    assert info.value.problem == problem


def test_folder_drop_reads_the_newest_file_and_cp1252_is_decoded(tmp_path: Path) -> None:
    import os

    old = tmp_path / "old.csv"
    old.write_text(HEADER + "\nOld,Row,07700 900200,01/01/2024,,,\n")
    new = tmp_path / "new.csv"
    new.write_bytes((HEADER + "\nSiân,Zoë,07700 900201,01/01/2024,,,\n").encode("cp1252"))
    os.utime(old, (1_000_000, 1_000_000))
    client = CsvResource().open(practice(tmp_path), {})
    result = client.read_patients(None, TODAY)
    assert [(p.first_name, p.last_name) for p in result.patients] == [("Siân", "Zoë")]
    assert client.test_connection().detail == "newest file new.csv"


def test_missing_path_fails_the_connection_test(tmp_path: Path) -> None:
    with pytest.raises(PmsConnectionFailed) as info:
        CsvResource().open(practice(tmp_path / "nope"), {}).test_connection()
    assert info.value.problem == "path_not_found"


def test_binary_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(CsvFileRefused, match="binary file"):
        CsvResource().open(practice(tmp_path), {}).read_patients(None, TODAY)


def test_a_file_is_read_a_page_at_a_time_with_what_the_whole_read_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync holds one page of a file: pages in file order, a broken row on the page of the rows
    around it, a duplicate on a later page rejected naming its first row, and broken rows after the
    last good one kept; together exactly what reading the file whole gives."""
    from resources import csv_source

    monkeypatch.setattr(csv_source, "PAGE_ROWS", 4)
    rows = [f"P{n},Lee,07700 9001{n:02d},15/01/2024,,," for n in range(7)]
    rows.insert(2, 'Bad,"Quote,07700 900199,15/01/2024,,,\nstill,open"x,,,,,')  # broken quoting: a rejected row
    rows.append("P1,Lee,07700 900101,15/01/2024,,,")  # the same patient as row 2: a duplicate on a later page
    rows.append("A,B,C,D,E,F,G,H,I")  # more cells than the header: rejected, after the last good row
    (tmp_path / "export.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    client = CsvResource().open(practice(tmp_path / "export.csv"), {})

    pages = list(client.iter_patients(None, TODAY))
    whole = client.read_patients(None, TODAY)

    assert [p.first_name for p in whole.patients] == [f"P{n}" for n in range(7)]
    assert [p for page in pages for p in page.patients] == whole.patients
    assert [r for page in pages for r in page.rejected] == whole.rejected
    assert [r.row_ref.rsplit(" ", 1)[1] for r in whole.rejected] == ["4", "11", "12"]
    assert whole.rejected[1].reason == "duplicate of export.csv:line 3 (same patient)"
    # Four good or duplicate rows a page; the broken row with its neighbours, the trailing one alone.
    assert [(len(page.patients), len(page.rejected)) for page in pages] == [(4, 1), (3, 1), (0, 1)]


def test_a_refusal_on_a_later_page_comes_from_the_paged_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quote never closed refuses the file whole, after pages were already read: the sync writes the
    read in one transaction, so nothing of it lands (`test_dagster`)."""
    from resources import csv_source

    monkeypatch.setattr(csv_source, "PAGE_ROWS", 2)
    rows = [f"P{n},Lee,07700 9001{n:02d},15/01/2024,,," for n in range(5)] + ['Z,"never closed,07700 900199,,,,']
    (tmp_path / "export.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    pages = CsvResource().open(practice(tmp_path / "export.csv"), {}).iter_patients(None, TODAY)
    assert len(next(pages).patients) == 2
    with pytest.raises(CsvFileRefused, match="line 7 opens a quoted value"):
        list(pages)
