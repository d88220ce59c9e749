"""The journalled batch engine (batch.py) and result downloads (download.py), in process.

Over real HTTP against FakeDreamOServer; the journal is a real SQLite file. What
the server counted (creates per prompt) proves what was paid, whatever the
journal says.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

import dreamo_async as d
import dreamo_async.batch.engine as engine_module
import dreamo_async.download as download_module
from dreamo_async.batch import (
    BatchEvent,
    BatchJob,
    Journal,
    JournalError,
    _RunJournalError,
    job_outcome,
    journal_state,
    run_batch,
)
from dreamo_async.download import _PartFile, remove_stale_parts, result_stem, safe_component
from dreamo_async.errors import MoneyState
from dreamo_async.images import path_or_url
from dreamo_async.lifecycle import JobLifecycle
from dreamo_async.testing import FakeDreamOServer, Fault, make_jpeg, make_png

from .conftest import eventually

KEY = "sk-test-0123456789abcdef"
FAST_POLL = d.PollPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.0, timeout=10)
PNG = make_png(64, 64)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=30) as fake:
        yield fake


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)
    return str(path)


def client_for(server: FakeDreamOServer, **options: Any) -> d.DreamOClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", d.RetryPolicy(initial_delay=0.0, max_delay=0.0, max_attempts=2))
    return d.DreamOClient(api_key=options.pop("api_key", KEY), base_url=server.url, **options)


def jobs_for(image: str | Path, *prompts: str) -> list[dict[str, Any]]:
    """Jobs as Python callers give them: local files as Path (a str is never a file)."""
    images = [path_or_url(str(image))]
    return [{"prompt": p, "images": images, "seed": i} for i, p in enumerate(prompts)]


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def names(folder: Path) -> list[str]:
    """Every name in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def states(journal_path: Path) -> dict[int, str]:
    with contextlib.closing(sqlite3.connect(journal_path)) as conn:
        return dict(conn.execute("SELECT idx, state FROM jobs"))


# --------------------------------------------------------------------------- a whole run


async def test_a_run_journals_every_job_and_saves_every_result(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    jobs = jobs_for(image, "a", "b", "c [fail:003013095]", "d", "e")
    events: list[BatchEvent] = []
    async with client_for(server, max_concurrency=3) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", out, on_event=events.append)
    assert report.total == 5
    assert report.completed == 4
    assert report.failed == {"003013095": 1}
    assert str(report.cost) == "0.12"
    assert not report.ok
    assert server.stats.creates == 5
    assert states(tmp_path / "j.db") == {
        0: "completed",
        1: "completed",
        2: "failed",
        3: "completed",
        4: "completed",
    }
    with Journal(tmp_path / "j.db") as journal:
        rows = journal.rows()
    for row in rows:
        assert row.creates == 1
        assert row.task_id is not None
        if row.state == "completed":
            (name,) = row.files
            assert name == f"{result_stem(row.index, row.task_id, 0)}.png"
            assert read(out / name).startswith(b"\x89PNG")
    assert rows[2].error_code == "003013095"
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in results] == ["completed"] * 2 + ["failed"] + ["completed"] * 2
    assert results[2]["error"]["code"] == "003013095"
    assert KEY not in (out / "results.jsonl").read_text()
    assert KEY.encode() not in _journal_bytes(tmp_path / "j.db")
    assert not list(out.glob(".*.part"))
    kinds = {e.kind for e in events}
    assert {"created", "polled", "completed", "failed"} <= kinds


