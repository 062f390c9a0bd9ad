"""Operator commands over the store: call list, rejected rows, duplicates, merge, groups, export."""

from __future__ import annotations

import json
from datetime import date

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from nvc_pipelines.application.cli import main
from nvc_pipelines.model import Patient, Phone, PhoneType, PmsKind, ReadResult, RejectedRow
from nvc_pipelines.recall import RecallRules, compute_recall
from nvc_pipelines.store import Store

MOBILE = Phone("+447700900321", PhoneType.MOBILE)


def _seed(store: Store, practice_id: str) -> None:
    store.add_practice(practice_id, practice_id, PmsKind.CSV, {}, {})
    people = [
        Patient(practice_id, "A1", "Ann", "Lee", [MOBILE], last_eye_test_date=date(2022, 1, 1)),
        Patient(practice_id, "A2", "Ann", "Lee", [MOBILE], last_eye_test_date=date(2021, 6, 1)),
        Patient(practice_id, "B1", "Bob", "Kay", [], last_eye_test_date=date(2020, 1, 1)),
    ]
    bad = [RejectedRow("f.csv:line 9", "phone number is missing", {"first_name": "Cat"})]
    store.write_patients(practice_id, "csv", ReadResult(people, bad), None, full=True)
    rules = RecallRules.from_settings({})
    store.write_recalls(practice_id, [compute_recall(p, rules) for p in store.load_patients(practice_id)])
    store.rebuild_call_list(practice_id, date(2026, 11, 25))


def test_call_list_rejected_duplicates_and_merge(store: Store) -> None:
    _seed(store, "ops-1")
    runner = CliRunner()
    calls = runner.invoke(main, ["call-list", "ops-1"])
    # A1 and A2 share one mobile: one call names both; B1 has no phone and is listed apart, with the reason.
    assert "1 number(s) to call for 2 due patient(s); 1 due patient(s) not listed" in calls.output
    assert "PHONE" in calls.output and "Ann Lee (A1)" in calls.output and "Ann Lee (A2)" in calls.output
    assert "Bob Kay (B1)" in calls.output and "no_callable_number" in calls.output

    rejected = runner.invoke(main, ["rejected", "ops-1"])
    assert "f.csv:line 9" in rejected.output and "phone number is missing" in rejected.output

    dupes = runner.invoke(main, ["duplicates", "ops-1"])
    assert "1 possible duplicate(s)" in dupes.output and "nvc merge ops-1 A1 A2" in dupes.output

    merged = runner.invoke(main, ["merge", "ops-1", "A1", "A2"])
    assert merged.exit_code == 0, merged.output
    assert "0 possible duplicate(s)" in runner.invoke(main, ["duplicates", "ops-1"]).output
    undo = runner.invoke(main, ["unmerge", "ops-1", "1"])
    assert undo.exit_code == 0, undo.output
    again = runner.invoke(main, ["unmerge", "ops-1", "1"])
    assert again.exit_code == 1 and "already undone" in again.output


def test_groups_list_and_export_together(store: Store) -> None:
    _seed(store, "loc-north")
    _seed(store, "loc-south")
    _seed(store, "elsewhere")
    runner = CliRunner()
    assert runner.invoke(main, ["group", "create", "brightsight", "--name", "Brightsight Group"]).exit_code == 0
    added = runner.invoke(main, ["group", "add", "brightsight", "loc-north", "loc-south"])
    assert "loc-north, loc-south" in added.output
    assert "loc-north, loc-south" in runner.invoke(main, ["group", "list"]).output
    data = json.loads(runner.invoke(main, ["export", "--group", "brightsight"]).output)
    assert [p["practice_id"] for p in data["practices"]] == ["loc-north", "loc-south"]
    assert len(data["patients"]) == 6
    assert runner.invoke(main, ["group", "add", "nope", "loc-north"]).exit_code == 1
    audit = store.audit_entries("loc-north")
    assert audit[0]["action"] == "export"
    assert "export" not in {e["action"] for e in store.audit_entries("elsewhere")}


