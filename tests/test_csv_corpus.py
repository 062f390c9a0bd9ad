"""Bad input, tried as a new user would: every file in tests/data/csv_corpus/ and the one clear result it
must end in.

* imported: n patients, plus the rows rejected (by physical line) with a piece of each reason;
* refused: the whole file, with a problem code and a piece of the message;

never a stack trace and never a partial import. Each file is read the way a practice's drop is read
(`CsvClient.read_patients`, streamed from disk) and also as bytes through `decode` + `parse_csv`; both
must agree. The 100 MB files are generated into tmp_path at test time, not committed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest

import resources.csv_source as csv_source
from nvc_pipelines.model import Patient, PmsKind, Practice, ReadResult
from resources.csv_source import (
    MAX_ROWS,
    REQUIRED_COLUMNS,
    CsvFileRefused,
    CsvResource,
    decode,
    parse_csv,
)

TODAY = date(2026, 11, 25)
CORPUS = Path(__file__).parent / "data" / "csv_corpus"
REPO = Path(__file__).resolve().parents[1]

Check = Callable[[ReadResult], None]


@dataclass(frozen=True)
class Imported:
    patients: int
    rejected: dict[int, str] = field(default_factory=dict)  # physical line of the row -> part of its reason
    check: Check | None = None


@dataclass(frozen=True)
class Refused:
    problem: str
    message: str  # part of the message


def names(*expected: tuple[str, str]) -> Check:
    def check(result: ReadResult) -> None:
        assert [(p.first_name, p.last_name) for p in result.patients] == list(expected)

    return check


def each(attribute: Callable[[Patient], object], *expected: object) -> Check:
    def check(result: ReadResult) -> None:
        assert [attribute(p) for p in result.patients] == list(expected)

    return check


def both(*checks: Check) -> Check:
    def check(result: ReadResult) -> None:
        for one in checks:
            one(result)

    return check


def phones(p: Patient) -> list[str]:
    return [phone.e164 for phone in p.phones]


SIAN_ZOE_TOM = names(("Siân", "Jones"), ("Zoë", "Ng"), ("Tom", "O'Neill"))
THREE_GOOD = Imported(
    3,
    check=both(
        SIAN_ZOE_TOM,
        each(phones, ["+447700900123"], ["+447700900124"], ["+441614960456"]),
        each(lambda p: p.last_eye_test_date, date(2024, 1, 15), date(2024, 2, 1), date(2023, 6, 30)),
        each(lambda p: p.risk_flags, ["diabetic"], [], ["glaucoma"]),
    ),
)
NOT_A_DATE = "is not a date (expected DD/MM/YYYY or YYYY-MM-DD)"
SAVE_AS = "File > Save As"

EXPECTED: dict[str, Imported | Refused] = {
    # --- encodings ---------------------------------------------------------------------------------
    "utf8_no_bom.csv": THREE_GOOD,
    "utf8_bom.csv": THREE_GOOD,
    "cp1252_excel.csv": Imported(3, check=names(("Siân", "Jones"), ("Zoë", "Ng"), ("Tom", "O\u2019Neill"))),
    "latin1.csv": Imported(
        4,
        check=both(
            names(("Siân", "Jones"), ("Zoë", "Ng"), ("Tom", "O'Neill"), ("Ségolène", "Müller")),
            each(lambda p: p.clinical_notes, "Type 2 diabetes - annual review", None, "IOP 22/23", "Née Dubois"),
        ),
    ),
    # a UTF-8 file with one line pasted in from a Windows-1252 source: every name still reads right
    "mixed_utf8_and_cp1252_lines.csv": THREE_GOOD,
    # Excel's "Unicode text": UTF-16 LE with BOM, tab-separated, CRLF
    "utf16le_bom_excel_unicode_text.txt": THREE_GOOD,
    "utf16le_no_bom.csv": THREE_GOOD,
    "utf16be_bom.csv": THREE_GOOD,
    # --- line ends ---------------------------------------------------------------------------------
    "crlf.csv": THREE_GOOD,
    "lone_cr_old_mac.csv": Imported(3, {5: "'31/02/2024' " + NOT_A_DATE}, SIAN_ZOE_TOM),
    "mixed_line_endings.csv": THREE_GOOD,
    # --- delimiters --------------------------------------------------------------------------------
    "semicolon_excel_european.csv": Imported(
        3,
        check=both(
            SIAN_ZOE_TOM,
            each(lambda p: p.clinical_notes, "Type 2, diet controlled, annual review", None, "IOP 22/23, on drops"),
        ),
    ),
    "tab_separated.txt": THREE_GOOD,
    "pipe_separated.csv": THREE_GOOD,
    "excel_sep_line.csv": THREE_GOOD,  # Excel's `sep=;` directive above the header
    # --- phones ------------------------------------------------------------------------------------
    "excel_mangled_phones.csv": Imported(
        3,
        {2: "'7.7009E+09' was mangled by a spreadsheet (scientific notation)", 5: "scientific notation"},
        each(phones, ["+447700900123"], ["+447700900124"], ["+447700900125"]),
    ),
    "multiple_phones_in_one_cell.csv": Imported(
        4,
        check=each(
            phones,
            ["+447700900123", "+441614960456"],
            ["+447700900124", "+447700900125"],
            ["+447700900128", "+441614960457"],  # mobile first, whatever order the cell had
            ["+447700900126", "+447700900127"],
        ),
    ),
    "international_numbers.csv": Imported(
        1,
        {2: "'+33 1 23 45 67 89' is not a UK number", 3: "is not a UK number", 4: "is not a UK number"},
        each(phones, ["+447700900130"]),
    ),
    "uk_drama_landlines.csv": Imported(
        4,
        check=both(
            each(phones, ["+441632960001"], ["+441632960002"], ["+441134960003"], ["+442079460004"]),
            each(lambda p: p.phones[0].type.value, "landline", "landline", "landline", "landline"),
        ),
    ),
    "two_phone_columns.csv": Imported(2, check=each(phones, ["+447700900100", "+441614960456"], ["+447700900101"])),
    # --- dates -------------------------------------------------------------------------------------
    "dates_day_first_and_iso.csv": Imported(
        7,
        {9: "'01/23/2024' " + NOT_A_DATE, 10: "'15/01/24' " + NOT_A_DATE},
        each(lambda p: p.last_eye_test_date, *(date(2024, 1, d) for d in (15, 16, 17, 18, 19, 20, 5))),
    ),
    "impossible_dates.csv": Imported(
        1,
        {2: "'31/02/2024' " + NOT_A_DATE, 3: "'29/02/2023'", 5: "'00/01/2024'", 6: "'2024-13-01'"},
        each(lambda p: p.last_eye_test_date, date(2024, 2, 29)),
    ),
    "future_dates.csv": Imported(
        1,
        {
            2: "last_eye_test_date 2030-01-01 is in the future",
            4: "last_eye_test_date 2026-11-26 is in the future",
            5: "last_clinical_test_date 2031-01-01 is in the future",
            6: "date_of_birth 2040-01-01 is in the future",
        },
        names(("B", "Today")),
    ),
    "missing_or_unreadable_eye_test_date.csv": Imported(
        1, {2: "last_eye_test_date is missing", 3: "'unknown' " + NOT_A_DATE, 4: "'N/A' " + NOT_A_DATE}
    ),
    # --- layout ------------------------------------------------------------------------------------
    "blank_lines.csv": Imported(3, {8: "phone number is missing"}, SIAN_ZOE_TOM),
    "quoted_newlines_in_notes.csv": Imported(
        3,
        {7: "phone number '12345' is not a valid UK number"},  # line numbers count the lines inside notes
        each(
            lambda p: p.clinical_notes,
            "Type 2 diabetes\nannual review\nsee GP letter",
            'Line one\r\nline two, with a comma and "quotes"',
            "IOP 22/23",
        ),
    ),
    "extra_columns.csv": THREE_GOOD,
    "reordered_columns.csv": Imported(
        3,
        check=both(
            SIAN_ZOE_TOM,
            each(lambda p: p.pms_patient_id, "P001", "P002", "P003"),
            each(lambda p: p.email, "sian@example.org", None, None),
        ),
    ),
    "required_columns_only.csv": Imported(1, check=names(("Ann", "Lee"))),
    "title_line_above_header.csv": Imported(3, {7: "phone number '999' is not a valid UK number"}, SIAN_ZOE_TOM),
    "missing_phone_column.csv": Refused("missing_columns", "missing the required column(s) phone_number (found:"),
    "missing_several_columns.csv": Refused(
        "missing_columns", "missing the required column(s) last_name, last_eye_test_date"
    ),
    "title_line_and_missing_column.csv": Refused(
        "missing_columns", "missing the required column(s) last_eye_test_date"
    ),
    "no_header_row.csv": Refused(
        "missing_columns", f"missing the required column(s) {', '.join(REQUIRED_COLUMNS)} (found: Siân, Jones"
    ),
    "duplicate_column.csv": Refused("duplicate_columns", "has the column(s) first_name more than once"),
    # --- empty, and not CSV at all ----------------------------------------------------------------
    "empty.csv": Refused("empty_file", "empty.csv is empty"),
    "whitespace_only.csv": Refused("empty_file", "is empty"),
    "bom_only.csv": Refused("empty_file", "is empty"),
    "header_only.csv": Refused("no_rows", "has a header but no patient rows"),
    "header_then_blank_rows.csv": Refused("no_rows", "has a header but no patient rows"),
    "xlsx_saved_as_csv.csv": Refused("not_csv", "is a binary file (an Excel workbook (.xlsx)"),
    "xls_renamed.csv": Refused("not_csv", "old-style Excel workbook (.xls)"),
    "png_renamed.csv": Refused("not_csv", "is a binary file (a PNG image), not a CSV"),
    "pdf_renamed.csv": Refused("not_csv", "a PDF document"),
    "html_export_to_excel.csv": Refused("not_csv", "is a web page or XML file, not a CSV"),
    "nul_bytes_in_rows.csv": Refused("not_csv", "is a binary file, not a CSV"),
    # --- rows --------------------------------------------------------------------------------------
    "duplicate_rows.csv": Imported(
        2,
        {3: "duplicate of duplicate_rows.csv:line 2", 4: "duplicate of duplicate_rows.csv:line 2"},
        each(phones, ["+447700900100"], ["+447700900101"]),
    ),
    "ragged_rows.csv": Imported(
        2,
        {
            2: "row has 8 cells but the header has 7 columns: a value probably contains an unquoted comma",
            4: "last_eye_test_date is missing",
            6: "row has 9 cells but the header has 7 columns",
        },
        names(("Bob", "Kay"), ("Dan", "Fox")),
    ),
    "stray_quotes.csv": Imported(
        2,
        {2: "row is not valid CSV (',' expected after '\"')"},
        each(lambda p: p.clinical_notes, 'Said "no" to drops', None),
    ),
    "unclosed_quote.csv": Refused("malformed_csv", 'line 3 opens a quoted value (") that is never closed'),
    "whitespace_padded.csv": Imported(
        2,
        check=both(
            names(("Siân", "Jones"), ("Zoë", "Ng")),
            each(phones, ["+447700900123"], ["+447700900124"]),
            each(lambda p: p.risk_flags, ["diabetic"], []),
            each(lambda p: p.clinical_notes, "annual review", None),
        ),
    ),
    "only_first_or_last_name.csv": Imported(
        2, {4: "name is missing", 5: "name is missing"}, names(("Cher", ""), ("", "Madonna"))
    ),
    "unknown_risk_categories.csv": Imported(
        4,
        check=both(
            each(lambda p: p.unknown_risk_values, ["high myopia"], ["AMD"], [], ["keratoconus"]),
            each(lambda p: p.risk_flags, [], ["diabetic"], ["glaucoma_suspect"], ["ocular_hypertension"]),
        ),
    ),
}


def practice(path: Path) -> Practice:
    return Practice("csv-corpus", "Corpus practice", PmsKind.CSV, {"path": str(path)}, "connected")


def read_drop(path: Path) -> ReadResult | CsvFileRefused:
    """What a practice dropping this file gets: a result, or the file refused (anything else fails the test)."""
    try:
        return CsvResource().open(practice(path), {}).read_patients(None, TODAY)
    except CsvFileRefused as exc:
        return exc


def read_bytes(path: Path) -> ReadResult | CsvFileRefused:
    try:
        return parse_csv(decode(path.read_bytes(), "csv-corpus", path.name), "csv-corpus", path.name, TODAY)
    except CsvFileRefused as exc:
        return exc


def outcome(result: ReadResult | CsvFileRefused) -> object:
    if isinstance(result, CsvFileRefused):
        return ("refused", result.problem, str(result))
    return ("imported", result.patients, [(r.row_ref, r.reason, r.raw) for r in result.rejected])


def test_every_corpus_file_states_its_expected_result() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.is_file()}
    assert files == set(EXPECTED)
    assert len(files) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_ends_in_one_clear_result(name: str) -> None:
    path = CORPUS / name
    expected = EXPECTED[name]
    result = read_drop(path)
    assert outcome(read_bytes(path)) == outcome(result), "streamed and in-memory reads disagree"

    if isinstance(expected, Refused):
        assert isinstance(result, CsvFileRefused), f"expected {expected.problem}, got an import"
        assert result.problem == expected.problem
        assert expected.message in str(result)
        assert "Check:" in str(result)  # every refusal says what to fix
        return

    assert isinstance(result, ReadResult), f"expected an import, got {result}"
    assert result.rows_read == len(result.patients) + len(result.rejected)
    assert len(result.patients) == expected.patients
    reasons = {int(r.row_ref.rsplit(" ", 1)[1]): r for r in result.rejected}
    assert sorted(reasons) == sorted(expected.rejected)
    for line, part in expected.rejected.items():
        row = reasons[line]
        assert row.row_ref == f"{name}:line {line}"
        assert part in row.reason
        assert row.raw  # the row's own values are kept with it
    assert [int(r.row_ref.rsplit(" ", 1)[1]) for r in result.rejected] == sorted(reasons)  # in file order
    if expected.check:
        expected.check(result)


def test_nul_bytes_deep_in_the_text_refuse_the_file() -> None:
    header = ",".join(csv_source.SEED_COLUMNS)
    text = header + "\n" + "Ann,Lee,07700 900100,01/01/2024,,,\n" * 3 + "Bob,K\x00y,07700 900101,01/01/2024,,,\n"
    with pytest.raises(CsvFileRefused, match="line 5 contains NUL bytes") as info:
        parse_csv(text, "p", "f.csv", TODAY)
    assert info.value.problem == "not_csv"


def test_damaged_utf16_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "damaged.txt"
    path.write_bytes("\ufeff".encode("utf-16-le") + "first_name\tlast_name\n".encode("utf-16-le") + b"\x00\xd8a\x00")
    result = read_drop(path)
    assert isinstance(result, CsvFileRefused) and result.problem == "bad_encoding"
    assert outcome(read_bytes(path)) == outcome(result)


def test_the_limits_refuse_the_file_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "three.csv"
    path.write_bytes((CORPUS / "utf8_no_bom.csv").read_bytes())
    monkeypatch.setattr(csv_source, "MAX_ROWS", 2)
    for result in (read_drop(path), read_bytes(path)):
        assert isinstance(result, CsvFileRefused) and result.problem == "too_many_rows"
        assert "more than 2 patient rows" in str(result)
    monkeypatch.setattr(csv_source, "MAX_FILE_BYTES", 100)
    result = read_drop(path)
    assert isinstance(result, CsvFileRefused) and result.problem == "file_too_large"


# --- 100 MB ------------------------------------------------------------------------------------------

HUNDRED_MB = 100 * 1024 * 1024
SEED_HEADER = ",".join((*csv_source.SEED_COLUMNS, "date_of_birth", "email", "address", "pms_patient_id"))
EXTRA_PMS_COLUMNS = [f"pms_field_{i:02d}" for i in range(20)]


def write_file(path: Path, header: str, row: Callable[[int], str], target_bytes: int) -> int:
    """Valid, distinct patient rows until the file reaches `target_bytes`; returns the number of rows."""
    count, size = 0, 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(header + "\r\n")
        while size < target_bytes:
            chunk = "".join(row(i) for i in range(count, count + 5000))
            out.write(chunk)
            size += len(chunk)
            count += 5000
    return count


def seed_row(i: int) -> str:
    return (
        f"Patient{i},Surname{i % 997},07700 900{i % 1000:03d},{1 + i % 28:02d}/{1 + i % 12:02d}/2024,"
        f'{"diabetic" if i % 5 == 0 else "standard"},15/01/2024,"Annual review; IOP 16/17, discs healthy",'
        f'{1 + i % 28:02d}/06/1960,patient{i}@example.org,"{i} High Street, Anytown, AB1 2CD",P{i:08d}\r\n'
    )


def wide_row(i: int) -> str:
    extra = ",".join(f"value {k} for patient {i} from the PMS export" for k in range(len(EXTRA_PMS_COLUMNS)))
    return seed_row(i).removesuffix("\r\n") + "," + extra + "\r\n"


def test_100mb_seed_file_is_refused_quickly_without_reading_it_into_memory(tmp_path: Path) -> None:
    """~540,000 patient rows: far more than a practice has. Counted (not normalised) and refused in seconds."""
    path = tmp_path / "patients-100mb.csv"
    rows = write_file(path, SEED_HEADER, seed_row, HUNDRED_MB)
    assert path.stat().st_size >= HUNDRED_MB and rows > MAX_ROWS
    started = time.perf_counter()
    result = read_drop(path)
    elapsed = time.perf_counter() - started
    print(f"100 MB seed file ({rows:,} rows): refused in {elapsed:.2f} s")
    assert isinstance(result, CsvFileRefused) and result.problem == "too_many_rows"
    assert f"more than {MAX_ROWS:,} patient rows" in str(result)


MEASURE = """
import json, resource, sys, time
from datetime import date
from pathlib import Path
from resources.csv_source import read_csv_file
started = time.perf_counter()
result = read_csv_file(Path(sys.argv[1]), "big", date(2026, 11, 25))
print(json.dumps({
    "seconds": time.perf_counter() - started,
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "patients": len(result.patients),
    "rejected": [r.reason for r in result.rejected[:5]],
}))
"""


def test_100mb_wide_pms_export_imports_streamed_in_bounded_memory(tmp_path: Path) -> None:
    """~100 MB of a PMS export with 20 extra columns (~100,000 patients): every row imported, the text
    never held whole. Run in its own process so its peak memory is its own."""
    path = tmp_path / "pms-export-100mb.csv"
    rows = write_file(path, SEED_HEADER + "," + ",".join(EXTRA_PMS_COLUMNS), wide_row, HUNDRED_MB)
    assert path.stat().st_size >= HUNDRED_MB and rows <= MAX_ROWS
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"100 MB wide export ({rows:,} rows): {measured['patients']:,} imported in {measured['seconds']:.1f} s, "
        f"peak RSS {measured['max_rss_mb']:.0f} MB"
    )
    assert measured["patients"] == rows and measured["rejected"] == []
    assert measured["max_rss_mb"] < 1024


def test_a_file_without_line_breaks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one-line.csv"
    path.write_bytes(b"first_name,last_name," + b"x" * (9 * 1024 * 1024))
    for result in (read_drop(path), read_bytes(path)):
        assert isinstance(result, CsvFileRefused) and result.problem == "malformed_csv"
        assert "has a line longer than 8 MB" in str(result)


def test_a_long_line_without_a_header_is_refused_naming_the_columns() -> None:
    with pytest.raises(CsvFileRefused, match="missing the required column") as info:
        parse_csv('"' + "x" * 200_000 + "\n", "p", "f.csv", TODAY)
    assert info.value.problem == "missing_columns"


def test_an_unclosed_quote_in_a_big_file_is_refused_at_the_field_limit() -> None:
    header = ",".join(csv_source.SEED_COLUMNS)
    rows = "Ann,Lee,07700 900100,01/01/2024,,,\n" + 'Bob,Kay,07700 900101,01/01/2024,,,"oops\n'
    text = header + "\n" + rows + "Cat,Roe,07700 900102,01/01/2024,,,\n" * 5000
    with pytest.raises(CsvFileRefused, match=r"line 3 has a value over 128 KB long") as info:
        parse_csv(text, "p", "f.csv", TODAY)
    assert info.value.problem == "malformed_csv"


def test_a_file_that_vanishes_before_it_is_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CsvFileRefused, match="gone.csv could not be read") as info:
        csv_source.read_csv_file(tmp_path / "gone.csv", "p", TODAY)
    assert info.value.problem == "file_unreadable"
