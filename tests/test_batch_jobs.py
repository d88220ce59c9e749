"""Jobs files (batch/jobs.py): read and checked whole before anything is sent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import dreamo_async as d
from dreamo_async.batch import BatchJob, JobsFileError, load_jobs, run_batch
from dreamo_async.testing import FakeDreamOServer, make_jpeg, make_png

KEY = "sk-test-0123456789abcdef"
FAST_POLL = d.PollPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.0, timeout=10)
PNG = make_png(64, 64)


def test_load_jobs_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(PNG)
    (tmp_path / "fake.jpg").write_bytes(b"<html>not an image</html>")
    lines = [
        '{"prompt": "fine", "images": ["ok.png"]}',
        "{not json",
        "",
        '{"prompt": "x", "images": ["missing.png"]}',
        '{"prompt": "x", "images": ["ok.png"], "ddim_steps": 99}',
        '{"prompt": "x", "images": ["fake.jpg"]}',
        '{"prompt": "x", "images": ["ok.png"], "colour": "red"}',
        "[1, 2]",
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobsFileError) as caught:
        load_jobs(jobs_file)
    problems = caught.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{jobs_file}:{n}" for n in (2, 4, 5, 6, 7, 8)
    ]
    assert "not valid JSON" in problems[0]
    assert problems[1].endswith(
        ": image 1 (missing.png) does not exist: relative paths are resolved against the "
        f"jobs file's folder, {tmp_path}"
    )
    assert "ddim_steps must be between 1 and 50; got 99" in problems[2]
    assert "HTML" in problems[3]
    assert "colour" in problems[4]
    assert "expected a JSON object" in problems[5]


def test_load_jobs_reports_image_problems_in_the_librarys_words(tmp_path: Path) -> None:
    """The jobs file check reads images as a run would: real sizes, right index, schemes."""
    (tmp_path / "ok.png").write_bytes(PNG)
    with (tmp_path / "big.jpg").open("wb") as handle:  # sparse: 20 MB on paper, not on disk
        handle.write(make_jpeg(8, 8))
        handle.truncate(20_001_280)
    (tmp_path / "notes.jpg").write_bytes(b"GIF89a" + bytes(64))
    lines = [
        '{"prompt": "x", "images": ["ok.png", "big.jpg"]}',
        '{"prompt": "x", "images": ["ok.png", "notes.jpg"]}',
        '{"prompt": "x", "images": ["ok.png", "ftp://host/a.jpg"]}',
        '{"prompt": "x", "images": ["big.jpg"]}',
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobsFileError) as caught:
        load_jobs(jobs_file)
    assert caught.value.problems == [
        f"{jobs_file}:1: image 2 (big.jpg) is 20,001,280 bytes; the limit is 4,700,000 bytes "
        "(Limits.max_image_bytes)",
        f"{jobs_file}:2: image 2 (notes.jpg) is GIF; the service accepts JPEG or PNG",
        f"{jobs_file}:3: image 2 (host/a.jpg) is a ftp: URL; only http:// and https:// URLs "
        "are accepted (or a pathlib.Path, bytes, a file object, a data URI)",
        f"{jobs_file}:4: image 1 (big.jpg) is 20,001,280 bytes; the limit is 4,700,000 bytes "
        "(Limits.max_image_bytes)",
    ]


def test_load_jobs_resolves_relative_images_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.jpg").write_bytes(make_jpeg(800, 600))
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('\n{"prompt": "p", "images": ["refs/a.jpg"], "seed": 3}\n')
    (job,) = load_jobs(jobs_file)
    assert job.index == 0
    assert job.line == 2
    assert job.params["images"] == [str(tmp_path / "refs" / "a.jpg")]
    assert job.params["seed"] == 3


def test_load_jobs_refuses_text_that_cannot_be_sent_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(PNG)
    good = json.dumps({"prompt": "fine", "images": ["ref.png"]})
    bad = json.dumps({"prompt": "a cat \ud800", "images": ["ref.png"]})  # "\\ud800" in JSON
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f"{good}\n{bad}\n")
    with pytest.raises(JobsFileError) as info:
        load_jobs(jobs)
    (problem,) = info.value.problems
    assert problem.startswith(f"{jobs}:2: ")
    assert "prompt" in problem
    assert "surrogate" in problem


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(PNG)
    jobs_file = tmp_path / "jobs.jsonl"
    line = json.dumps({"prompt": "p", "images": ["ref.png"]})
    jobs_file.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")  # as Notepad saves it
    (job,) = load_jobs(jobs_file)
    assert (job.line, job.params["prompt"]) == (1, "p")


def test_a_json_error_names_its_own_line_and_column(tmp_path: Path) -> None:
    """A JSON string may hold U+2028 or U+0085 as they are: they do not end a line."""
    (tmp_path / "ref.png").write_bytes(PNG)
    odd = '{"prompt": "one\u2028two\x85three", "images": ["ref.png"]}'
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(f"{odd}\n\n" + '{"prompt": "p", "images": ["ref.png"],}\n')
    with pytest.raises(JobsFileError) as caught:
        load_jobs(jobs_file)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{jobs_file}:3: not valid JSON: ")
    # the decoder's own column: 39 (after the comma) up to 3.12, 38 (the comma) from 3.13
    assert re.search(r"\(column 3[89]\)$", problem), problem
    assert "line 1" not in problem  # the decoder's own line count is the line's, not the file's
    jobs_file.write_text(f"{odd}\n")
    (job,) = load_jobs(jobs_file)
    assert job.params["prompt"] == "one\u2028two\x85three"


def test_a_missing_relative_image_names_the_folder_it_was_looked_for_in(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    jobs_file = tmp_path / "jobs" / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "p", "images": ["refs/a.png"]}\n')
    with pytest.raises(JobsFileError) as caught:
        load_jobs(jobs_file)
    (problem,) = caught.value.problems
    assert problem == (
        f"{jobs_file}:1: image 1 (refs/a.png) does not exist: relative paths are resolved "
        f"against the jobs file's folder, {tmp_path / 'jobs'}"
    )


async def test_the_request_load_jobs_checked_is_the_one_sent(tmp_path: Path) -> None:
    """The run sends the checked request; it does not build another from the line."""
    (tmp_path / "ref.png").write_bytes(PNG)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(json.dumps({"prompt": "from the file", "images": ["ref.png"]}) + "\n")
    (job,) = load_jobs(jobs_file)
    assert isinstance(job.request, d.GenerationRequest)
    assert job.request.prompt == "from the file"
    # Proof by difference: a job whose params and request disagree sends the request.
    other = BatchJob(0, {**job.params, "prompt": "rebuilt"}, line=1, request=job.request)
    async with (
        FakeDreamOServer(api_key=KEY, task_duration_ms=10) as server,
        d.DreamOClient(api_key=KEY, base_url=server.url, poll=FAST_POLL) as client,
    ):
        report = await run_batch(client, [other], tmp_path / "j.db", tmp_path / "out")
    assert report.ok
    assert server.stats.creates_by_prompt == {"from the file": 1}
