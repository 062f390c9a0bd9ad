"""The generic CSV upload: a file, or a folder the practice drops its exports into (newest file wins).

Format: `first_name,last_name,phone_number,last_eye_test_date,risk_category,last_clinical_test_date,
clinical_condition_notes` plus optional `date_of_birth,email,address,pms_patient_id,deceased,
do_not_call,guardian_name` (`deceased`: yes/no or the date of death; `do_not_call`: yes/no; y/n,
true/false and 1/0 work too, blank is no). Headers match
case-insensitively, ignoring spaces, underscores and a BOM. A file is either read through (each row
imported or rejected with its reason) or refused whole with a message; never half-imported. A sync
reads it a page of `PAGE_ROWS` rows at a time, in one transaction, so it never holds the file.

What a practice's export can look like, and what happens to it:

* encoding: UTF-8 with or without BOM, Windows-1252 / Latin-1 (decided line by line, so a UTF-8 file
  with one pasted Windows line still reads right), UTF-16 or UTF-32 (Excel's "Unicode text", with
  or without BOM); a workbook, image, PDF, web page or other binary file is refused as `not_csv`;
* line ends: CRLF, LF or a lone CR (old Mac exports), mixed in one file; quoted values may span lines;
* delimiter: comma, semicolon, tab or `|`, taken from the header row; a title line (or Excel's
  `sep=;` line) above the header is skipped when the header is within the first 20 lines;
* rows: blank rows are skipped; a row with more filled cells than the header has columns, or broken
  quoting, is rejected with its reason; a row with fewer cells reads the missing ones as blank;
* size: files are streamed; over `MAX_FILE_BYTES` or `MAX_ROWS` rows the file is refused up front.
"""

from __future__ import annotations

import codecs
import csv
import heapq
import io
import re
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from datetime import date, datetime
from pathlib import Path
from typing import Any, BinaryIO

from dagster import ConfigurableResource

from nvc_pipelines.model import (
    Appointment,
    BookingRequest,
    BookingResult,
    ClinicalRecord,
    NoteResult,
    PatientNote,
    PmsKind,
    Practice,
    ReadResult,
    RecordBatch,
    RejectedRow,
)
from nvc_pipelines.normalise import PatientDraft, collect_pages
from resources.protocol import ConnectionInfo, PmsConnectionFailed, PmsError

SEED_COLUMNS = (
    "first_name",
    "last_name",
    "phone_number",
    "last_eye_test_date",
    "risk_category",
    "last_clinical_test_date",
    "clinical_condition_notes",
)
OPTIONAL_COLUMNS = (
    "date_of_birth",
    "email",
    "address",
    "pms_patient_id",
    "deceased",
    "do_not_call",
    "guardian_name",
)
REQUIRED_COLUMNS = ("first_name", "last_name", "phone_number", "last_eye_test_date")
TEMPLATE_COLUMNS = (*SEED_COLUMNS, *OPTIONAL_COLUMNS)
# Every column the importer reads, and example rows: an adult, and a parent and child on one landline
# (one call covers both; the caller asks for the parent).
TEMPLATE_ROWS = (
    ("Siân", "Jones", "07700 900123", "15/01/2024", "diabetic", "15/01/2024", "Type 2 diabetes - annual review",
     "12/03/1961", "sian.jones@example.com", "4 Mill Lane, Leeds, LS6 2AB", "", "no", "no", ""),
    ("Tom", "O'Neill", "+44 161 496 0456", "2023-06-30", "standard", "", "",
     "1978-09-02", "", "", "", "", "no", ""),
    ("Alfie", "O'Neill", "0161 496 0456", "2024-09-12", "standard", "", "",
     "2017-05-20", "", "", "", "", "", "Tom O'Neill"),
)  # fmt: skip
MAX_FILE_BYTES = 512 * 1024 * 1024
# Far more than one practice's patient list. Normalising a row costs ~60 us and ~1.2 KB (200,000 rows
# read in ~12 s and ~300 MB on a 2-core box), so this bounds a read; a bigger file is refused up front
# after a quick count, which is almost always a group-wide export rather than one practice's list.
MAX_ROWS = 200_000
# Rows normalised and handed to the writer at a time: a sync holds one page of a file, not the file.
PAGE_ROWS = 5000
HEADER_SEARCH_LINES = 20  # non-blank lines searched for the header row (title lines above it are skipped)
_CHUNK_BYTES = 1024 * 1024
_MAX_LINE_BYTES = 8 * 1024 * 1024
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "|"}
_SAVE_AS_CSV = (
    "open it in Excel and use File > Save As > 'CSV UTF-8 (Comma delimited)', or export the patient list as CSV"
)


