"""The CLI's consistent surface (issue 16), in subprocesses against the fake service:
exit 2 for every input error with nothing sent, a JSON error object under ``--json``,
SIGTERM handled like Ctrl-C, warnings as ``file:line: warning:`` lines, and messages
that name the CLI's options rather than the Python API's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dreamo_async.testing import sample_images

from .test_cli import (
    DREAMO,
    KEY,
    Service,
    batch_args,
    dreamo,
    env,
    journal_states,
    make_jobs,
    prompts,
    read_until,
    service,
)

__all__ = ["service"]  # the fixture, used by name

pytestmark = pytest.mark.slow


def test_a_bad_image_is_an_input_error_exit_2_and_nothing_is_sent(
    service: Service, tmp_path: Path
) -> None:
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("just text, not a picture\n")
    before = service.stats()["create_requests"]
    run = dreamo(
        "generate", "-p", prompts(1)[0], "-i", str(not_an_image), "--out", str(tmp_path),
        "--base-url", service.url, "--json",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "nothing was sent" in run.stderr
    assert "Traceback" not in run.stderr
    error = json.loads(run.stdout)
    assert error["ok"] is False
    assert error["exit_code"] == 2
    assert error["error"]["type"] == "ImageError"
    assert error["error"]["money_state"] == "not_sent"
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "x", "images": ["notes.jpg"]}) + "\n")
    batch = dreamo(*batch_args(service, jobs, tmp_path / "out"), "--json")
    assert batch.returncode == 2, batch.stderr
    assert f"{jobs}:1: image 1" in json.loads(batch.stdout)["error"]["message"]
    assert service.stats()["create_requests"] == before


def test_json_failures_print_an_error_object_on_stdout(service: Service, tmp_path: Path) -> None:
    image = str(sample_images()[0])
    failed = dreamo(
        "generate", "-p", prompts(1)[0] + " [fail:003013099]", "-i", image, "--json",
        "--base-url", service.url, "--poll-interval", "0.05", "--out", str(tmp_path),
    )  # fmt: skip
    assert failed.returncode == 1
    error = json.loads(failed.stdout)
    assert error["exit_code"] == 1
    assert error["error"]["type"] == "TaskFailedError"
    assert error["error"]["task_id"]
    assert "003013099" in error["error"]["message"]

    usage = dreamo("generate", "-p", "x", "-i", image, "--width", "4000", "--json")
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["error"]["type"] == "UsageError"
    assert "--width" in usage.stderr

    no_key = dreamo("status", "t-1", "--json", environ=env(DREAMO_API_KEY=""))
    assert no_key.returncode == 2
    assert "no API key" in json.loads(no_key.stdout)["error"]["message"]

    ok = dreamo("status", "no-such-task", "--json", "--base-url", service.url)
    assert ok.returncode == 1
    assert json.loads(ok.stdout)["exit_code"] == 1


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    run = dreamo("status", "t-1", "--base-url", "http://127.0.0.1:99999", "--json")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "99999" in run.stderr
    assert json.loads(run.stdout)["exit_code"] == 2


def test_sigterm_is_handled_like_ctrl_c_and_the_hint_names_out(
    service: Service, tmp_path: Path
) -> None:
    names = prompts(3, *[" [slow:4000]"] * 3)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    args = [DREAMO, *batch_args(service, jobs, out, "--concurrency", "3")]
    process = subprocess.Popen(args, env=env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    seen: list[str] = []
    read_until(process.stderr, "created task", 3, seen)
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=20) == 143, rest
    process.stderr.close()
    assert "terminated" in rest
    assert f"--out {out}" in rest
    assert journal_states(out / "dreamo-journal.db") == {"created": 3}

    again = dreamo(*batch_args(service, jobs, out))
    assert again.returncode == 0, again.stderr
    assert "created task" not in again.stderr  # polled, never created twice
    assert service.creates_of(names) == [1] * 3


def test_ctrl_c_hint_of_a_batch_names_its_out_folder(service: Service, tmp_path: Path) -> None:
    names = prompts(2, *[" [slow:4000]"] * 2)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    args = [DREAMO, *batch_args(service, jobs, out, "--concurrency", "2")]
    process = subprocess.Popen(args, env=env(), stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    read_until(process.stderr, "created task", 2, [])
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=20) == 130, rest
    process.stderr.close()
    assert f"resume with: dreamo batch {jobs} --out {out}" in rest


def test_warnings_are_one_line_each_with_the_jobs_file_line(
    service: Service, tmp_path: Path
) -> None:
    long = "a very long prompt " * 20  # past the ~300 characters the service recommends
    names = prompts(2)
    names[1] = long + names[1]
    jobs = make_jobs(tmp_path, names)
    run = dreamo(*batch_args(service, jobs, tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert f"{jobs}:2: warning: prompt is {len(names[1])} characters" in run.stderr
    assert run.stderr.count("warning:") == 1
    assert "DreamOWarning" not in run.stderr
    assert "warnings.warn" not in run.stderr

    one = dreamo(
        "generate", "-p", long, "-i", str(sample_images()[0]), "--out", str(tmp_path),
        "--base-url", service.url, "--poll-interval", "0.05",
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    warning = [line for line in one.stderr.splitlines() if "warning" in line]
    assert warning == [warning[0]]
    assert warning[0].startswith(f"warning: prompt is {len(long)} characters")


def test_private_url_messages_name_the_option_and_the_option_allows_them(
    service: Service, tmp_path: Path
) -> None:
    image = str(sample_images()[0])
    first = dreamo(
        "generate", "-p", prompts(1)[0], "-i", image, "--json", "--out", str(tmp_path),
        "--base-url", service.url, "--poll-interval", "0.05",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    (url,) = json.loads(first.stdout)["image_urls"]  # served by the fake, on 127.0.0.1
    prompt = prompts(1)[0]
    # A path and a URL: the client downloads the URL (only URLs go to the service as such).
    common = ["-p", prompt, "-i", image, "-i", url, "--out", str(tmp_path / "b")]
    common += ["--base-url", service.url]
    refused = dreamo("generate", *common, "--poll-interval", "0.05")
    assert refused.returncode == 2, refused.stderr
    assert "--allow-private-urls" in refused.stderr
    assert "DreamOClient(" not in refused.stderr
    assert service.creates_of([prompt]) == [0]
    allowed = dreamo("generate", *common, "--poll-interval", "0.05", "--allow-private-urls")
    assert allowed.returncode == 0, allowed.stderr
    assert service.creates_of([prompt]) == [1]


def test_dreamo_log_turns_the_library_logs_on(service: Service, tmp_path: Path) -> None:
    argv = ["generate", "-p", prompts(1)[0], "-i", str(sample_images()[0])]
    argv += ["--out", str(tmp_path), "--base-url", service.url, "--poll-interval", "0.05"]
    logged = dreamo(*argv, environ=env(DREAMO_LOG="info"))
    assert logged.returncode == 0, logged.stderr
    assert "INFO dreamo_async: created task" in logged.stderr
    assert KEY not in logged.stderr
    quiet = dreamo(*argv)
    assert "INFO" not in quiet.stderr
    wrong = dreamo(*argv, environ=env(DREAMO_LOG="loud"))
    assert wrong.returncode == 0
    assert "warning: DREAMO_LOG='loud' is not one of debug, info, warning, error" in wrong.stderr


def test_without_the_cli_extra_the_command_prints_the_install_hint() -> None:
    code = "import sys; sys.modules['click'] = None; from dreamo_async.cli import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 2, run.stderr
    assert "pip install 'dreamo_async[cli]'" in run.stderr
    assert "Traceback" not in run.stderr
