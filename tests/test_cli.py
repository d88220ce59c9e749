"""The real ``dreamo`` console script, run in subprocesses against a fake service process.

The fake service runs as its own process (``python -m dreamo_async.testing``),
so a batch process can be killed (SIGKILL, SIGINT) and restarted while the
service keeps its tasks and counts every create. Each test uses its own
prompts (a random tag), so the counters of the shared service tell the tests
apart. Progress bars are checked in a pseudo-terminal, plain logs over a pipe.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import pytest

from dreamo_async.testing import sample_images

pytestmark = pytest.mark.slow

KEY = "sk-cli-test-0123456789"
DREAMO = str(Path(sys.executable).with_name("dreamo"))
ANSI = "\x1b["


@attrs.frozen
class Service:
    url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_fake/stats", timeout=5) as answer:
            data: dict[str, Any] = json.load(answer)
        return data

    def creates_of(self, prompts: Sequence[str]) -> list[int]:
        counts = self.stats()["creates_by_prompt"]
        return [counts.get(p, 0) for p in prompts]


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    argv = [sys.executable, "-m", "dreamo_async.testing", "--api-key", KEY]
    process = subprocess.Popen(
        [*argv, "--task-duration-ms", "150"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("READY "), line
    try:
        yield Service(line.split()[1], process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DREAMO_API_KEY", "VTRIX_API_KEY")}
    base.update(
        {
            "DREAMO_API_KEY": KEY,
            "COLUMNS": "140",
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",  # a hung command killed by SIGABRT prints its stacks
        }
    )
    base.update(extra)
    return base


def dreamo(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to its end; one that hangs fails the test with every thread's stack."""
    with subprocess.Popen(
        [DREAMO, *args],
        env=environ or env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            stdout, stderr = process.communicate()
            pytest.fail(f"dreamo {' '.join(args)} hung for 60 s:\n{stderr}\n{stdout}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def make_jobs(folder: Path, prompts: Sequence[str], **extra: Any) -> Path:
    """A jobs file with relative image paths (copies of the bundled samples)."""
    refs = folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    samples = sample_images()
    for sample in samples:
        shutil.copy(sample, refs / sample.name)
    lines = [
        json.dumps(
            {"prompt": p, "images": [f"refs/{samples[i % len(samples)].name}"], "seed": i, **extra}
        )
        for i, p in enumerate(prompts)
    ]
    jobs = folder / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    return jobs


def prompts(n: int, *suffixes: str) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"job {i} {tag}" + (suffixes[i] if i < len(suffixes) else "") for i in range(n)]


def batch_args(service: Service, jobs: Path, out: Path, *more: str) -> list[str]:
    return [
        "batch",
        str(jobs),
        "--out",
        str(out),
        "--base-url",
        service.url,
        "--poll-interval",
        "0.05",
        *more,
    ]


def journal_states(path: Path) -> collections.Counter[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return collections.Counter(state for (state,) in conn.execute("SELECT state FROM jobs"))


def assert_no_secret(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- batch


def test_batch_over_a_pipe_logs_plain_lines_and_a_rerun_sends_nothing(
    service: Service, tmp_path: Path
) -> None:
    names = prompts(5, "", "", " [fail:003013095]")
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    run = dreamo(*batch_args(service, jobs, out, "--concurrency", "3"))
    assert run.returncode == 1, run.stderr
    assert ANSI not in run.stdout + run.stderr
    log = run.stderr
    assert log.count("created task") == 5
    assert log.count(" completed: ") == 4
    assert "job 2 failed [003013095]" in log
    assert "1 × 003013095" in run.stdout
    assert "$0.12" in run.stdout
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in results] == ["completed", "completed", "failed", *["completed"] * 2]
    for record in results:
        for name in record["files"]:
            assert name == f"{record['index']:05d}-{record['task_id']}-0.png"
            assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert_no_secret(out)
    assert service.creates_of(names) == [1] * 5

    again = dreamo(*batch_args(service, jobs, out, "--json"))
    assert again.returncode == 1
    summary = json.loads(again.stdout)
    assert summary["completed"] == 4
    assert summary["skipped"] == 4
    assert summary["failed"] == {"003013095": 1}
    assert summary["exit_code"] == 1
    assert again.stderr.count("already completed") == 4
    assert service.creates_of(names) == [1] * 5


def test_progress_bar_on_a_terminal(service: Service, tmp_path: Path) -> None:
    names = prompts(4)
    jobs = make_jobs(tmp_path, names)
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    args = batch_args(service, jobs, tmp_path / "out", "--api-key-file", str(key_file))
    code, output = run_in_pty([DREAMO, *args], env(DREAMO_API_KEY=""))
    assert code == 0, output
    assert ANSI in output  # drawn, not logged
    assert "━" in output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert "4 running · 0 queued" in plain  # live counts while the tasks ran
    assert "4/4 4 done · 0 failed · 0 running · 0 queued · $0.12 ETA" in plain
    assert "created task" not in plain  # per-job lines are for logs, not for the bar
    assert "summary" in plain
    assert service.creates_of(names) == [1] * 4


def run_in_pty(argv: list[str], environ: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; return (exit code, output)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=slave, env=environ)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=10)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_input_errors_name_file_and_line_and_nothing_is_sent(
    service: Service, tmp_path: Path
) -> None:
    jobs = make_jobs(tmp_path, prompts(1))
    with jobs.open("a") as handle:
        handle.write('{"prompt": "broken", "images": \n')
        handle.write('{"prompt": "x", "images": ["refs/missing.jpg"]}\n')
        handle.write('{"prompt": "x", "images": ["refs/pet.jpg"], "guidance_scale1": 9.5}\n')
    before = service.stats()["create_requests"]
    run = dreamo(*batch_args(service, jobs, tmp_path / "out"))
    assert run.returncode == 2
    assert f"{jobs}:2: not valid JSON" in run.stderr
    assert f"{jobs}:3: image 1 (refs/missing.jpg) does not exist: relative" in run.stderr
    assert f"{jobs}:4: guidance_scale1 must be between 1 and 7; got 9.5" in run.stderr
    assert "nothing was sent" in run.stderr
    assert service.stats()["create_requests"] == before
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(service: Service, tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path, prompts(1))
    no_key = dreamo(*batch_args(service, jobs, tmp_path / "out"), environ=env(DREAMO_API_KEY=""))
    assert no_key.returncode == 2
    assert "no API key" in no_key.stderr
    bad_option = dreamo(*batch_args(service, jobs, tmp_path / "out", "--concurrency", "0"))
    assert bad_option.returncode == 2
    assert "--concurrency" in bad_option.stderr
    no_plain_key = dreamo("batch", str(jobs), "--out", "x", "--api-key", KEY)
    assert no_plain_key.returncode == 2
    assert KEY not in no_plain_key.stderr


def test_a_refused_key_or_an_unreachable_service_exits_3(service: Service, tmp_path: Path) -> None:
    names = prompts(3)
    jobs = make_jobs(tmp_path, names)
    refused = dreamo(
        *batch_args(service, jobs, tmp_path / "a"), environ=env(DREAMO_API_KEY="sk-wrong-key-0000")
    )
    assert refused.returncode == 3, refused.stderr
    assert "stopped" in refused.stderr
    assert "sk-wrong-key-0000" not in refused.stdout + refused.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    unreachable = dreamo(
        "batch", str(jobs), "--out", str(tmp_path / "b"), "--base-url", closed, "--retries", "0"
    )
    assert unreachable.returncode == 3, unreachable.stderr
    assert "could not connect" in unreachable.stderr
    status = dreamo("status", "some-task", "--base-url", closed, "--retries", "0")
    assert status.returncode == 3
    assert service.creates_of(names) == [0, 0, 0]


# --------------------------------------------------------------------------- one task


def test_generate_then_status_and_wait(service: Service, tmp_path: Path) -> None:
    image = str(sample_images()[0])
    prompt = prompts(1)[0]
    run = dreamo(
        "generate", "-p", prompt, "-i", image, "--ref-type", "ip", "--seed", "5",
        "--ddim-steps", "20", "--out", str(tmp_path), "--base-url", service.url,
        "--poll-interval", "0.05",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("task ")
    task_id = run.stderr.split()[1]
    (saved,) = run.stdout.split()
    assert Path(saved) == tmp_path / f"00000-{task_id}-0.png"
    assert Path(saved).read_bytes().startswith(b"\x89PNG")

    status = dreamo("status", task_id, "--json", "--base-url", service.url)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "completed"

    waited = dreamo("wait", task_id, "--out", str(tmp_path / "again"), "--base-url", service.url)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.split() == [str(tmp_path / "again" / f"00000-{task_id}-0.png")]
    assert service.creates_of([prompt]) == [1]

    failed = dreamo(
        "generate", "-p", prompt + " [fail:003013099]", "-i", image, "--json",
        "--base-url", service.url, "--poll-interval", "0.05", "--out", str(tmp_path),
    )  # fmt: skip
    assert failed.returncode == 1
    assert "003013099" in failed.stderr
    out_of_range = dreamo("generate", "-p", "x", "-i", image, "--width", "4000")
    assert out_of_range.returncode == 2


def test_demo_runs_the_batch_engine_on_the_built_in_service() -> None:
    run = dreamo("demo", "--jobs", "6", "--task-ms", "50", environ=env(DREAMO_API_KEY=""))
    assert run.returncode == 0, run.stderr
    assert "2 × 003013095" in run.stdout
    assert "creates at the server │ 6" in run.stdout.replace("  ", " ").replace("  ", " ")


# --------------------------------------------------------------------------- interruptions


def read_until(stream: IO[str], needle: str, count: int, seen: list[str]) -> None:
    """Read lines until ``needle`` was seen ``count`` times (fails after 30 s)."""
    deadline = time.monotonic() + 30
    while sum(needle in line for line in seen) < count:
        assert time.monotonic() < deadline, "".join(seen)
        line = stream.readline()
        assert line, "".join(seen)
        seen.append(line)


def test_a_second_run_is_refused_ctrl_c_exits_130_and_the_rerun_polls_only(
    service: Service, tmp_path: Path
) -> None:
    names = prompts(4, *[" [slow:4000]"] * 4)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    args = [DREAMO, *batch_args(service, jobs, out, "--concurrency", "4")]
    process = subprocess.Popen(args, env=env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen: list[str] = []
    read_until(process.stderr, "created task", 4, seen)
    second = dreamo(*batch_args(service, jobs, out))  # the same journal, while in use
    assert second.returncode == 2
    assert "in use by another run" in second.stderr
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=20) == 130, rest
    process.stderr.close()
    assert "interrupted" in rest
    assert journal_states(out / "dreamo-journal.db") == {"created": 4}

    again = dreamo(*batch_args(service, jobs, out))
    assert again.returncode == 0, again.stderr
    assert "created task" not in again.stderr
    assert again.stderr.count(" completed: ") == 4
    assert service.creates_of(names) == [1] * 4


def test_sigkill_mid_run_then_restart_creates_each_task_exactly_once(
    service: Service, tmp_path: Path
) -> None:
    # Three waves of four jobs: the second wave runs long, so the kill lands while it
    # polls, after the first wave completed (or is downloading) and before the third
    # was sent.
    names = prompts(12, *[" [slow:100]"] * 4, *[" [slow:3000]"] * 4, *[" [slow:100]"] * 4)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    args = [DREAMO, *batch_args(service, jobs, out, "--concurrency", "4")]
    process = subprocess.Popen(args, env=env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen: list[str] = []
    read_until(process.stderr, "created task", 8, seen)
    process.kill()
    assert process.wait(timeout=10) == -signal.SIGKILL
    process.stderr.close()

    before = journal_states(out / "dreamo-journal.db")
    assert before["queued"] == 4
    assert before["created"] >= 4
    assert before["created"] + before["completed"] == 8
    assert service.creates_of(names) == [1] * 8 + [0] * 4

    again = dreamo(*batch_args(service, jobs, out, "--concurrency", "4"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("created task") == 4  # only the third wave
    assert again.stderr.count("already completed") == before["completed"]
    assert service.creates_of(names) == [1] * 12

    assert journal_states(out / "dreamo-journal.db") == {"completed": 12}
    with contextlib.closing(sqlite3.connect(out / "dreamo-journal.db")) as conn:
        rows = conn.execute("SELECT idx, task_id, files, creates FROM jobs").fetchall()
    for index, task_id, files, creates in rows:
        assert creates == 1
        (name,) = json.loads(files)
        assert name == f"{index:05d}-{task_id}-0.png"
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in results] == ["completed"] * 12
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def inject(service: Service, endpoint: str, fault: dict[str, Any]) -> None:
    body = json.dumps({"endpoint": endpoint, "fault": fault}).encode()
    request = urllib.request.Request(f"{service.url}/_fake/inject", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200


def test_a_lost_create_answer_is_reported_and_resent_only_when_asked(
    service: Service, tmp_path: Path
) -> None:
    from dreamo_async.testing import Fault

    names = prompts(2)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    inject(service, "create", Fault.drop_after().to_dict())  # the task exists, the answer is lost
    first = dreamo(*batch_args(service, jobs, out, "--concurrency", "1"))
    assert first.returncode == 1, first.stderr
    assert "job 0 create outcome UNKNOWN" in first.stderr
    assert "NOT sent again" in first.stderr
    assert "--retry-unknown" in first.stderr
    assert service.creates_of(names) == [1, 1]

    again = dreamo(*batch_args(service, jobs, out))
    assert again.returncode == 1
    assert service.creates_of(names) == [1, 1]  # never re-sent silently

    decided = dreamo(*batch_args(service, jobs, out, "--retry-unknown"))
    assert decided.returncode == 0, decided.stderr
    assert service.creates_of(names) == [2, 1]  # the user chose to pay again


def test_generate_shows_a_live_status_line_on_a_terminal(service: Service, tmp_path: Path) -> None:
    image = str(sample_images()[0])
    argv = [DREAMO, "generate", "-p", prompts(1)[0] + " [slow:400]", "-i", image]
    argv += ["--out", str(tmp_path), "--base-url", service.url, "--poll-interval", "0.05"]
    code, output = run_in_pty(argv, env())
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    task_id = plain.split("task ", 1)[1].split()[0]
    assert f"{task_id}: processing" in plain
    assert str(tmp_path / f"00000-{task_id}-0.png") in plain.replace("\r\n", "")


@pytest.mark.usefixtures("journal_fails_at_created")
def test_a_journal_failure_once_jobs_ran_exits_1_not_2(service: Service, tmp_path: Path) -> None:
    """Exit 2 promises nothing was sent; a journal write failing after a create is exit 1.

    In process (click's runner), so that the journal can be made to fail.
    """
    from click.testing import CliRunner

    from dreamo_async.cli import cli

    names = prompts(1)
    jobs = make_jobs(tmp_path, names)
    run = CliRunner().invoke(cli, batch_args(service, jobs, tmp_path / "out"), env=env())
    assert run.exit_code == 1, run.output
    assert "journal write failed: disk I/O error" in run.output
    assert service.creates_of(names) == [1]


def test_ctrl_c_during_status_points_at_the_task_not_at_a_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    import dreamo_async as d
    from dreamo_async.cli import cli

    async def interrupted(self: d.DreamOClient, task_id: str) -> d.Task:
        raise KeyboardInterrupt

    monkeypatch.setattr(d.DreamOClient, "get_task", interrupted)
    run = CliRunner().invoke(cli, ["status", "t123"], env=env())
    assert run.exit_code == 130, run.output
    assert "dreamo status t123" in run.output
    assert "journal" not in run.output


# --------------------------------------------------------------------------- money first


def wait_for_create(service: Service, before: int) -> None:
    deadline = time.monotonic() + 20
    while service.stats()["create_requests"] == before:
        assert time.monotonic() < deadline, "the create never reached the service"
        time.sleep(0.01)


def test_ctrl_c_during_the_create_of_generate_says_a_task_may_exist_and_names_its_request(
    service: Service, tmp_path: Path
) -> None:
    from dreamo_async.testing import Fault

    prompt = prompts(1)[0]
    inject(service, "create", Fault.slow_answer(3000).to_dict())  # the task exists at once
    before = service.stats()["create_requests"]
    argv = [DREAMO, "generate", "-p", prompt, "-i", str(sample_images()[0])]
    argv += ["--out", str(tmp_path), "--base-url", service.url]
    process = subprocess.Popen(argv, env=env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    wait_for_create(service, before)
    time.sleep(0.2)  # the body is at the service; its answer is 3 s away
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=20) == 130, rest
    process.stderr.close()
    assert "no task was created" not in rest
    assert "a task may have been created" in rest
    assert service.creates_of([prompt]) == [1]
    request_ids = service.stats()["creates_by_request_id"]
    (named,) = set(re.findall(r"X-Request-Id ([0-9a-f]{32})", rest))
    assert request_ids.get(named) == 1
    assert "Check with the provider" in rest


def test_ctrl_c_before_the_create_left_says_nothing_was_sent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import dreamo_async as d
    from dreamo_async.cli import cli

    async def interrupted(self: d.DreamOClient, *args: Any, **kwargs: Any) -> d.Task:
        raise KeyboardInterrupt  # before before_send: nothing left this machine

    monkeypatch.setattr(d.DreamOClient, "submit", interrupted)
    image = str(sample_images()[0])
    argv = ["generate", "-p", "x", "-i", image, "--out", str(tmp_path)]
    run = CliRunner().invoke(cli, argv, env=env())
    assert run.exit_code == 130, run.output
    assert "nothing was sent" in run.output


def test_an_unusable_out_folder_is_a_usage_error_before_anything_is_sent(
    service: Service, tmp_path: Path
) -> None:
    image = str(sample_images()[0])
    names = prompts(1)
    stats = service.stats()
    generate = dreamo(
        "generate", "-p", names[0], "-i", image, "--out", "/proc/nonexistent",
        "--base-url", service.url,
    )  # fmt: skip
    assert generate.returncode == 2, generate.stderr
    assert "cannot write into /proc/nonexistent" in generate.stderr
    assert "Traceback" not in generate.stderr
    wait = dreamo("wait", "t-123", "--out", "/proc/nonexistent", "--base-url", service.url)
    assert wait.returncode == 2, wait.stderr
    assert "cannot write into /proc/nonexistent" in wait.stderr
    jobs = make_jobs(tmp_path, names)
    batch = dreamo(*batch_args(service, jobs, Path("/proc/nonexistent")))
    assert batch.returncode == 2, batch.stderr
    assert "Traceback" not in batch.stderr
    journal = dreamo(
        *batch_args(service, jobs, tmp_path / "out", "--journal", "/proc/nonexistent/j.db")
    )
    assert journal.returncode == 2, journal.stderr
    assert "--journal" in journal.stderr
    after = service.stats()
    assert after["create_requests"] == stats["create_requests"]  # nothing was sent
    assert after["polls"] == stats["polls"]
    created = dreamo(
        "generate", "-p", names[0], "-i", image, "--out", str(tmp_path / "new" / "folder"),
        "--base-url", service.url, "--poll-interval", "0.05",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr  # a missing folder is made, as before
    assert len(list((tmp_path / "new" / "folder").glob("*.png"))) == 1


def test_rps_auto_is_a_rate(service: Service, tmp_path: Path) -> None:
    names = prompts(2)
    jobs = make_jobs(tmp_path, names)
    run = dreamo(*batch_args(service, jobs, tmp_path / "out", "--rps", "auto"))
    assert run.returncode == 0, run.stderr
    assert service.creates_of(names) == [1, 1]
    for wrong in ("0", "-3", "fast", "inf"):
        refused = dreamo(*batch_args(service, jobs, tmp_path / "out", "--rps", wrong))
        assert refused.returncode == 2, (wrong, refused.stderr)
        assert "give a number > 0 or 'auto'" in refused.stderr