class CsvFileRefused(PmsError):
    """The whole file was refused (nothing imported); the message says what to fix."""

    def __init__(self, practice_id: str, problem: str, message: str, check: str = ""):
        super().__init__("CSV import", practice_id, problem, message, check)


def header_key(name: str) -> str:
    """`First Name`, `first_name`, `FIRSTNAME` and `\ufefffirst_name` are the same column."""
    return re.sub(r"[\s_\-]+", "", name.replace("\ufeff", "")).casefold()


_KNOWN = {header_key(c): c for c in (*SEED_COLUMNS, *OPTIONAL_COLUMNS)}


def template_text() -> str:
    """The CSV template: every column the importer reads, with example rows (`nvc csv-template`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(TEMPLATE_COLUMNS)
    writer.writerows(TEMPLATE_ROWS)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------
# Bytes to lines of text


_MAGIC = (
    (b"PK\x03\x04", "an Excel workbook (.xlsx) or another zip file"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old-style Excel workbook (.xls)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"Rar!", "a RAR archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts the same way
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_WEB_PAGE = ("<!doctype", "<html", "<?xml", "<table", "<head", "<body")


def _refuse_not_csv(practice_id: str, name: str, what: str) -> CsvFileRefused:
    return CsvFileRefused(practice_id, "not_csv", f"{name} is a binary file ({what}), not a CSV", _SAVE_AS_CSV)


def sniff_encoding(head: bytes, practice_id: str, name: str) -> str:
    """The codec to read a file with, from its first bytes: "8bit" (UTF-8, else Windows-1252/Latin-1,
    line by line) or a UTF-16/32 codec. Refuses workbooks, images, archives and other binary files."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise _refuse_not_csv(practice_id, name, what)
    sample = head[:4096]
    if len(sample) >= 4 and b"\x00" in sample:
        pairs = len(sample) // 2
        even_nul = sample[0 : pairs * 2 : 2].count(0) / pairs
        odd_nul = sample[1 : pairs * 2 : 2].count(0) / pairs
        if odd_nul > 0.3 and even_nul < 0.02:  # ASCII text as UTF-16 without a BOM, Excel on Windows
            return "utf-16-le"
        if even_nul > 0.3 and odd_nul < 0.02:
            return "utf-16-be"
    if b"\x00" in head:
        raise CsvFileRefused(
            practice_id, "not_csv", f"{name} is a binary file, not a CSV", "export the patient list as CSV"
        )
    return "8bit"


def _decode_line(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return line.decode("cp1252")
    except UnicodeDecodeError:
        return line.decode("latin-1")


def decode(data: bytes, practice_id: str, name: str) -> str:
    """A whole file's bytes as text: UTF-8 (with or without BOM); UTF-16/32 as Excel's "Unicode text"
    saves it; otherwise Windows-1252 (Latin-1 for bytes it leaves undefined), line by line."""
    codec = sniff_encoding(data[:65536], practice_id, name)
    if codec != "8bit":
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            raise _bad_encoding(practice_id, name, codec) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    return "".join(_decode_line(line) for line in data.removeprefix(codecs.BOM_UTF8).splitlines(keepends=True))


def _bad_encoding(practice_id: str, name: str, codec: str) -> CsvFileRefused:
    label = "UTF-32" if "32" in codec else "UTF-16"
    return CsvFileRefused(
        practice_id,
        "bad_encoding",
        f"{name} looks like {label} text (Excel's 'Unicode text') but is damaged: it cannot be decoded",
        _SAVE_AS_CSV,
    )


def _line_too_long(practice_id: str, name: str) -> CsvFileRefused:
    return CsvFileRefused(
        practice_id,
        "malformed_csv",
        f"{name} has a line longer than {_MAX_LINE_BYTES // (1024 * 1024)} MB: it is not a patient list",
        "export the patient list as CSV",
    )


def _byte_lines(stream: BinaryIO, practice_id: str, name: str) -> Iterator[bytes]:
    """Physical lines (ending CRLF, LF or a lone CR, ends kept) read in chunks: memory stays flat."""
    pending = b""
    while chunk := stream.read(_CHUNK_BYTES):
        lines = (pending + chunk).splitlines(keepends=True)
        pending = b"" if lines[-1].endswith(b"\n") else lines.pop()  # incomplete, or a CR whose LF may follow
        yield from lines
        if len(pending) > _MAX_LINE_BYTES:
            raise _line_too_long(practice_id, name)
    if pending:
        yield pending


def _file_lines(path: Path, codec: str, practice_id: str, name: str) -> Generator[str]:
    if codec == "8bit":
        with path.open("rb") as stream:
            first = True
            for line in _byte_lines(stream, practice_id, name):
                if first:
                    line, first = line.removeprefix(codecs.BOM_UTF8), False
                yield _decode_line(line)
    else:
        with path.open("r", encoding=codec, newline="") as text:
            yield from text


_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+\Z")


def _str_lines(text: str) -> Generator[str]:
    """Physical lines of a string (ends kept) without copying it."""
    for match in _LINE.finditer(text):
        yield match.group()


def sniff_delimiter(text: str) -> str:
    """The delimiter csv.Sniffer guesses from the first lines (`,` when it cannot tell)."""
    sample = "\n".join(text[:65536].splitlines()[:20])
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(_DELIMITERS)).delimiter
    except csv.Error:
        return ","


