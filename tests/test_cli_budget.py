"""``dreamo batch --max-spend`` / ``--dry-run`` and ``dreamo generate --max-spend``, end to end.

The ``dreamo`` command runs in a subprocess against the fake service in another process
(the fixtures and helpers of test_cli.py); every task there costs $0.03.
"""

from __future__ import annotations

import json
from pathlib import Path

from .test_cli import (
    Service,
    batch_args,
    dreamo,
    env,
    journal_states,
    make_jobs,
    prompts,
    service,
)

__all__ = ["service"]  # the fixture, used by name


def test_dry_run_checks_the_file_estimates_and_sends_nothing(
    service: Service, tmp_path: Path
) -> None:
    names = prompts(5)
    jobs = make_jobs(tmp_path, names)
    before = service.stats()["create_requests"]
    environ = env()
    del environ["DREAMO_API_KEY"]  # no key needed: nothing is sent
    args = batch_args(service, jobs, tmp_path / "out", "--dry-run", "--expected-cost", "0.03")
    run = dreamo(*args, "--json", environ=environ)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["jobs"] == 5
    assert summary["estimate"] == "0.15"
    assert summary["sent"] == 0
    assert service.stats()["create_requests"] == before
    assert not (tmp_path / "out" / "dreamo-journal.db").exists()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "images": ["missing.png"]}\n')
    bad = dreamo(*batch_args(service, tmp_path / "bad.jsonl", tmp_path / "o2", "--dry-run"))
    assert bad.returncode == 2
    assert "nothing was sent" in bad.stderr


def test_a_cap_stop_leaves_jobs_not_started_and_a_resume_with_more_room_runs_them(
    service: Service, tmp_path: Path
) -> None:
    names = prompts(5)
    jobs = make_jobs(tmp_path, names)
    out = tmp_path / "out"
    cap = ("--max-spend", "0.07", "--expected-cost", "0.03")
    first = dreamo(*batch_args(service, jobs, out, "--concurrency", "4", *cap))
    assert first.returncode == 1, first.stderr
    assert "3 × budget" in first.stdout
    assert "$0.06 of $0.07" in first.stdout
    assert journal_states(out / "dreamo-journal.db") == {"completed": 2, "queued": 3}
    assert sorted(service.creates_of(names)) == [0, 0, 0, 1, 1]

    # The dry run learns the cost per job from the journal.
    dry = dreamo(*batch_args(service, jobs, out, "--dry-run", "--json"))
    assert json.loads(dry.stdout)["cost_per_job"] == "0.03"

    # The cap is the batch's, earlier runs included: $0.15 fits all five, exactly.
    again = dreamo(*batch_args(service, jobs, out, "--max-spend", "0.15", "--json"))
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["completed"], summary["skipped"]) == (5, 2)
    assert summary["cost"] == "0.15"
    assert service.creates_of(names) == [1] * 5  # nothing created twice


def test_generate_refuses_a_task_over_its_cap(service: Service, tmp_path: Path) -> None:
    names = prompts(1)
    make_jobs(tmp_path, names)
    image = next((tmp_path / "refs").iterdir())
    run = dreamo(
        *("generate", "-p", names[0], "-i", str(image), "--base-url", service.url),
        *("--out", str(tmp_path), "--max-spend", "0.01", "--expected-cost", "0.03"),
    )
    assert run.returncode == 1
    assert "nothing was sent" in run.stderr
    assert service.creates_of(names) == [0]