def test_csv_export_neutralises_spreadsheet_formulas(store: Store, tmp_path) -> None:
    """OWASP CSV injection: a cell starting with = + - @ tab or CR is prefixed with a quote."""
    store.add_practice("inj", "Inj", PmsKind.CSV, {}, {})
    evil = Patient(
        "inj", "E1", '=HYPERLINK("http://evil.example","x")', "@SUM(A1)", [MOBILE], last_eye_test_date=date(2024, 1, 1)
    )
    evil.clinical_notes = "-2+3"
    store.write_patients(
        "inj", "csv", ReadResult([evil], [RejectedRow("l2", "bad", {"name": "+cmd"})]), None, full=True
    )
    out = tmp_path / "inj.csv"
    assert CliRunner().invoke(main, ["export", "inj", "--format", "csv", "--output", str(out)]).exit_code == 0
    import csv

    row = next(csv.DictReader(out.read_text(encoding="utf-8-sig").splitlines()))
    assert row["first_name"].startswith("'=") and row["last_name"] == "'@SUM(A1)"
    # A spreadsheet reads +44... as a formula or a number (dropping the +): quoted like any other.
    assert row["phones"] == "'+447700900321"
    rejected = next(csv.DictReader((tmp_path / "inj-rejected.csv").read_text(encoding="utf-8-sig").splitlines()))
    assert rejected["raw"].startswith("{") and "+cmd" in rejected["raw"]  # raw values as JSON: never a formula


@pytest.mark.parametrize(
    ("value", "exported"),
    [
        ("=1+1", "'=1+1"),
        ("+447700900321", "'+447700900321"),  # E.164: a formula or a number to a spreadsheet
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tcmd", "'\tcmd"),
        ("\rcmd", "'\rcmd"),
        ("'=1+1", "''=1+1"),  # already quoted by hand: one more, so reading back gives it as it was
        ("'t Hart", "'t Hart"),  # a name that starts with an apostrophe is left alone
        ("O'Neill", "O'Neill"),
        ("Ann = Lee", "Ann = Lee"),
        (7, 7),
        (None, None),
    ],
)
def test_every_cell_a_spreadsheet_would_run_is_quoted_and_reads_back_exactly(value, exported) -> None:
    from nvc_pipelines.application.app import _FORMULA_START, neutralise_cell

    assert neutralise_cell(value) == exported
    # The rule docs/security.md gives for reading an exported cell back.
    if isinstance(exported, str) and exported.startswith("'") and exported.lstrip("'").startswith(_FORMULA_START):
        exported = exported[1:]
    assert exported == value


def test_recalls_later_in_the_pms_than_the_guideline_are_listed_for_review(store: Store) -> None:
    store.add_practice("warn", "warn", PmsKind.CSV, {}, {})
    people = [
        Patient("warn", "D1", "Dee", "Ray", [MOBILE], last_eye_test_date=date(2024, 3, 1), risk_flags=["diabetic"],
                pms_recall_due_date=date(2026, 3, 1)),  # a diabetic recalled in 2 years
        Patient("warn", "D2", "Eve", "Ray", [MOBILE], last_eye_test_date=date(2024, 3, 1), risk_flags=["diabetic"],
                pms_recall_due_date=date(2025, 3, 1)),
    ]  # fmt: skip
    store.write_patients("warn", "csv", ReadResult(people), None, full=True)
    rules = RecallRules.from_settings({})
    store.write_recalls("warn", [compute_recall(p, rules) for p in store.load_patients("warn")])
    assert store.recall_summary("warn", date(2026, 11, 25))["pms_later_than_guideline"] == 1
    runner = CliRunner()
    listed = runner.invoke(main, ["recalls", "warn", "--warnings"])
    assert listed.exit_code == 0, listed.output
    assert "1 patient(s) recalled later in the PMS than the guideline" in listed.output
    assert "Dee Ray (D1)  2026-03-01  2025-03-01  diabetic" in listed.output and "D2" not in listed.output
    summary = runner.invoke(main, ["recalls", "warn"])
    assert "2 recall(s) for 2 active patient(s)" in summary.output and "1 PMS date(s) later" in summary.output