# ---------------------------------------------------------------------------------------------------
# Lines to records


class _Lines:
    """The physical lines handed to the csv reader: numbered, checked, and kept for the current record."""

    __slots__ = ("_source", "_ahead", "_practice_id", "_name", "number", "current")

    def __init__(self, source: Iterator[str], practice_id: str, name: str):
        self._source = source
        self._ahead: deque[str] = deque()
        self._practice_id = practice_id
        self._name = name
        self.number = 0  # physical line number of the last line handed out
        self.current: list[str] = []  # the lines of the record being read

    def _read(self, number: int) -> str:
        try:
            line = next(self._source)
        except UnicodeDecodeError as exc:
            raise _bad_encoding(self._practice_id, self._name, exc.encoding) from None
        if "\x00" in line:
            raise CsvFileRefused(
                self._practice_id,
                "not_csv",
                f"{self._name} line {number} contains NUL bytes: the file is damaged or not a text export",
                "export the patient list as CSV again",
            )
        if len(line) > _MAX_LINE_BYTES:
            raise _line_too_long(self._practice_id, self._name)
        return line

    def peek(self, nonblank: int) -> list[str]:
        """Read ahead until `nonblank` non-blank lines (or the end); they are still handed out later."""
        count = 0
        while count < nonblank:
            try:
                line = self._read(self.number + len(self._ahead) + 1)
            except StopIteration:
                break
            self._ahead.append(line)
            count += bool(line.strip())
        return list(self._ahead)

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._ahead.popleft() if self._ahead else self._read(self.number + 1)
        self.number += 1
        self.current.append(line)
        return line


class _Layout:
    """Where the header is, the delimiter, and which cell holds which column."""

    def __init__(self, practice_id: str, name: str, line: int, delimiter: str, header: list[str]):
        self.line = line
        self.delimiter = delimiter
        self.width = len(header)
        self.raw_keys = [h or f"column_{i + 1}" for i, h in enumerate(header)]
        positions: dict[str, list[int]] = {}
        for i, cell in enumerate(header):
            column = _KNOWN.get(header_key(cell))
            if column:
                positions.setdefault(column, []).append(i)
        repeated = [c for c, found in positions.items() if len(found) > 1 and c != "phone_number"]
        if repeated:
            raise CsvFileRefused(
                practice_id,
                "duplicate_columns",
                f"{name} has the column(s) {', '.join(repeated)} more than once (header on line {line}), "
                "so which cell holds the patient's value is ambiguous",
                "keep one column of each; several phone_number columns are fine (every number is read)",
            )
        self.phones = positions.pop("phone_number", [])
        self.singles = [(c, found[0]) for c, found in positions.items()]


def _summary(cells: list[str]) -> str:
    shown = [c if len(c) <= 40 else c[:37] + "..." for c in cells[:12]]
    return ", ".join(shown) + (", ..." if len(cells) > 12 else "")


