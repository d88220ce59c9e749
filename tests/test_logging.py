"""Logging: one DEBUG line per request (never the key), INFO at a task's end,
``DREAMO_LOG`` turning the loggers on, and a 404 that names the URL that answered it."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

import dreamo_async as d
from dreamo_async._logging import configure_from_env
from dreamo_async.testing import FakeDreamOServer, make_png

KEY = "sk-test-logging-0123456789abcdef"
PNG = make_png(64, 64)
NO_WAIT = d.RetryPolicy(initial_delay=0, max_delay=0)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=0) as fake:
        yield fake


async def test_one_debug_line_per_request_without_the_key(
    server: FakeDreamOServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dreamo_async")
    async with d.DreamOClient(api_key=KEY, base_url=server.url, retry=NO_WAIT) as client:
        result = await client.generate(prompt="p", images=[PNG])
    lines = [r.getMessage() for r in caplog.records if r.name == "dreamo_async.transport"]
    assert len(lines) == server.stats.creates + server.stats.polls
    assert any(
        line.startswith("POST /model/v1/generation -> 200") and result.task_id in line
        for line in lines
    )
    assert any(
        line.startswith(f"GET /model/v1/generation/task/{result.task_id} -> 200") for line in lines
    )
    assert all(line.endswith(" ms") for line in lines)
    assert all(KEY not in r.getMessage() for r in caplog.records)
    ended = [r for r in caplog.records if r.levelno == logging.INFO and "ended" in r.getMessage()]
    assert [r.name for r in ended] == ["dreamo_async"]


async def test_a_404_from_a_wrong_path_names_the_url(server: FakeDreamOServer) -> None:
    async with d.DreamOClient(
        api_key=KEY, base_url=server.url + "/wrong-prefix", retry=NO_WAIT
    ) as client:
        with pytest.raises(d.NotFoundError) as caught:
            await client.get_task("fake1")
    assert "/wrong-prefix/model/v1/generation/task/fake1 answered 404" in str(caught.value)
    assert "base_url" in str(caught.value)


def test_dreamo_log_sets_a_handler_only_when_it_names_a_level() -> None:
    logger = logging.getLogger("dreamo_async")
    level, handlers = logger.level, list(logger.handlers)
    try:
        assert configure_from_env("") is None
        assert configure_from_env("loud") is None  # a typo never breaks an import
        handler = configure_from_env("debug")
        assert handler is not None
        assert handler in logger.handlers
        assert logger.level == logging.DEBUG
        again = configure_from_env("info")  # replaces, never stacks
        assert again is not None
        assert handler not in logger.handlers
        assert logger.level == logging.INFO
    finally:
        for added in set(logger.handlers) - set(handlers):
            logger.removeHandler(added)
        logger.setLevel(level)


def test_dreamo_log_in_the_environment_is_read_at_import() -> None:
    code = (
        "import logging, dreamo_async;"
        "l = logging.getLogger('dreamo_async');"
        "print(l.level, len(l.handlers))"
    )
    with_var = subprocess.run(
        [sys.executable, "-c", code],
        env={"DREAMO_LOG": "debug", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    without = subprocess.run(
        [sys.executable, "-c", code], env={"PATH": ""}, capture_output=True, text=True, check=True
    )
    assert with_var.stdout.split() == [str(logging.DEBUG), "1"]
    assert without.stdout.split() == ["0", "0"]