# Every command given a practice id nobody registered (test_every_practice_command_is_covered keeps
# this list complete as commands are added).
UNKNOWN_PRACTICE = [
    ["call-list", "nope"],
    ["call-list", "nope", "--format", "json"],
    ["call-list", "nope", "--why", "P1"],
    ["duplicates", "nope"],
    ["rejected", "nope"],
    ["sync-log", "nope"],
    ["outbox", "nope"],
    ["outbox", "nope", "--needs-action"],
    ["alerts", "nope"],
    ["audit", "nope"],
    ["recalls", "nope"],
    ["recalls", "nope", "--warnings"],
    ["contact", "allow", "nope", "P1"],
    ["call-list", "nope", "--check", "07700900123"],
    ["booking", "add", "nope", "--patient", "P1", "--start", "2027-01-05T10:00:00+00:00"],
    ["call-attempt", "add", "nope", "--patient", "P1"],
    ["call-outcome", "add", "nope", "--patient", "P1", "--outcome", "booked", "--text", "booked"],
    ["practice", "disconnect", "nope"],
    ["group", "add", "g1", "nope"],
    ["sync", "nope"],
    ["sync-now", "nope", "--url", "http://127.0.0.1:9"],
    ["export", "nope"],
    ["export", "nope", "--patient", "P1"],
    ["clinicians", "nope"],
    ["merge", "nope", "P1", "P2"],
    ["unmerge", "nope", "1"],
    ["erase", "nope", "P1"],  # refused before it asks for confirmation
    ["practice", "connect", "nope", "--pms", "csv", "--update", "--setting", "path=/tmp"],  # never a new one
]


@pytest.mark.parametrize("args", UNKNOWN_PRACTICE)
def test_an_unknown_practice_is_one_clear_error(store: Store, args: list[str]) -> None:
    """Every command that takes a practice id (`nvc --help`) refuses one nobody registered the same way."""
    store.add_group("g1", "Group one")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "no practice 'nope' is registered (see `nvc practice list`)" in result.output
    assert "Traceback" not in result.output
    with store.begin_owner() as conn:  # nothing was recorded about a practice that does not exist
        assert not conn.execute(text("SELECT 1 FROM audit_log WHERE practice_id = 'nope'")).first()