def _find_layout(lines: _Lines, practice_id: str, name: str) -> _Layout:
    """The header row: the first of the first non-blank lines naming every required column, read with
    the delimiter that finds most known columns in it. Lines above it (a report title, `sep=;`) are
    skipped; if no line qualifies the file is refused naming the missing columns."""
    head = lines.peek(HEADER_SEARCH_LINES)
    best: tuple[tuple[bool, int], int, str, list[str], set[str]] | None = None
    first: tuple[int, str] | None = None
    for index, line in enumerate(head):
        text = line.rstrip("\r\n").lstrip("\ufeff")
        if not text.strip():
            continue
        if first is None:
            first = (index, text)
            if text.lstrip().lower().startswith(_WEB_PAGE):
                raise CsvFileRefused(
                    practice_id,
                    "not_csv",
                    f"{name} is a web page or XML file, not a CSV (some systems' 'Export to Excel' writes one)",
                    _SAVE_AS_CSV,
                )
        for delimiter in _DELIMITERS:
            try:
                cells = next(csv.reader([text], delimiter=delimiter))
            except (csv.Error, StopIteration):
                continue
            found = {_KNOWN[k] for k in map(header_key, cells) if k in _KNOWN}
            score = (all(c in found for c in REQUIRED_COLUMNS), len(found))
            if best is None or score > best[0]:
                best = (score, index, delimiter, cells, found)
        if best is not None and best[0][0]:
            break
    if first is None:
        raise CsvFileRefused(practice_id, "empty_file", f"{name} is empty", "export the patient list again")
    if best is None or not best[0][0]:
        if best is not None and best[0][1] > 0:
            _, index, _, cells, found = best
            where = f"; header read from line {index + 1}" if index else ""
        else:
            index, text = first
            try:
                cells = next(csv.reader([text], delimiter=sniff_delimiter(text)), [])
            except csv.Error:
                cells = [text]
            found = set()
            where = f"; no header row in the first {HEADER_SEARCH_LINES} lines"
        missing = [c for c in REQUIRED_COLUMNS if c not in found]
        raise CsvFileRefused(
            practice_id,
            "missing_columns",
            f"{name} is missing the required column(s) {', '.join(missing)} (found: {_summary(cells)}){where}",
            f"the header row must include {', '.join(REQUIRED_COLUMNS)}; `nvc csv-template` writes an example",
        )
    _, index, delimiter, cells, _ = best
    for _ in range(index + 1):  # title lines and the header itself
        next(lines)
    return _Layout(practice_id, name, index + 1, delimiter, cells)


_Record = tuple[int, list[str] | None, str, str]  # (first line, cells or None, why it is broken, its text)


def _records(lines: _Lines, layout: _Layout, practice_id: str, name: str) -> Iterator[_Record]:
    """Every non-blank record after the header. Broken quoting in one record is that record's problem;
    a quote that never closes swallows the rest of the file, so that refuses the file."""
    reader = csv.reader(lines, delimiter=layout.delimiter, strict=True)
    while True:
        start = lines.number + 1
        lines.current.clear()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                problem = 'opens a quoted value (") that is never closed'
            elif "field limit" in str(exc):
                problem = f'has a value over {csv.field_size_limit() // 1024} KB long, usually a quote (") never closed'
            else:
                problem = ""
            if problem:
                raise CsvFileRefused(
                    practice_id,
                    "malformed_csv",
                    f"{name} line {start} {problem}, so the rest of the file cannot be read reliably",
                    "close or remove that quote mark (or shorten the value) and export again",
                ) from None
            text = "".join(lines.current).rstrip("\r\n")
            yield start, None, f'row is not valid CSV ({exc}): check the quote marks (") on this row', text
            continue
        if any(cell.strip() for cell in cells):
            yield start, cells, "", ""


def _too_many_rows(practice_id: str, name: str) -> CsvFileRefused:
    return CsvFileRefused(
        practice_id,
        "too_many_rows",
        f"{name} has more than {MAX_ROWS:,} patient rows; one practice's patient list is far smaller",
        "that the file is this practice's own patient list (not a group-wide export); if so, export only current "
        "patients",
    )


