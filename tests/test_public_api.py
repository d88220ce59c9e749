"""The public surface: ``dreamo_async.__all__`` pinned (as httpx's test_exported_members),
the typed keywords of the calls (a type checker catches a misspelt one), and the public
names of issue 15 ("Public API, while it is 0.x")."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_type_hints

import attrs
import pytest

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, make_png

from .helpers import KEY, client_for

PNG = make_png(32, 32)

#: Every public name; a change here is a change of the public API (say it in the CHANGELOG).
EXPORTED = [
    "DEFAULT_LIMITS",
    "MULTI_IP_MODEL",
    "NOT_GIVEN",
    "PROVIDER_ERROR_CODES",
    "SINGLE_IMAGE_MODEL",
    "SIZE_PRESETS",
    "APIConnectionError",
    "APIError",
    "AdaptiveLimiter",
    "AuthenticationError",
    "BatchItem",
    "BatchProgress",
    "BudgetExceededError",
    "CallerDisconnectedError",
    "CheckPolicy",
    "ClientClosedError",
    "ClientStatistics",
    "ConfigurationError",
    "Coordinator",
    "CreateOutcomeUnknownError",
    "DownloadError",
    "DreamOClient",
    "DreamOError",
    "DreamOWarning",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "ImageError",
    "ImageInfo",
    "ImageSource",
    "InvalidRequestError",
    "JobSlots",
    "JobsFileError",
    "JournalError",
    "Limits",
    "LimitsBackendError",
    "LocalCoordinator",
    "MoneyState",
    "NotFoundError",
    "NotGiven",
    "OutputImage",
    "PermissionDeniedError",
    "PollPolicy",
    "Priority",
    "RateLimitError",
    "RateLimiter",
    "RedisCoordinator",
    "RefType",
    "RephraserLevel",
    "ResponseFormatError",
    "RetryPolicy",
    "ServerError",
    "Spending",
    "Task",
    "TaskError",
    "TaskFailedError",
    "TaskStatus",
    "TaskTimeoutError",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
    "Usage",
    "__version__",
    "cancel_on_disconnect",
    "set_testing",
]


def test_all_is_pinned() -> None:
    assert sorted(d.__all__) == sorted(EXPORTED)
    assert len(set(d.__all__)) == len(d.__all__)


def test_every_public_name_is_exported_and_importable() -> None:
    public = {
        name
        for name, value in vars(d).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(d.__all__)
    for name in d.__all__:
        assert getattr(d, name) is not None


def test_generation_params_are_the_request_fields() -> None:
    """One keyword list: the TypedDict of the calls and the request class agree."""
    fields = {field.name for field in attrs.fields(d.GenerationRequest)} - {"limits"}
    assert set(get_type_hints(d.GenerationParams)) == fields
    assert d.GenerationParams.__required_keys__ == frozenset()


def test_not_given_is_public_and_the_default_of_timeout() -> None:
    for call in (d.DreamOClient.generate, d.DreamOClient.wait, d.DreamOClient.generate_many):
        assert inspect.signature(call).parameters["timeout"].default is d.NOT_GIVEN
    assert isinstance(d.NOT_GIVEN, d.NotGiven)
    assert not d.NOT_GIVEN
    assert repr(d.NOT_GIVEN) == "NOT_GIVEN"


def test_the_jitter_seed_is_not_named_like_the_image_seed() -> None:
    parameters = inspect.signature(d.DreamOClient).parameters
    assert "jitter_seed" in parameters
    assert "seed" not in parameters
    d.DreamOClient(api_key=KEY, jitter_seed=7)


def test_a_limiter_and_a_rate_together_are_refused() -> None:
    with pytest.raises(d.ConfigurationError, match="limiter= or requests_per_second="):
        d.DreamOClient(api_key=KEY, limiter=d.UnlimitedLimiter(), requests_per_second=5)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:0"])
def test_a_port_out_of_range_is_a_configuration_error(url: str) -> None:
    with pytest.raises(d.ConfigurationError, match=r"(?i)port"):
        d.DreamOClient(api_key=KEY, base_url=url)


def test_the_single_image_model_says_exactly_1_reference_image() -> None:
    with pytest.raises(d.InvalidRequestError) as caught:
        d.GenerationRequest(prompt="p", images=[PNG, PNG], model=d.SINGLE_IMAGE_MODEL)
    assert "takes exactly 1 reference image; got 2" in str(caught.value)


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=30) as fake:
        yield fake


@pytest.mark.parametrize(
    ("keyword", "hint"),
    [
        ("steps", "did you mean ddim_steps?"),
        ("widht", "did you mean width?"),
        ("limits", "DreamOClient(limits="),
    ],
)
async def test_an_unknown_keyword_names_the_closest_and_sends_nothing(
    server: FakeDreamOServer, keyword: str, hint: str
) -> None:
    async with client_for(server) as client:
        for call in (client.generate, client.submit):
            with pytest.raises(d.InvalidRequestError) as caught:
                await call(prompt="p", images=[PNG], **{keyword: 10})  # type: ignore[arg-type]
            assert caught.value.parameter == keyword
            assert hint in str(caught.value)
        raw: Any = {"prompt": "p", "images": [PNG], keyword: 1}  # as read from a file
        (item,) = [item async for item in client.generate_many([raw])]
        assert isinstance(item.error, d.InvalidRequestError)
        assert hint in str(item.error)
    assert server.stats.create_requests == 0


async def test_generate_calls_on_poll_with_every_snapshot(server: FakeDreamOServer) -> None:
    seen: list[d.Task] = []
    async with client_for(server) as client:
        result = await client.generate(prompt="p", images=[PNG], on_poll=seen.append)
    assert seen[0].id == result.task_id
    assert seen[-1].status is d.TaskStatus.COMPLETED
    assert len(seen) == server.stats.polls + 1  # the create's answer, then each poll


SNIPPET = """
import dreamo_async as d

U = ["https://example.com/a.png"]

async def good(client: d.DreamOClient) -> d.GenerationResult:
    return await client.generate(prompt="p", images=U, width=1024, seed=7)

async def typo(client: d.DreamOClient) -> d.GenerationResult:
    return await client.generate(prompt="p", images=U, widht=1024)  # line 10

async def wrong_type(client: d.DreamOClient) -> d.Task:
    return await client.submit(prompt="p", images=U, seed="7")  # line 13

def many(client: d.DreamOClient) -> object:
    return client.generate_many([{"prompt": "p", "images": U, "ddim_step": 3}])  # line 16
"""


def test_mypy_strict_catches_a_misspelt_or_mistyped_keyword(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    snippet = tmp_path / "user_code.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    errors = [line for line in completed.stdout.splitlines() if ": error:" in line]
    lines = sorted({int(line.split(":")[1]) for line in errors})
    assert lines == [10, 13, 16], completed.stdout
    assert "widht" in completed.stdout