def _practice_commands(group: click.Group, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command, as the words that name it, that takes a practice id as an argument."""
    found: set[tuple[str, ...]] = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= _practice_commands(command, (*path, name))
        elif any(isinstance(p, click.Argument) and p.name in ("practice_id", "practice_ids") for p in command.params):
            found.add((*path, name))
    return found


def _named(args: list[str]) -> tuple[str, ...]:
    """The command that `args` invoke (`nvc outbox ID` is `nvc outbox list ID`)."""
    command = main.commands[args[0]]
    if isinstance(command, click.Group):
        return (args[0], args[1] if args[1] in command.commands else "list")
    return (args[0],)


def test_every_practice_command_is_covered() -> None:
    missing = _practice_commands(main) - {_named(a) for a in UNKNOWN_PRACTICE} - {("practice", "connect")}
    assert not missing, f"commands taking a practice id without an unknown-practice case: {sorted(missing)}"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    found: dict[tuple[str, ...], click.Command] = {}
    for name, command in group.commands.items():
        found[(*path, name)] = command
        if isinstance(command, click.Group):
            found |= _commands(command, (*path, name))
    return found


def test_every_command_and_subcommand_has_help_text() -> None:
    commands = _commands(main)
    assert ("group", "add") in commands and ("outbox", "dismiss") in commands
    missing = sorted(" ".join(path) for path, command in commands.items() if not (command.help or "").strip())
    assert not missing, f"no help text: {missing}"
    listed = CliRunner().invoke(main, ["group", "--help"])
    assert listed.exit_code == 0 and "Add practices to a group" in listed.output, listed.output


def test_dagsters_preview_warnings_stay_out_of_operators_output(database_url: str) -> None:
    import os
    import subprocess
    import sys

    nvc = os.path.join(os.path.dirname(sys.executable), "nvc")
    # Connecting loads the code location (to learn what the PMS needs), which declares partitioned
    # asset checks, a Dagster preview feature.
    done = subprocess.run(
        [nvc, "practice", "connect", "x", "--pms", "optix"], capture_output=True, text=True, env=os.environ.copy(),
        timeout=120, input="",
    )  # fmt: skip
    assert done.returncode == 1 and "secret api_key not given" in done.stderr, done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_export_is_written_a_row_at_a_time_and_reads_as_the_whole_export(store: Store, tmp_path) -> None:
    """`nvc export` streams the store's rows into the file (the document's lists are iterators, read
    as they are written); the JSON is byte for byte what serialising the whole export would give,
    for a practice, one patient and a group, and the CSV holds every patient and rejected row."""
    from collections.abc import Iterator

    from nvc_pipelines.application.app import export_document

    _seed(store, "s-north")
    _seed(store, "s-south")
    runner = CliRunner()
    assert runner.invoke(main, ["group", "create", "s-group", "--name", "S Group"]).exit_code == 0
    assert runner.invoke(main, ["group", "add", "s-group", "s-north", "s-south"]).exit_code == 0

    def whole(value: object) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n"

    assert isinstance(export_document("s-north")["patients"], Iterator)
    backwards = export_document("s-north", sections=("rejected_rows", "patients"))  # read in the store's order
    assert (len(list(backwards["patients"])), len(list(backwards["rejected_rows"]))) == (3, 1)
    practice = runner.invoke(main, ["export", "s-north"])
    assert practice.exit_code == 0 and practice.output == whole(store.export_practice("s-north"))
    one = runner.invoke(main, ["export", "s-north", "--patient", "A2"])
    assert one.output == whole(store.export_practice("s-north", patient_ref="A2"))
    assert [p["pms_patient_id"] for p in json.loads(one.output)["patients"]] == ["A2"]
    members = [store.export_practice(p) for p in ("s-north", "s-south")]
    group = runner.invoke(main, ["export", "--group", "s-group"])
    assert group.output == whole(
        {
            "group_id": "s-group",
            "practices": members,
            "patients": [p for m in members for p in m["patients"]],
            "rejected_rows": [r for m in members for r in m["rejected_rows"]],
        }
    )
    out = tmp_path / "north.json"
    written = runner.invoke(main, ["export", "s-north", "--output", str(out)])
    assert out.read_text(encoding="utf-8") == practice.output
    assert "Exported 3 patients and 1 rejected rows." in written.output
    out = tmp_path / "north.csv"
    assert runner.invoke(main, ["export", "s-north", "--format", "csv", "--output", str(out)]).exit_code == 0
    lines = out.read_text(encoding="utf-8-sig").splitlines()
    assert len(lines) == 4 and lines[0].startswith("pms_patient_id,first_name")
    assert "phone number is missing" in (tmp_path / "north-rejected.csv").read_text(encoding="utf-8-sig")
    missing = runner.invoke(main, ["export", "s-north", "--patient", "NOPE"])
    assert missing.exit_code == 1 and "has no patient 'NOPE'" in missing.output


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_an_export_that_fails_part_way_leaves_no_file(store: Store, tmp_path, monkeypatch, fmt: str) -> None:
    """The files are renamed into place only when complete: a failure while writing leaves nothing
    that looks like an export (the CSV's rejected rows file neither)."""
    from nvc_pipelines.application import app
    from nvc_pipelines.store import StoreUnavailable

    _seed(store, "half")

    def broken(document, out, *rest):
        out.write("half an export")
        raise StoreUnavailable("The store's PostgreSQL failed: the connection was lost.")

    monkeypatch.setattr(app, "write_json" if fmt == "json" else "write_csv", broken)
    failed = CliRunner().invoke(main, ["export", "half", "--format", fmt, "--output", str(tmp_path / f"half.{fmt}")])
    assert failed.exit_code == 1 and "connection was lost" in failed.output and "Traceback" not in failed.output
    assert list(tmp_path.iterdir()) == []


def test_an_export_file_is_the_operators_alone_and_a_device_is_written_as_it_is(store: Store, tmp_path) -> None:
    """A file holding patients' data is created with mode 0600; a device or pipe named as the output
    (`/dev/stdout`, `>(gzip > f)`) is written to, never replaced by a file."""
    import os
    import stat

    _seed(store, "modes")
    runner = CliRunner()
    out = tmp_path / "modes.csv"
    assert runner.invoke(main, ["export", "modes", "--format", "csv", "--output", str(out)]).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "modes-rejected.csv").stat().st_mode) == 0o600
    written = runner.invoke(main, ["export", "modes", "--output", os.devnull])
    assert written.exit_code == 0, written.output
    assert "Exported 3 patients and 1 rejected rows." in written.output
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # still the device