def _parse(
    open_lines: Callable[[], Generator[str]],
    practice_id: str,
    name: str,
    today: date,
    line_bound: int,
    page_rows: int | None = None,
) -> Iterator[ReadResult]:
    """The file's patients and rejected rows, `page_rows` rows a page (None: one page), in file order.
    A refusal (too many rows, a quote never closed, no rows at all) can come on any page: the caller
    writes a read in one transaction, so a refused file is never half-imported."""
    if line_bound > MAX_ROWS:  # maybe too big: count the records first (no normalising, a second or two)
        with closing(open_lines()) as source:
            lines = _Lines(source, practice_id, name)
            for count, _ in enumerate(_records(lines, _find_layout(lines, practice_id, name), practice_id, name), 1):
                if count > MAX_ROWS:
                    raise _too_many_rows(practice_id, name)

    structural: list[RejectedRow] = []  # the rows broken as CSV since the last page, in file order

    def rows(lines: _Lines, layout: _Layout) -> Iterator[tuple[str, dict[str, Any], PatientDraft]]:
        unquoted = _DELIMITERS[layout.delimiter]
        for count, (start, cells, problem, text) in enumerate(_records(lines, layout, practice_id, name), 1):
            if count > MAX_ROWS:
                raise _too_many_rows(practice_id, name)
            ref = f"{name}:line {start}"
            if cells is None:
                structural.append(RejectedRow(ref, problem, {"_line": text}))
                continue
            raw: dict[str, Any] = dict(zip(layout.raw_keys, cells, strict=False))
            size = len(cells)
            if size > layout.width and any(cell.strip() for cell in cells[layout.width :]):
                raw["_extra_cells"] = cells[layout.width :]
                structural.append(
                    RejectedRow(
                        ref,
                        f"row has {size} cells but the header has {layout.width} columns: a value probably "
                        f"contains an unquoted {unquoted}; put that value in quotes",
                        raw,
                    )
                )
                continue
            value = {column: cells[i] for column, i in layout.singles if i < size}
            yield (
                ref,
                raw,
                PatientDraft(
                    pms_patient_id=value.get("pms_patient_id"),
                    first_name=value.get("first_name"),
                    last_name=value.get("last_name"),
                    phones=[cells[i] for i in layout.phones if i < size],
                    date_of_birth=value.get("date_of_birth"),
                    email=value.get("email"),
                    address=value.get("address"),
                    last_eye_test_date=value.get("last_eye_test_date"),
                    last_clinical_test_date=value.get("last_clinical_test_date"),
                    risk_category=value.get("risk_category"),
                    clinical_notes=value.get("clinical_condition_notes"),
                    deceased=value.get("deceased"),
                    do_not_call=value.get("do_not_call"),
                    guardian_name=value.get("guardian_name"),
                ),
            )

    read = 0
    with closing(open_lines()) as source:
        lines = _Lines(source, practice_id, name)
        layout = _find_layout(lines, practice_id, name)
        pages = collect_pages(
            practice_id, rows(lines, layout), today, strict=True, source_ref=name, page_rows=page_rows
        )
        for page in pages:
            if structural:  # the broken rows read up to this page's last row belong to it
                page.rejected = list(heapq.merge(page.rejected, structural, key=_line_of))
                structural.clear()
            read += page.rows_read
            if page.rows_read:
                yield page
        if structural:  # broken rows after the last good one
            read += len(structural)
            yield ReadResult(rejected=list(structural), source_ref=name)
    if read == 0:
        raise CsvFileRefused(
            practice_id, "no_rows", f"{name} has a header but no patient rows", "check the export included patients"
        )


def _whole(pages: Iterator[ReadResult]) -> ReadResult:
    """A read's pages as one `ReadResult`."""
    result = ReadResult()
    for page in pages:
        result.source_ref = page.source_ref
        result.patients += page.patients
        result.rejected += page.rejected
        result.origins.update(page.origins)
    return result


def _line_of(row: RejectedRow) -> int:
    return int(row.row_ref.rsplit(" ", 1)[1])


def parse_csv(text: str, practice_id: str, name: str, today: date) -> ReadResult:
    """Read one CSV file's text into patients and rejected rows (or refuse it whole)."""
    bound = text.count("\n") + text.count("\r") - text.count("\r\n")  # at least the number of lines
    return _whole(_parse(lambda: _str_lines(text), practice_id, name, today, bound))


def _count_line_ends(path: Path) -> int:
    """At least the number of lines (a CRLF split across two chunks counts twice): a cheap bound."""
    total = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            total += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
    return total


def read_csv_file(path: Path, practice_id: str, today: date) -> ReadResult:
    """Read one CSV file from disk, streamed (its text is never held whole), or refuse it whole."""
    return _whole(csv_file_pages(path, practice_id, today))


def csv_file_pages(path: Path, practice_id: str, today: date, page_rows: int | None = None) -> Iterator[ReadResult]:
    """One CSV file from disk, `page_rows` rows a page (None: one page), streamed: neither its text
    nor its patients are ever held whole. A refusal can come on any page (see `_parse`)."""
    try:
        yield from _read_file(path, practice_id, today, page_rows)
    except OSError as exc:  # gone, locked by another program, a network share dropping out
        raise CsvFileRefused(
            practice_id,
            "file_unreadable",
            f"{path.name} could not be read ({exc.strerror or exc})",
            "that the file still exists and is not open in another program, then sync again",
        ) from None