async def test_batch_events_speak_generate_manys_progress(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    """One vocabulary: ``done`` counts every ended job, failed ones included; no more
    than ``concurrency`` jobs run at once (the bulk path's window)."""
    jobs = jobs_for(image, "a", "b [fail:003013095]", "c", "d", "e")
    events: list[BatchEvent] = []
    async with client_for(server, max_concurrency=8) as client:
        await run_batch(
            client, jobs, tmp_path / "j.db", tmp_path, concurrency=2, on_event=events.append
        )
    assert all(isinstance(e.state, d.BatchProgress) for e in events)
    assert max(e.state.running for e in events) == 2
    last = events[-1].state
    assert (last.done, last.failed, last.total, last.running, last.queued) == (5, 1, 5, 0, 0)
    assert str(last.cost) == "0.12"
    # A re-run: the completed jobs are skipped, and counted as done.
    rerun: list[BatchEvent] = []
    async with client_for(server) as client:
        await run_batch(client, jobs, tmp_path / "j.db", tmp_path, on_event=rerun.append)
    skipped = [e for e in rerun if e.kind == "skipped"]
    assert skipped[-1].state.skipped == 4
    assert rerun[-1].state.done == 5


async def test_results_name_names_the_results_file_or_leaves_it_out(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        named = await run_batch(client, jobs, tmp_path / "j.db", tmp_path, results_name="r.jsonl")
        none = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "x", results_name=None)
    assert named.results_path == tmp_path / "r.jsonl"
    assert json.loads(named.results_path.read_text())["state"] == "completed"
    assert none.results_path is None
    assert not (tmp_path / "results.jsonl").exists()
    assert not (tmp_path / "x" / "results.jsonl").exists()


async def test_rerunning_a_finished_journal_sends_nothing(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a", "b", "c [fail:003013095]")
    async with client_for(server) as client:
        await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        creates, polls = server.stats.creates, server.stats.polls
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert (server.stats.creates, server.stats.polls) == (creates, polls)
    assert report.skipped == 2
    assert report.completed == 2
    assert report.failed == {"003013095": 1}


async def test_a_resumed_failed_job_is_reported_as_the_run_that_failed_it_did(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a [fail:003013095]")
    runs: list[list[BatchEvent]] = [[], []]
    async with client_for(server) as client:
        for events in runs:
            await run_batch(client, jobs, tmp_path / "j.db", tmp_path, on_event=events.append)
    first, second = ([e for e in events if e.kind == "failed"] for events in runs)
    assert len(first) == len(second) == 1
    assert (second[0].task_id, second[0].code, second[0].message) == (
        first[0].task_id,
        first[0].code,
        first[0].message,
    )
    assert first[0].task_id is not None
    assert first[0].code == "003013095"


async def test_retry_failed_creates_a_failed_task_again_on_request(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a [fail:003013095]")
    async with client_for(server) as client:
        await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path, retry_failed=True)
    assert server.stats.creates == 2
    assert report.failed == {"003013095": 1}


# --------------------------------------------------------------------------- resuming


async def test_a_created_job_is_polled_never_created_again(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = [BatchJob(index=i, params=p) for i, p in enumerate(jobs_for(image, "a", "b"))]
    async with client_for(server) as client:
        task = await client.submit(**{**jobs[0].params, "images": [Path(image)]})
        with Journal(tmp_path / "j.db") as journal:
            journal.sync_jobs(jobs)
            await journal.aupdate(0, "created", task_id=task.id)
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert report.completed == 2
    assert server.stats.creates_by_prompt == {"a": 1, "b": 1}
    with Journal(tmp_path / "j.db") as journal:
        assert journal.rows()[0].task_id == task.id


async def test_a_completed_job_whose_file_vanished_is_fetched_again_not_recreated(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        first = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
        assert first.completed == 1
        (saved,) = (tmp_path / "out").glob("00000-*.png")
        saved.unlink()
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
    assert report.completed == 1
    assert report.skipped == 0
    assert saved.is_file()
    assert server.stats.creates == 1


async def test_a_completed_job_whose_file_is_not_an_image_is_fetched_again(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
        (saved,) = (tmp_path / "out").glob("00000-*.png")
        truncate(saved)  # what a power cut can leave of an un-synced rename
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
    assert report.skipped == 0
    assert read(saved) == server_png(server)
    assert server.stats.creates == 1


def truncate(path: Path) -> None:
    path.write_bytes(b"")


def server_png(server: FakeDreamOServer) -> bytes:
    from dreamo_async.testing.server import _OUTPUT_PNG

    return _OUTPUT_PNG


async def test_a_crash_during_create_is_reported_not_resent(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = [BatchJob(index=i, params=p) for i, p in enumerate(jobs_for(image, "a", "b"))]
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs(jobs)
        await journal.aupdate(0, "sending", request_id="rid-0")  # what a crash mid-create leaves
    async with client_for(server) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        assert report.unknown == {0: "rid-0"}
        assert report.completed == 1
        assert server.stats.creates_by_prompt == {"b": 1}
        results = (tmp_path / "results.jsonl").read_text().splitlines()
        assert json.loads(results[0])["state"] == "sending"
        # The user decided: send it again.
        again = await run_batch(client, jobs, tmp_path / "j.db", tmp_path, retry_unknown=True)
    assert again.unknown == {}
    assert again.completed == 2
    assert server.stats.creates_by_prompt == {"a": 1, "b": 1}


async def test_a_lost_create_answer_becomes_unknown_and_stays_unsent(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    server.inject("create", Fault.drop_after())
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        first = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        second = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert server.stats.creates == 1  # the service made the task; its answer was lost
    for report in (first, second):
        assert list(report.unknown) == [0]
        assert report.failed == {"unknown": 1}
    assert states(tmp_path / "j.db") == {0: "unknown"}
    with Journal(tmp_path / "j.db") as journal:
        (row,) = journal.rows()
    assert row.request_id == server.tasks[next(iter(server.tasks))].request_id


async def test_a_refused_key_stops_the_run_and_nothing_is_paid(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, *"abcdef")
    async with client_for(server, api_key="sk-wrong-000000000000", max_concurrency=2) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert isinstance(report.fatal, d.AuthenticationError)
    assert server.stats.creates == 0
    assert server.stats.create_requests <= 2  # the other jobs never started
    async with client_for(server) as client:
        resumed = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert resumed.ok
    assert server.stats.creates == 6


async def test_a_write_error_fails_its_download_alone_and_a_rerun_fetches_it(
    server: FakeDreamOServer, image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while saving job 1's image: the other jobs finish, results.jsonl is written."""
    real_open = download_module.open_exclusive

    def full_for_job_1(path: Path) -> BinaryIO:
        if path.name.startswith(".00001-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path)

    monkeypatch.setattr(download_module, "open_exclusive", full_for_job_1)
    jobs = jobs_for(image, "a", "b", "c")
    async with client_for(server, max_concurrency=3) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
    assert report.completed == 2
    assert report.failed == {"download": 1}
    assert report.fatal is None
    assert states(tmp_path / "j.db") == {0: "completed", 1: "created", 2: "completed"}
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert results[1]["error"]["code"] == "download"
    assert "No space left on device" in results[1]["error"]["message"]
    monkeypatch.undo()
    async with client_for(server) as client:
        again = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "out")
    assert again.ok
    assert server.stats.creates == 3  # fetched again, never created again


async def test_a_mapping_job_with_an_unknown_key_fails_alone(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a", "b", "c")
    jobs[1]["colour"] = "red"
    async with client_for(server, max_concurrency=3) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert report.completed == 2
    assert report.failed == {"invalid": 1}
    assert server.stats.creates_by_prompt == {"a": 1, "c": 1}
    with Journal(tmp_path / "j.db") as journal:
        row = journal.rows()[1]
    assert (row.state, row.error_code, row.creates) == ("failed", "invalid", 0)
    assert "colour" in (row.error_message or "")


async def test_run_batch_opens_and_closes_its_journal_off_the_event_loop(
    server: FakeDreamOServer, image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening (connect, WAL, schema fsync) and closing (joining the writer) block."""
    callers: dict[str, threading.Thread] = {}
    real_open, real_close = Journal.open, Journal.close

    def open_(self: Journal) -> Journal:
        callers["open"] = threading.current_thread()
        return real_open(self)

    def close(self: Journal) -> None:
        callers.setdefault("close", threading.current_thread())
        real_close(self)

    monkeypatch.setattr(Journal, "open", open_)
    monkeypatch.setattr(Journal, "close", close)
    async with client_for(server) as client:
        report = await run_batch(client, jobs_for(image, "a"), tmp_path / "j.db", tmp_path)
    assert report.ok
    assert set(callers) == {"open", "close"}
    assert threading.current_thread() not in callers.values()
    # Held by this test: the run's open fails, from the worker thread, as before.
    async with client_for(server) as client:
        with Journal(tmp_path / "j.db"), pytest.raises(JournalError, match="in use by another"):
            await run_batch(client, jobs_for(image, "a"), tmp_path / "j.db", tmp_path)


@pytest.mark.usefixtures("journal_fails_at_created")
async def test_a_journal_failure_after_the_jobs_started_is_told_apart(
    server: FakeDreamOServer, image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing once tasks exist is not the up-front refusal the CLI calls input error."""
    async with client_for(server) as client:
        with pytest.raises(JournalError, match="disk I/O error") as caught:
            await run_batch(client, jobs_for(image, "a"), tmp_path / "j.db", tmp_path)
    assert isinstance(caught.value, _RunJournalError)
    assert server.stats.creates == 1
    monkeypatch.undo()  # the fixture's patch too: one monkeypatch per test
    async with client_for(server) as client:  # up front: other jobs than the journal's
        with pytest.raises(JournalError) as refused:
            await run_batch(client, jobs_for(image, "b"), tmp_path / "j.db", tmp_path)
    assert not isinstance(refused.value, _RunJournalError)
    assert server.stats.creates == 1


async def test_a_changed_job_refuses_the_old_journal(image: str, tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "a", "images": [image]})])
        with pytest.raises(JournalError, match="differs"):
            journal.sync_jobs([BatchJob(index=0, params={"prompt": "b", "images": [image]})])


# --------------------------------------------------------------------------- the journal


def test_two_runs_cannot_share_a_journal(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db"), pytest.raises(JournalError, match="in use"):
        Journal(tmp_path / "j.db").open()
    with Journal(tmp_path / "j.db") as again:  # the lock went with the first run
        assert again.rows() == []


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    jobs = [BatchJob(index=i, params={"prompt": str(i)}) for i in range(64)]
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs(jobs)
        before = journal.stats.commits
        await asyncio.gather(
            *(journal.aupdate(i, "created", task_id=f"t{i}") for i in range(64))
        )
        commits = journal.stats.commits - before
        assert journal.stats.largest_group > 1
        assert commits < 64
        assert {row.task_id for row in journal.rows()} == {f"t{i}" for i in range(64)}


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        good = journal.aupdate(0, "created", task_id="t0")
        bad = journal.aupdate(7, "created", task_id="t7")  # no such job
        results = await asyncio.gather(good, bad, return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], JournalError)
        assert journal.rows()[0].task_id == "t0"


def test_a_journal_reopened_after_close_starts_afresh(tmp_path: Path) -> None:
    """open() after close() waits for its new writer and forgets an earlier failure."""
    path = tmp_path / "j.db"
    path.write_bytes(b"not a database, " * 64)
    journal = Journal(path)
    with pytest.raises(JournalError, match="cannot open"):
        journal.open()
    path.unlink()  # the user fixed it
    with journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        assert [row.state for row in journal.rows()] == ["queued"]
    with journal:  # and once more after a clean close
        assert [row.index for row in journal.rows()] == [0]


def test_the_journal_is_wal_and_readable_by_others_while_open(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        with contextlib.closing(sqlite3.connect(tmp_path / "j.db")) as reader:
            assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert reader.execute("SELECT state FROM jobs").fetchall() == [("queued",)]


# ----------------------------------------------- every path closes the journal's files
# An open SQLite connection is a file handle kept for as long as the process lives
# (3.13 warns "unclosed database"; 3.11 and 3.12 say nothing). Each path checks that
# no descriptor of this process is left on the journal, its -wal/-shm or its lock.


def held_files(journal_path: Path) -> list[str]:
    """The files of ``journal_path`` (with -wal, -shm, .lock) this process holds open."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd (Linux) to list open files")
    prefix = str(journal_path.resolve())
    held = []
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # the descriptor of listdir itself is gone
            target = os.readlink(fds / fd)
            if target.startswith(prefix):
                held.append(target)
    return sorted(held)


async def test_a_journal_closes_its_files_at_the_end_of_a_run(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        assert held_files(tmp_path / "j.db")  # the check sees them while open
    assert held_files(tmp_path / "j.db") == []
    async with client_for(server) as client:
        report = await run_batch(client, jobs_for(image, "a"), tmp_path / "run.db", tmp_path)
    assert report.ok
    assert held_files(tmp_path / "run.db") == []


def test_a_file_that_is_not_a_journal_is_refused_and_left_closed(tmp_path: Path) -> None:
    """Connected, then refused at the first pragma: that connection is closed too."""
    (tmp_path / "j.db").write_bytes(b"not a database, " * 16)
    for _ in range(2):  # the lock went with the first attempt: the same error again
        journal = Journal(tmp_path / "j.db")
        with pytest.raises(JournalError, match="cannot open the journal"):
            journal.open()
        assert held_files(tmp_path / "j.db") == []


def test_a_refused_lock_opens_no_database(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db"):
        held = held_files(tmp_path / "j.db")
        with pytest.raises(JournalError, match="in use"):
            Journal(tmp_path / "j.db").open()
        assert held_files(tmp_path / "j.db") == held
    assert held_files(tmp_path / "j.db") == []


@pytest.mark.usefixtures("journal_fails_at_created")
async def test_a_run_ended_by_a_journal_error_closes_the_journal(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    async with client_for(server) as client:
        with pytest.raises(JournalError, match="disk I/O error"):
            await run_batch(client, jobs_for(image, "a"), tmp_path / "j.db", tmp_path)
    assert held_files(tmp_path / "j.db") == []


async def test_a_run_stopped_by_a_fatal_error_closes_the_journal(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    async with client_for(server, api_key="sk-wrong-000000000000") as client:
        report = await run_batch(client, jobs_for(image, "a", "b"), tmp_path / "j.db", tmp_path)
    assert isinstance(report.fatal, d.AuthenticationError)
    assert held_files(tmp_path / "j.db") == []


async def test_a_cancelled_run_closes_the_journal(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    created = asyncio.Event()

    def on_event(event: BatchEvent) -> None:
        if event.kind == "created":
            created.set()

    async with client_for(server) as client:
        run = asyncio.create_task(
            run_batch(
                client,
                jobs_for(image, "a [slow:5000]"),
                tmp_path / "j.db",
                tmp_path,
                on_event=on_event,
            )
        )
        await asyncio.wait_for(created.wait(), 5)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    assert held_files(tmp_path / "j.db") == []
    with Journal(tmp_path / "j.db") as journal:  # and the task id was kept
        assert journal.rows()[0].state == "created"


# --------------------------------------------------------------------------- downloads


def test_task_ids_that_could_escape_the_folder_are_refused() -> None:
    for bad in (".", "..", "a/b", "a\\b", "../x", "", "x" * 200, ".hidden", "a..b"):
        with pytest.raises(d.DownloadError):
            safe_component(bad)
    assert result_stem(7, "d5u5obte8783ap44qtj0", 1) == "00007-d5u5obte8783ap44qtj0-1"


def test_only_the_temporary_files_of_result_downloads_are_removed_as_stale(
    tmp_path: Path,
) -> None:
    stale = [_PartFile(tmp_path, result_stem(i, "t1", 0)).path for i in (0, 42, 123_456)]
    kept = [tmp_path / n for n in ("00000-t1-0.png", ".notes.part", ".12-t-0.1-2.part", "a.part")]
    for path in (*stale, *kept):
        path.write_bytes(b"x")
    remove_stale_parts(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


async def test_download_checks_the_content_and_names_the_extension(
    server: FakeDreamOServer, tmp_path: Path
) -> None:
    jpeg = server.add_file("r.bin", make_jpeg(64, 64), "application/octet-stream")
    html = server.add_file("page.png", b"<!doctype html><p>expired</p>", "image/png")
    async with client_for(server) as client:
        saved = await client.download(jpeg, tmp_path, "00000-t-0")
        assert saved == tmp_path / "00000-t-0.jpg"
        with pytest.raises(d.DownloadError, match="HTML"):
            await client.download(html, tmp_path, "00001-t-0")
        with pytest.raises(d.DownloadError, match="cap"):
            await client.download(jpeg, tmp_path, "00002-t-0", max_bytes=10)
    assert names(tmp_path) == ["00000-t-0.jpg"]


async def test_download_retries_and_keeps_no_partial_file(
    server: FakeDreamOServer, tmp_path: Path
) -> None:
    url = server.add_file("r.png", PNG)
    server.inject("download", Fault.status(503))
    server.inject("download", Fault.drop_before())
    async with client_for(server, retry=d.RetryPolicy(initial_delay=0, max_attempts=3)) as client:
        saved = await client.download(url, tmp_path, "00000-t-0")
        assert saved.read_bytes() == PNG
        server.inject("download", Fault.status(404), times=1)
        with pytest.raises(d.NotFoundError):
            await client.download(url, tmp_path, "00001-t-0")
    assert names(tmp_path) == ["00000-t-0.png"]


async def test_wait_given_the_submitted_task_skips_the_immediate_poll(
    server: FakeDreamOServer, image: str
) -> None:
    poll = d.PollPolicy(initial_delay=0.05, max_delay=0.05, jitter=0.0)
    async with client_for(server, poll=poll) as client:
        task = await client.submit(prompt="p [never]", images=[Path(image)])
        with pytest.raises(d.TaskTimeoutError):
            await client.wait(task, timeout=0.02)
        assert server.stats.polls == 1
        with pytest.raises(d.TaskTimeoutError):
            await client.wait(task.id, timeout=0.02)
        assert server.stats.polls == 3  # an immediate poll, then one at the deadline


async def test_only_writes_that_could_cost_money_or_a_task_id_wait_for_fsync(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        synced = journal.stats.synced_commits
        await journal.aupdate(0, "completed", files="[]")
        await journal.aupdate(0, "failed", error_code="x")
        assert journal.stats.synced_commits == synced
        await journal.aupdate(0, "sending", request_id="r")
        await journal.aupdate(0, "created", task_id="t")
        assert journal.stats.synced_commits == synced + 2
    with Journal(tmp_path / "k.db", fsync="all") as every:
        every.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        before = every.stats.synced_commits
        await every.aupdate(0, "completed", files="[]")
        assert every.stats.synced_commits == before + 1
    with pytest.raises(ValueError, match="fsync"):
        Journal(tmp_path / "l.db", fsync="sometimes")  # type: ignore[arg-type]


async def test_count_create_counts_each_create_sent_and_unknown_columns_are_refused(
    tmp_path: Path,
) -> None:
    with Journal(tmp_path / "j.db") as journal:
        journal.sync_jobs([BatchJob(index=0, params={"prompt": "p"})])
        await journal.aupdate(0, "sending", request_id="r1", count_create=True)
        await journal.aupdate(0, "unknown", error_code="unknown")
        await journal.aupdate(0, "sending", request_id="r2", count_create=True)
        (row,) = journal.rows()
        assert (row.state, row.request_id, row.creates) == ("sending", "r2", 2)
        with pytest.raises(ValueError, match="unknown journal columns"):
            await journal.aupdate(0, "failed", creates=5)


async def test_the_output_folder_can_move_between_runs(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "first")
        move(tmp_path / "first", tmp_path / "second")
        downloads = server.stats.downloads
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path / "second")
    assert report.skipped == 1
    assert server.stats.downloads == downloads
    (line,) = read(tmp_path / "second" / "results.jsonl").splitlines()
    assert json.loads(line)["files"] == [names(tmp_path / "second")[0]]


def move(source: Path, target: Path) -> None:
    source.rename(target)


async def test_a_large_image_spills_to_disk_and_a_capped_one_leaves_nothing(
    server: FakeDreamOServer, tmp_path: Path
) -> None:
    big = make_jpeg(64, 64, padding=2_500_000)  # beyond the 1 MiB held in memory
    url = server.add_file("big.bin", big)
    async with client_for(server) as client:
        saved = await client.download(url, tmp_path / "new", "00000-t-0")
        assert read(saved) == big
        with pytest.raises(d.DownloadError, match="cap"):
            await client.download(url, tmp_path / "new", "00001-t-0", max_bytes=2_000_000)
    assert names(tmp_path / "new") == ["00000-t-0.jpg"]


def _journal_bytes(journal: Path) -> bytes:
    """Everything a journal wrote: the database, its WAL, shared memory and lock files."""
    return b"".join(path.read_bytes() for path in sorted(journal.parent.glob(journal.name + "*")))


# --------------------------------------------------------------- the money state decides


def rows_of(journal_path: Path) -> list[Any]:
    with Journal(journal_path) as journal:
        return journal.rows()


async def test_a_client_closed_while_a_create_is_in_flight_journals_unknown_never_resent(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    """aclose() 0.1 s into a create whose answer takes 0.5 s: the task exists at the service;
    the job is ``unknown`` with its request id, and the next run does not create it again."""
    server.inject("create", Fault.slow_answer(500))
    jobs = jobs_for(image, "a", "b")
    client = client_for(server, max_concurrency=1)
    async with client:
        run = asyncio.create_task(run_batch(client, jobs, tmp_path / "j.db", tmp_path))
        await eventually(lambda: server.stats.create_requests == 1)
        await asyncio.sleep(0.1)
        await client.aclose()
        first = await run
    await eventually(lambda: server.stats.creates == 1)  # the service made the task anyway
    (task,) = server.tasks.values()
    assert first.unknown == {0: task.request_id}
    job0, job1 = rows_of(tmp_path / "j.db")
    assert (job0.state, job0.request_id) == ("unknown", task.request_id)
    assert job1.state == "failed"  # never sent: it runs on the next run
    assert job1.creates == 0
    async with client_for(server) as again:
        second = await run_batch(again, jobs, tmp_path / "j.db", tmp_path)
    assert second.unknown == {0: task.request_id}
    assert second.completed == 1
    assert server.stats.creates_by_prompt == {"a": 1, "b": 1}  # never paid twice


async def test_a_run_cancelled_while_a_create_is_in_flight_is_not_resent(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    server.inject("create", Fault.slow_answer(500))
    jobs = jobs_for(image, "a")
    async with client_for(server) as client:
        run = asyncio.create_task(run_batch(client, jobs, tmp_path / "j.db", tmp_path))
        await eventually(lambda: server.stats.create_requests == 1)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await eventually(lambda: server.stats.creates == 1)
        (task,) = server.tasks.values()
        (row,) = rows_of(tmp_path / "j.db")
        assert row.state in ("sending", "unknown")
        assert row.request_id == task.request_id
        again = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert again.unknown == {0: task.request_id}
    assert server.stats.creates == 1


ODD_TASK = {"id": "t-odd", "status": "pending", "created_at": "\u00b2"}  # a parser's ValueError


async def test_an_unexpected_error_after_a_create_left_ends_its_job_alone_as_unknown(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    """A create answer whose reading raises a bare ValueError (any bug would do): the run
    goes on, the job is ``unknown`` with its request id, no other job is left ``sending``."""
    server.inject("create", Fault.wrong_shape(ODD_TASK))
    jobs = jobs_for(image, "a", "b", "c", "d")
    async with client_for(server, max_concurrency=3) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        assert report.completed == 3
        assert len(report.unknown) == 1
        assert server.stats.creates == 4
        rows = rows_of(tmp_path / "j.db")
        assert sorted(r.state for r in rows) == ["completed"] * 3 + ["unknown"]
        (odd,) = (r for r in rows if r.state == "unknown")
        assert odd.request_id in {t.request_id for t in server.tasks.values()}
        assert "ValueError" in (odd.error_message or "")
        again = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert again.unknown == report.unknown
    assert server.stats.creates == 4  # never re-sent


async def test_an_unexpected_error_while_polling_keeps_the_task_for_the_next_run(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    server.inject("poll", Fault.wrong_shape(ODD_TASK))
    jobs = jobs_for(image, "a", "b")
    once = d.RetryPolicy(max_attempts=1)  # the odd answer is not read again
    async with client_for(server, max_concurrency=1, retry=once) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
        assert report.completed == 1
        job0 = rows_of(tmp_path / "j.db")[0]
        assert job0.state == "created"
        assert job0.task_id in server.tasks
        again = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert again.ok
    assert server.stats.creates_by_prompt == {"a": 1, "b": 1}


async def test_text_that_cannot_be_sent_fails_its_job_alone_and_nothing_is_paid(
    server: FakeDreamOServer, image: str, tmp_path: Path
) -> None:
    jobs = jobs_for(image, "a", "a cat \ud800", "c")
    async with client_for(server, max_concurrency=3) as client:
        report = await run_batch(client, jobs, tmp_path / "j.db", tmp_path)
    assert report.completed == 2
    assert report.unknown == {}
    assert server.stats.creates_by_prompt == {"a": 1, "c": 1}
    row = rows_of(tmp_path / "j.db")[1]
    assert (row.state, row.creates, row.task_id) == ("failed", 0, None)


async def test_a_failing_on_event_callback_costs_no_job(
    server: FakeDreamOServer, image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: BatchEvent) -> None:
        raise RuntimeError("display crashed")

    async with client_for(server) as client:
        report = await run_batch(
            client, jobs_for(image, "a", "b"), tmp_path / "j.db", tmp_path, on_event=broken
        )
    assert report.ok
    assert "on_event callback failed" in caplog.text


async def test_the_run_ends_when_a_finished_download_is_still_in_its_set(
    server: FakeDreamOServer, image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dreamo demo` once spun at 100% CPU after its last job (CPython 3.12.1): a finished
    # download was still in the engine's set, so `gather` of it returned at once, forever.
    # Here no done callback removes one: the run must end anyway.
    class KeepsWhatIsDiscarded(set[asyncio.Task[None]]):
        def discard(self, task: object) -> None:
            pass

    init = engine_module._Engine.__init__

    def init_keeping(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.downloads = KeepsWhatIsDiscarded()

    monkeypatch.setattr(engine_module._Engine, "__init__", init_keeping)
    async with client_for(server) as client:
        async with asyncio.timeout(10):
            report = await run_batch(client, jobs_for(image, "a", "b"), tmp_path / "j.db", tmp_path)
    assert report.ok
    assert report.completed == 2


@pytest.mark.parametrize(
    ("state", "task_id", "expected"),
    [
        (MoneyState.NOT_SENT, None, "failed"),
        (MoneyState.SENDING, None, "unknown"),
        (MoneyState.OUTCOME_UNKNOWN, None, "unknown"),
        (MoneyState.OUTCOME_UNKNOWN, "t1", "created"),
        (MoneyState.CREATED, "t1", "created"),
        (MoneyState.CREATED, None, "unknown"),
        (MoneyState.COMPLETED, "t1", "created"),
        (MoneyState.FAILED, "t1", "failed"),
        (MoneyState.NOT_SENT, "t1", "created"),
    ],
)
def test_the_journal_state_follows_the_money_state(
    state: MoneyState, task_id: str | None, expected: str
) -> None:
    assert journal_state(state, task_id=task_id) == expected


def test_an_error_that_cannot_prove_nothing_was_sent_is_unknown() -> None:
    job = JobLifecycle()
    job.sending("r1")
    closed = d.ClientClosedError("closed")  # says nothing about request r1
    assert job_outcome(closed, job).money_state is MoneyState.OUTCOME_UNKNOWN
    assert job_outcome(KeyError("x"), job).request_id == "r1"
    refused = d.RateLimitError("slow down", request_id="r1")  # the service refused r1
    assert job_outcome(refused, job).money_state is MoneyState.NOT_SENT
    job.created("t1")
    assert job_outcome(closed, job).task_id == "t1"
    assert journal_state(job_outcome(KeyError("x"), job).money_state, task_id="t1") == "created"