def test_an_export_to_a_place_that_cannot_be_written_is_one_line_and_not_audited(store: Store, tmp_path) -> None:
    """A missing folder is refused with the path and the reason, before anything is read: no stack
    trace, and no export in the audit log for a file that was never written."""
    _seed(store, "nowhere")
    target = tmp_path / "no" / "such" / "x.json"
    refused = CliRunner().invoke(main, ["export", "nowhere", "--output", str(target)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"cannot write the export to {target}: No such file or directory" in refused.output
    assert "export" not in {e["action"] for e in store.audit_entries("nowhere")}


def test_a_group_exports_as_csv_and_an_unknown_section_is_refused(store: Store, tmp_path) -> None:
    _seed(store, "g-east")
    _seed(store, "g-west")
    runner = CliRunner()
    assert runner.invoke(main, ["group", "create", "g", "--name", "G"]).exit_code == 0
    assert runner.invoke(main, ["group", "add", "g", "g-east", "g-west"]).exit_code == 0
    done = runner.invoke(main, ["export", "--group", "g", "--format", "csv", "--output", str(tmp_path / "g.csv")])
    assert "Exported 6 patients and 2 rejected rows." in done.output
    assert len((tmp_path / "g.csv").read_text(encoding="utf-8-sig").splitlines()) == 7
    with pytest.raises(ValueError, match="no section"):
        store.export_rows("g-east", sections=("patients", "passwords"))


def test_an_export_reads_its_rows_from_a_server_side_cursor(store: Store) -> None:
    """Streamed, not fetched whole: with the first row in hand, the export's session has only fetched
    from a cursor (PostgreSQL's view of it, from another session), and holds its transaction open."""
    from nvc_pipelines.model import Patient as P

    store.add_practice("streamed", "Streamed", PmsKind.CSV, {}, {})
    people = [
        P("streamed", f"P{n:05d}", "Ann", "Lee", [MOBILE], last_eye_test_date=date(2022, 1, 1)) for n in range(3000)
    ]
    store.write_patients("streamed", "csv", ReadResult(people), None, full=True)
    rows = store.export_rows("streamed", sections=("patients",))
    try:
        assert next(rows)[1]["pms_patient_id"] == "P00000"
        with store.begin_owner() as conn:
            seen = conn.execute(
                text(
                    "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'"
                )
            ).all()
        assert [(s, q.split()[0]) for s, q in seen] == [("idle in transaction", "FETCH")], seen
    finally:
        rows.close()