def _read_file(path: Path, practice_id: str, today: date, page_rows: int | None) -> Iterator[ReadResult]:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CsvFileRefused(
            practice_id,
            "file_too_large",
            f"{path.name} is {size // (1024 * 1024)} MB; the limit is {MAX_FILE_BYTES // (1024 * 1024)} MB",
            "export only the practice's current patients (only the newest file in the folder is read, "
            "so splitting the export does not help)",
        )
    with path.open("rb") as stream:
        head = stream.read(65536)
    codec = sniff_encoding(head, practice_id, path.name)
    bound = size if size <= MAX_ROWS else _count_line_ends(path)
    return _parse(
        lambda: _file_lines(path, codec, practice_id, path.name), practice_id, path.name, today, bound, page_rows
    )


class CsvClient:
    """One practice's CSV drop."""

    kind = PmsKind.CSV
    # A file is one snapshot: a patient on two rows is a duplicate (the first row stands), never a
    # record edited while the read paged through (`protocol.pages_are_snapshot`).
    snapshot_pages = True
    # Read in the writer's thread: parsing a local file waits on nothing, so a thread reading ahead
    # would only contend with the writer for the interpreter lock, and hold more pages.
    pages_ahead = 0

    def __init__(self, practice: Practice):
        self.practice = practice
        self.path = Path(practice.settings.get("path", "")).expanduser()

    def _fail(self, problem: str, message: str, check: str) -> PmsConnectionFailed:
        return PmsConnectionFailed("CSV import", self.practice.practice_id, problem, message, check)

    def newest_file(self) -> Path | None:
        if not str(self.path) or not self.path.exists():
            raise self._fail(
                "path_not_found",
                f"the path {str(self.path)!r} does not exist",
                "the `path` setting: a CSV file, or the folder the practice's exports are dropped into",
            )
        if self.path.is_file():
            return self.path
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".txt")]
        return max(files, key=lambda p: (p.stat().st_mtime, p.name)) if files else None

    def test_connection(self) -> ConnectionInfo:
        newest = self.newest_file()
        if newest is None:
            return ConnectionInfo("CSV import", detail=f"folder {self.path} is empty: waiting for the first export")
        for _page in csv_file_pages(newest, self.practice.practice_id, date.today(), PAGE_ROWS):
            pass  # read through (a refused file raises), a page at a time
        return ConnectionInfo("CSV import", detail=f"newest file {newest.name}")

    def read_patients(self, since: datetime | None, today: date) -> ReadResult:
        """The newest file, whole: a CSV export is always a full list, so `since` does not apply."""
        return _whole(self.iter_patients(since, today))

    def iter_patients(self, since: datetime | None, today: date) -> Iterator[ReadResult]:
        """The newest file, `PAGE_ROWS` rows a page (a sync writes them as they come)."""
        newest = self.newest_file()
        if newest is None:
            raise CsvFileRefused(
                self.practice.practice_id, "no_file", f"no CSV file in {self.path}", "drop the export into the folder"
            )
        yield from csv_file_pages(newest, self.practice.practice_id, today, PAGE_ROWS)

    def read_appointments(self, since: datetime | None) -> RecordBatch[Appointment]:
        """A CSV export carries no diary: always empty."""
        return RecordBatch(source_ref="csv has no appointments")

    def read_clinical_records(self, since: datetime | None) -> RecordBatch[ClinicalRecord]:
        """Clinical notes and the last clinical test date ride on each patient row (see `read_patients`)."""
        return RecordBatch(source_ref="csv clinical data is on patient rows")

    def _no_writeback(self) -> PmsError:
        return PmsError(
            "CSV import",
            self.practice.practice_id,
            "writeback_unsupported",
            "this practice sends a CSV export and has no PMS connection to write bookings or notes into.",
            "connect the practice's PMS to write back; meanwhile the practice enters bookings by hand",
        )

    def create_appointment(self, booking: BookingRequest) -> BookingResult:
        raise self._no_writeback()

    def add_note(self, note: PatientNote) -> NoteResult:
        raise self._no_writeback()

    def close(self) -> None:
        return None


class CsvResource(ConfigurableResource):
    """Reads practices' CSV exports from the path in each practice's settings."""

    def required_settings(self) -> tuple[str, ...]:
        return ("path",)

    def optional_settings(self) -> tuple[str, ...]:
        return ()

    def required_secrets(self) -> tuple[str, ...]:
        return ()

    def open(self, practice: Practice, credentials: dict[str, str]) -> CsvClient:
        return CsvClient(practice)
