"""FakeDreamOServer over real HTTP, spoken to with a raw aiohttp client.

The fake is the yardstick of every other test: if it accepted what the service
refuses, or timed tasks wrongly, client tests would prove nothing. So it is
tested on its own, without the client library, against API.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email.utils
import io
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from PIL import Image

from dreamo_async.limits import DEFAULT_LIMITS
from dreamo_async.testing import (
    CREATE_PATH,
    FakeDreamOServer,
    Fault,
    ServerStats,
    image_info,
    make_jpeg,
    make_png,
    sample_images,
)
from dreamo_async.testing.pytest_plugin import ServerFactory

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = make_png(32, 32)
PNG_B64 = base64.b64encode(PNG).decode()
JSON = dict[str, Any]


class FakeClock:
    """A server clock the test moves by hand: lifecycle tests without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000.0


def create_body(model: str = "spark_multi_dreamo", **params: Any) -> JSON:
    """A valid create body; keyword ``None`` removes a parameter."""
    merged: JSON = {"prompt": "a cat", "binary_data_base64": [PNG_B64], **params}
    return {
        "model": model,
        "input": [{"params": {k: v for k, v in merged.items() if v is not None}}],
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def post(
    http: aiohttp.ClientSession,
    server: FakeDreamOServer,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.post(
        server.url + CREATE_PATH, json=body, headers=AUTH if headers is None else headers
    ) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def create(http: aiohttp.ClientSession, server: FakeDreamOServer, **params: Any) -> JSON:
    status, data = await post(http, server, create_body(**params))
    assert status == 200, data
    assert isinstance(data, dict)
    return data


async def poll(http: aiohttp.ClientSession, server: FakeDreamOServer, task_id: str) -> JSON:
    async with http.get(f"{server.url}/model/v1/generation/task/{task_id}", headers=AUTH) as r:
        assert r.status == 200, await r.text()
        data: JSON = await r.json()
        return data


# ------------------------------------------------------------------ lifecycle of the server


async def test_listens_on_a_random_port_and_closes() -> None:
    server = FakeDreamOServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    await server.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
        assert server.port != 0
        assert server.url.endswith(f":{server.port}")
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
    finally:
        await server.close()
    await server.close()  # idempotent
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(server.url + "/_fake/stats")


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="output_layout"):
        FakeDreamOServer(output_layout="nested")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status_words"):
        FakeDreamOServer(status_words={"running": "x"})
    with pytest.raises(ValueError, match="api_key"):
        FakeDreamOServer(api_key="")


# ------------------------------------------------------------------ authentication


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
async def test_bad_key_is_401_json(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, data = await post(http, dreamo_server, create_body(), headers=headers)
    assert status == 401
    assert data["error"]["code"] == "401"
    async with http.get(f"{dreamo_server.url}/model/v1/generation/task/x", headers=headers) as r:
        assert r.status == 401
    assert dreamo_server.stats.refused == {"auth": 2}
    assert dreamo_server.stats.creates_refused == {"auth": 1}
    assert dreamo_server.stats.creates == 0


async def test_api_key_none_accepts_any_bearer(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await dreamo_server_factory(api_key=None)
    status, _ = await post(http, server, create_body(), headers={"Authorization": "Bearer x"})
    assert status == 200
    status, _ = await post(http, server, create_body(), headers={})
    assert status == 401


async def test_last_request_keeps_headers_and_body(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    headers = {**AUTH, "X-Request-Id": "rid-1"}
    async with http.post(dreamo_server.url + CREATE_PATH, json=create_body(), headers=headers) as r:
        assert r.headers["X-Request-Id"] == "rid-1"  # echoed, like a tracing proxy
    recorded = dreamo_server.last_request("create")
    assert recorded is not None
    assert recorded.method == "POST"
    assert recorded.path == CREATE_PATH
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    assert dreamo_server.last_create_headers is not None
    assert dreamo_server.last_create_headers["X-Request-Id"] == "rid-1"
    assert dreamo_server.last_create_body == create_body()
    # refused bodies are recorded too: wire-format tests need them most
    await post(http, dreamo_server, create_body(ddim_steps=0))
    assert dreamo_server.last_create_body["input"][0]["params"]["ddim_steps"] == 0
    assert dreamo_server.last_request("poll") is None


# ------------------------------------------------------------------ validation


def _params(**changes: Any) -> JSON:
    return create_body(**changes)


REFUSALS: list[tuple[str, Any, str, str, str]] = [
    # (id, body, error code, reason counted, text the message must contain)
    ("no-prompt", _params(prompt=None), "003013001", "prompt", "prompt"),
    ("blank-prompt", _params(prompt="  "), "003013001", "prompt", "prompt"),
    ("prompt-not-str", _params(prompt=5), "003013004", "prompt", "prompt=5"),
    ("no-image", _params(binary_data_base64=None), "003013002", "images", "image"),
    ("empty-images", _params(binary_data_base64=[]), "003013002", "binary_data_base64", "empty"),
    (
        "both-image-kinds",
        _params(image_urls=["https://example.com/a.png"]),
        "003013004",
        "images",
        "not both",
    ),
    (
        "six-images",
        _params(binary_data_base64=[PNG_B64] * 6),
        "003013004",
        "binary_data_base64",
        "6 images",
    ),
    (
        "single-model-two-images",
        create_body("spark_dreamo", binary_data_base64=[PNG_B64] * 2),
        "003013004",
        "binary_data_base64",
        "exactly 1",
    ),
    (
        "not-base64",
        _params(binary_data_base64=["@@@"]),
        "003013004",
        "binary_data_base64",
        "base64",
    ),
    (
        "gif",
        _params(binary_data_base64=[base64.b64encode(b"GIF89a" + b"\0" * 30).decode()]),
        "003013004",
        "binary_data_base64",
        "not a JPEG or PNG",
    ),
    (
        "too-many-pixels",
        _params(binary_data_base64=[base64.b64encode(make_png(4097, 1)).decode()]),
        "003013004",
        "binary_data_base64",
        "4097x1",
    ),
    (
        "url-not-http",
        _params(binary_data_base64=None, image_urls=["ftp://x/y.png"]),
        "003013004",
        "image_urls",
        "ftp://",
    ),
    (
        "ref-types-length",
        _params(ref_type_list=["IP", "ID"]),
        "003013004",
        "ref_type_list",
        "ref_type_list",
    ),
    ("ref-type-value", _params(ref_type_list=["FACE"]), "003013004", "ref_type_list", "'FACE'"),
    (
        "guidance-low",
        _params(guidance_scale1=0.5),
        "003013004",
        "guidance_scale1",
        "guidance_scale1=0.5",
    ),
    (
        "guidance-high",
        _params(guidance_scale2=7.5),
        "003013004",
        "guidance_scale2",
        "guidance_scale2=7.5",
    ),
    (
        "guidance-str",
        _params(guidance_scale1="3"),
        "003013004",
        "guidance_scale1",
        "guidance_scale1='3'",
    ),
    ("guidance-bool", _params(guidance_scale1=True), "003013004", "guidance_scale1", "True"),
    ("steps-zero", _params(ddim_steps=0), "003013004", "ddim_steps", "ddim_steps=0"),
    ("steps-high", _params(ddim_steps=51), "003013004", "ddim_steps", "ddim_steps=51"),
    ("steps-float", _params(ddim_steps=12.0), "003013004", "ddim_steps", "ddim_steps=12.0"),
    ("width-low", _params(width=511), "003013004", "width", "width=511"),
    ("height-high", _params(height=2049), "003013004", "height", "height=2049"),
    ("swap-face-str", _params(swap_face="yes"), "003013004", "swap_face", "swap_face='yes'"),
    ("rephraser-int", _params(use_rephraser=1), "003013004", "use_rephraser", "use_rephraser=1"),
    (
        "rephraser-level",
        _params(rephraser_level="ultra"),
        "003013004",
        "rephraser_level",
        "'ultra'",
    ),
    ("seed-low", _params(seed=-2), "003013004", "seed", "seed=-2"),
    ("seed-float", _params(seed=1.5), "003013004", "seed", "seed=1.5"),
    ("seed-high", _params(seed=2**31), "003013004", "seed", str(2**31)),
    ("unknown-param", _params(ref_types=["IP"]), "003013004", "ref_types", "ref_types"),
    ("unknown-model", create_body("dall-e"), "003013004", "model", "'dall-e'"),
    ("no-input", {"model": "spark_dreamo", "params": {}}, "003013004", "body", "input"),
    (
        "two-inputs",
        {"model": "spark_dreamo", "input": [{"params": {}}] * 2},
        "003013004",
        "body",
        "input",
    ),
    (
        "params-not-object",
        {"model": "spark_dreamo", "input": [{"params": []}]},
        "003013004",
        "body",
        "params",
    ),
    ("body-list", [], "003013004", "body", "object"),
]


@pytest.mark.parametrize(
    ("body", "code", "reason", "text"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_invalid_create_is_refused_with_a_named_parameter(
    dreamo_server: FakeDreamOServer,
    http: aiohttp.ClientSession,
    body: Any,
    code: str,
    reason: str,
    text: str,
) -> None:
    status, data = await post(http, dreamo_server, body)
    assert status == 400
    assert data["error"]["code"] == code
    assert text in data["error"]["message"]
    assert dreamo_server.stats.creates == 0
    assert dreamo_server.stats.creates_refused == {reason: 1}
    assert dreamo_server.stats.refused_total == 1
    (record,) = dreamo_server.stats.refusals
    assert (record.endpoint, record.status, record.code) == ("create", 400, code)


@pytest.mark.parametrize(
    ("raw", "content_type", "reason"),
    [
        (b"{not json", "application/json", "body"),
        (b'{"model": NaN}', "application/json", "body"),
        (json.dumps(create_body()).encode(), "text/plain", "content_type"),
    ],
    ids=["not-json", "nan", "content-type"],
)
async def test_unparseable_create_body_is_refused(
    dreamo_server: FakeDreamOServer,
    http: aiohttp.ClientSession,
    raw: bytes,
    content_type: str,
    reason: str,
) -> None:
    headers = {**AUTH, "Content-Type": content_type}
    async with http.post(dreamo_server.url + CREATE_PATH, data=raw, headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "003013004"
    assert dreamo_server.stats.creates_refused == {reason: 1}


async def test_every_knob_at_its_bounds_is_accepted(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    jpeg = base64.b64encode(make_jpeg(64, 96)).decode()
    for params in (
        {
            "binary_data_base64": [PNG_B64, jpeg, PNG_B64, jpeg, PNG_B64],
            "ref_type_list": ["IP", "ID", "STYLE", "AUTO", "IP"],
            "guidance_scale1": 1,
            "guidance_scale2": 7.0,
            "ddim_steps": 50,
            "swap_face": True,
            "use_rephraser": False,
            "rephraser_level": "coarse",
            "seed": 2**31 - 1,
            "width": 2048,
            "height": 2048,
        },
        {"ddim_steps": 1, "seed": -1, "width": 512, "height": 512, "rephraser_level": "fine"},
        {"binary_data_base64": None, "image_urls": ["https://example.com/a.jpg"]},
    ):
        await create(http, dreamo_server, **params)
    status, _ = await post(http, dreamo_server, create_body("spark_dreamo"))
    assert status == 200
    assert dreamo_server.stats.creates == 4
    assert dreamo_server.stats.refused_total == 0


async def test_server_side_limits_follow_the_limits_object(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession
) -> None:
    limits = attrs.evolve(
        DEFAULT_LIMITS, max_image_bytes=1000, max_prompt_chars=10, max_output_pixels=1024 * 1024
    )
    server = await dreamo_server_factory(limits=limits)
    big = base64.b64encode(make_jpeg(64, 64, padding=1000)).decode()
    status, data = await post(http, server, create_body(binary_data_base64=[big]))
    assert (status, data["error"]["code"]) == (400, "003013004")
    assert "at most 1000" in data["error"]["message"]
    status, data = await post(http, server, create_body(prompt="x" * 11))
    assert (status, data["error"]["code"]) == (400, "003013003")
    status, data = await post(http, server, create_body(width=2048, height=1024))
    assert "width*height" in data["error"]["message"]
    assert server.stats.creates_refused == {"binary_data_base64": 1, "prompt": 1, "width": 1}


async def test_large_bodies_are_checked_off_the_loop(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    big = base64.b64encode(make_jpeg(64, 64, padding=400_000)).decode()
    raw = json.dumps(create_body(binary_data_base64=[big, big])).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    # a file-like body: aiohttp warns (ResourceWarning) about large raw bytes
    async with http.post(
        dreamo_server.url + CREATE_PATH, data=io.BytesIO(raw), headers=headers
    ) as r:
        assert r.status == 200, await r.text()
    assert dreamo_server.stats.creates == 1


async def test_strict_params_can_be_turned_off(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await dreamo_server_factory(strict_params=False)
    await create(http, server, future_knob=1)


# ------------------------------------------------------------------ task lifecycle


async def test_task_moves_pending_processing_completed_on_the_server_clock(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(
        queue_ms=100, task_duration_ms=200, report_progress=True, clock=clock
    )
    before = int(time.time())
    task = await create(http, server)
    assert task["status"] == "pending"
    assert task["model"] == "spark_multi_dreamo"
    assert set(task) == {"id", "status", "model", "created_at"}
    assert before <= task["created_at"] <= time.time()
    first = await poll(http, server, task["id"])
    assert (first["status"], first["progress"]) == ("pending", 0.0)
    clock.advance(150)
    running = await poll(http, server, task["id"])
    assert (running["status"], running["progress"]) == ("processing", 0.25)
    async with http.get(f"{server.url}/files/{task['id']}/0.png") as r:
        assert r.status == 404  # no result before completion
    clock.advance(151)
    done = await poll(http, server, task["id"])
    assert done["status"] == "completed"
    assert "progress" not in done
    (item,) = done["output"][0]["content"]
    assert item["type"] == "image"
    assert item["jobId"]
    assert item["url"] == f"{server.url}/files/{task['id']}/0.png"
    assert done["usage"] == {"cost": "0.03", "discount": 1}
    assert done["metadata"]["completed_at"] >= task["created_at"]
    async with http.get(item["url"]) as r:
        assert r.status == 200
        assert r.content_type == "image/png"
        image = Image.open(io.BytesIO(await r.read()))
        image.load()
    assert image.format == "PNG"
    assert server.stats.downloads == 2
    assert server.stats.polls == 3


async def test_real_time_lifecycle_with_default_timings(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    task = await create(http, dreamo_server)
    started = time.monotonic()
    while (await poll(http, dreamo_server, task["id"]))["status"] != "completed":
        assert time.monotonic() - started < 2
        await asyncio.sleep(0.005)
    assert time.monotonic() - started >= 0.015  # 20 ms tasks in the fixture


async def test_unknown_task_is_404_json(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{dreamo_server.url}/model/v1/generation/task/nope", headers=AUTH) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "404"
    async with http.get(f"{dreamo_server.url}/no/such/path") as r:
        assert r.status == 404
        assert r.content_type == "application/json"
    async with http.delete(dreamo_server.url + CREATE_PATH) as r:
        assert r.status == 405
    assert dreamo_server.stats.refused == {"not_found": 2, "method": 1}


async def test_prompt_scripts_fail_slow_and_never(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(task_duration_ms=50, clock=clock)
    failing = await create(http, server, prompt="a cat [fail:003013096]")
    slow = await create(http, server, prompt="a cat [slow:500]")
    never = await create(http, server, prompt="a cat [never]")
    clock.advance(60)
    failed = await poll(http, server, failing["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "003013096", "message": "Result parsing error"}
    assert "output" not in failed
    assert (await poll(http, server, slow["id"]))["status"] == "processing"
    clock.advance(500)
    assert (await poll(http, server, slow["id"]))["status"] == "completed"
    clock.advance(10**9)
    assert (await poll(http, server, never["id"]))["status"] == "processing"
    assert server.open_tasks() == 1
    server.finish_task(never["id"], fail_code="003013099")
    finished = await poll(http, server, never["id"])
    assert (finished["status"], finished["error"]["message"]) == ("failed", "Service unavailable")
    assert server.open_tasks() == 0
    assert server.tasks[never["id"]].prompt == "a cat [never]"


async def test_fail_tasks_fails_a_seeded_share(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async def outcomes(seed: int) -> list[str]:
        server = await dreamo_server_factory(clock=clock)
        server.fail_tasks("003013095", 0.5, seed=seed)
        ids = [(await create(http, server))["id"] for _ in range(20)]
        clock.advance(100)
        return [(await poll(http, server, i))["status"] for i in ids]

    first, again = await outcomes(7), await outcomes(7)
    assert first == again
    assert 3 <= first.count("failed") <= 17
    assert set(first) == {"failed", "completed"}
    server = await dreamo_server_factory(clock=clock)
    server.fail_tasks(ratio=1.0)
    server.fail_tasks(ratio=0)  # off again
    task = await create(http, server)
    clock.advance(100)
    assert (await poll(http, server, task["id"]))["status"] == "completed"


# ------------------------------------------------------------------ wire variants


async def test_envelope_status_words_flat_output_and_ms_timestamps(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(
        envelope=True,
        status_words={"pending": "in_queue", "processing": "in_progress", "completed": "succeeded"},
        output_layout="flat",
        created_at_format="ms",
        create_status=201,
        clock=clock,
    )
    async with http.post(server.url + CREATE_PATH, json=create_body(), headers=AUTH) as r:
        assert r.status == 201
        created = await r.json()
    assert created["status"] == {"code": 200, "message": "success"}
    task = created["data"]
    assert task["status"] == "in_queue"
    assert abs(task["created_at"] / 1000 - time.time()) < 60
    clock.advance(10)
    assert (await poll(http, server, task["id"]))["data"]["status"] == "in_progress"
    clock.advance(100)
    done = (await poll(http, server, task["id"]))["data"]
    assert done["status"] == "succeeded"
    (item,) = done["output"]
    assert item["url"].endswith("/0.png")
    assert item["jobId"]
    assert done["metadata"]["completed_at"] >= task["created_at"]


@pytest.mark.parametrize(
    ("error_format", "expected"),
    [
        ("message", {"code": "003013095", "message": "Internal generation error"}),
        ("error_message", {"code": "003013095", "error_message": "Internal generation error"}),
        ("string", "003013095: Internal generation error"),
    ],
)
async def test_error_formats(
    dreamo_server_factory: ServerFactory,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    error_format: str,
    expected: Any,
) -> None:
    server = await dreamo_server_factory(
        error_format=error_format, status_words={"failed": "error"}, clock=clock
    )
    task = await create(http, server, prompt="[fail:003013095]")
    clock.advance(100)
    failed = await poll(http, server, task["id"])
    assert failed["status"] == "error"
    assert failed["error"] == expected


async def test_iso_timestamps_and_extra_fields(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(created_at_format="iso", extra_fields=True, clock=clock)
    task = await create(http, server)
    created = dt.datetime.fromisoformat(task["created_at"])
    assert created.tzinfo is not None
    assert task["object"] == "generation.task"
    clock.advance(100)
    done = await poll(http, server, task["id"])
    assert done["usage"]["currency"] == "USD"
    assert done["output"][0]["content"][0]["format"] == "png"
    assert dt.datetime.fromisoformat(done["metadata"]["completed_at"]) >= created


async def test_result_urls_expire_after_the_ttl(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(result_ttl_ms=1000, clock=clock)
    task = await create(http, server)
    clock.advance(100)
    url = (await poll(http, server, task["id"]))["output"][0]["content"][0]["url"]
    async with http.get(url) as r:
        assert r.status == 200
    clock.advance(2000)
    async with http.get(url) as r:
        assert r.status == 404
    assert server.stats.refused == {"expired": 1}


# ------------------------------------------------------------------ injected faults


async def test_status_faults_answer_before_any_work(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    server = dreamo_server
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    server.inject("create", Fault.status(503, retry_after=1.5, message="busy"))
    server.inject(
        "create", Fault.status(502, body="<html>bad gateway</html>", content_type="text/html")
    )
    server.inject("create", Fault.status(500, body=""))
    server.inject("create", Fault.status(429, retry_after=when), times=2)
    assert server.pending_faults("create") == 5
    url = server.url + CREATE_PATH
    async with http.post(url, json=create_body(), headers=AUTH) as r:
        assert (r.status, r.headers["Retry-After"]) == (503, "1.5")
        assert await r.json() == {"error": {"code": "503", "message": "busy"}}
    async with http.post(url, json=create_body(), headers=AUTH) as r:
        assert (r.status, r.content_type) == (502, "text/html")
        assert await r.text() == "<html>bad gateway</html>"
    async with http.post(url, json=create_body(), headers=AUTH) as r:
        assert (r.status, await r.read()) == (500, b"")
    for _ in range(2):
        async with http.post(url, json=create_body(), headers=AUTH) as r:
            assert r.status == 429
            assert email.utils.parsedate_to_datetime(r.headers["Retry-After"]) == when
    assert server.stats.creates == 0
    await create(http, server)  # faults used up: normal again
    assert server.stats.faults == {"create:status": 5}
    assert server.stats.rate_limited == 2
    assert server.stats.status_codes == {503: 1, 502: 1, 500: 1, 429: 2, 200: 1}
    assert server.stats.refused_total == 0  # injected faults are not the service refusing


async def test_envelope_error_fault(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    dreamo_server.inject("create", Fault.envelope_error(500, "upstream exploded"))
    status, data = await post(http, dreamo_server, create_body())
    assert status == 200
    assert data == {"data": None, "status": {"code": 500, "message": "upstream exploded"}}
    assert dreamo_server.stats.creates == 0


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_drop_before_creates_nothing(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession, reset: bool
) -> None:
    dreamo_server.inject("create", Fault.drop_before(reset=reset))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, dreamo_server, create_body())
    assert dreamo_server.stats.creates == 0
    assert dreamo_server.stats.create_requests == 1
    assert 200 not in dreamo_server.stats.status_codes  # a drop is no answer
    await create(http, dreamo_server)  # the next connection works


async def test_drop_after_creates_the_task_then_disconnects(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    dreamo_server.inject("create", Fault.drop_after())
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, dreamo_server, create_body(), headers={**AUTH, "X-Request-Id": "r1"})
    assert dreamo_server.stats.creates == 1
    assert dreamo_server.stats.creates_by_request_id == {"r1": 1}
    (task,) = dreamo_server.tasks.values()
    assert task.request_id == "r1"


async def test_create_then_500_creates_the_task(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    dreamo_server.inject("create", Fault.create_then_500())
    status, data = await post(http, dreamo_server, create_body())
    assert status == 500
    assert "error" in data
    assert dreamo_server.stats.creates == 1


async def test_invalid_json_wrong_shape_and_huge_answers(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    server = dreamo_server
    task = await create(http, server)
    task_url = f"{server.url}/model/v1/generation/task/{task['id']}"
    server.inject("poll", Fault.invalid_json())
    server.inject("poll", Fault.wrong_shape())
    server.inject("poll", Fault.wrong_shape(payload=[1, 2]))
    server.inject("poll", Fault.huge(100_000))
    server.inject("poll", Fault.huge(70_000, chunked=True))
    async with http.get(task_url, headers=AUTH) as r:
        assert r.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(await r.text())
    async with http.get(task_url, headers=AUTH) as r:
        assert "id" not in await r.json()
    async with http.get(task_url, headers=AUTH) as r:
        assert await r.json() == [1, 2]
    async with http.get(task_url, headers=AUTH) as r:
        assert r.content_length == 100_000
        body = await r.read()
        assert len(body) == 100_000
        assert json.loads(body)["id"] == task["id"]
    async with http.get(task_url, headers=AUTH) as r:
        assert r.content_length is None
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert len(await r.read()) == 70_000
    assert server.stats.polls == 5


async def test_huge_answer_survives_a_client_that_stops_reading(
    dreamo_server: FakeDreamOServer,
) -> None:
    dreamo_server.inject("poll", Fault.huge(20_000_000))
    async with aiohttp.ClientSession() as http:
        url = f"{dreamo_server.url}/model/v1/generation/task/x"
        async with http.get(url, headers=AUTH) as r:
            await r.content.read(1000)
            r.close()  # abandon mid-body, as a client with a size cap does
    async with aiohttp.ClientSession() as http:
        await create(http, dreamo_server)


async def test_slow_and_delayed_faults(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    dreamo_server.inject("create", Fault.slow(80))
    dreamo_server.inject("create", Fault.status(503).after(50))
    started = time.monotonic()
    await create(http, dreamo_server)
    assert time.monotonic() - started >= 0.075
    started = time.monotonic()
    status, _ = await post(http, dreamo_server, create_body())
    assert status == 503
    assert time.monotonic() - started >= 0.045


async def test_download_faults_hit_result_files_and_assets(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    url = dreamo_server.add_file("ref.png", PNG)
    dreamo_server.inject("download", Fault.status(503))
    # twice: aiohttp re-sends an idempotent GET once, silently, after a disconnect
    dreamo_server.inject("download", Fault.drop_before(), times=2)
    dreamo_server.inject("download", Fault.huge(50_000))
    async with http.get(url) as r:
        assert r.status == 503
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(url)
    async with http.get(url) as r:
        body = await r.read()
        assert len(body) == 50_000
        assert body.startswith(PNG)
        assert r.content_type == "image/png"
    assert dreamo_server.stats.downloads == 4


async def test_chaos_is_seeded_and_can_be_turned_off(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession
) -> None:
    async def run(seed: int) -> list[str]:
        server = await dreamo_server_factory()
        server.chaos(
            0.5,
            seed=seed,
            faults={Fault.status(500): 1, Fault.drop_before(): 1},
            endpoints=["poll"],
        )
        seen = []
        for _ in range(16):
            try:
                async with http.get(f"{server.url}/model/v1/generation/task/x", headers=AUTH) as r:
                    seen.append(str(r.status))
            except aiohttp.ClientConnectionError:
                seen.append("drop")
        await create(http, server)  # create is not in `endpoints`
        server.clear_faults()
        async with http.get(f"{server.url}/model/v1/generation/task/x", headers=AUTH) as r:
            assert r.status == 404
        return seen

    first = await run(3)
    assert first == await run(3)
    assert {"404", "500", "drop"} <= set(first)


async def test_default_chaos_mix_runs(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    dreamo_server.chaos({"create": 1.0}, seed=1)
    for _ in range(12):
        with contextlib.suppress(aiohttp.ClientConnectionError, ValueError):
            await post(http, dreamo_server, create_body())
    assert sum(dreamo_server.stats.faults.values()) == 12


def test_fault_round_trips_through_a_dict() -> None:
    fault = Fault.status(429, retry_after=2, message="slow down").after(10)
    assert Fault.from_dict(json.loads(json.dumps(fault.to_dict()))) == fault
    assert not fault.after_work
    assert Fault.drop_after().after_work
    with pytest.raises(TypeError):
        Fault.from_dict({"kind": "status", "colour": "red"})
    with pytest.raises(ValueError, match="kind"):
        Fault.from_dict({"kind": "explode"})


async def test_inject_rejects_unknown_endpoints(dreamo_server: FakeDreamOServer) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        dreamo_server.inject("delete", Fault.drop_before())  # type: ignore[arg-type]


# ------------------------------------------------------------------ limits of the service


async def test_rate_limit_answers_429_with_retry_after(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(rate_limit=4, clock=clock)
    statuses = []
    for _ in range(6):
        async with http.get(f"{server.url}/model/v1/generation/task/x", headers=AUTH) as r:
            statuses.append(r.status)
            retry_after = r.headers.get("Retry-After")
    assert statuses == [404] * 4 + [429] * 2
    assert retry_after == "0.250"
    clock.advance(250)
    await create(http, server)  # creates and polls share the bucket
    status, _ = await post(http, server, create_body())
    assert status == 429
    assert server.stats.rate_limited == 3
    assert server.stats.refused["rate_limit"] == 3
    assert server.stats.creates_refused == {"rate_limit": 1}


@pytest.mark.parametrize("style", ["int", "date", "none"])
async def test_retry_after_styles(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, style: str
) -> None:
    server = await dreamo_server_factory(rate_limit=0.5, rate_burst=1, retry_after_format=style)
    await create(http, server)
    async with http.post(server.url + CREATE_PATH, json=create_body(), headers=AUTH) as r:
        assert r.status == 429
        value = r.headers.get("Retry-After")
    if style == "int":
        assert value == "2"
    elif style == "date":
        assert value is not None
        assert email.utils.parsedate_to_datetime(value) > dt.datetime.now(dt.UTC)
    else:
        assert value is None


async def test_max_open_tasks_refuses_until_a_task_ends(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(max_open_tasks=2, task_duration_ms=100, clock=clock)
    await create(http, server)
    clock.advance(50)
    await create(http, server)
    async with http.post(server.url + CREATE_PATH, json=create_body(), headers=AUTH) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "0.050"  # when the first task completes
    clock.advance(51)
    await create(http, server)
    assert server.stats.max_open_tasks == 2
    assert server.stats.creates_refused == {"open_tasks": 1}


# ------------------------------------------------------------------ counters


async def test_counters_from_the_server_side(
    dreamo_server: FakeDreamOServer, http: aiohttp.ClientSession
) -> None:
    server = dreamo_server
    for rid, prompt in (("a", "one"), ("b", "one"), ("c", "two")):
        status, _ = await post(
            http, server, create_body(prompt=prompt), headers={**AUTH, "X-Request-Id": rid}
        )
        assert status == 200
    await post(http, server, create_body(seed=-5))
    await post(http, server, create_body(), headers={})
    assert server.stats.create_requests == 5
    assert server.stats.creates == 3
    assert server.stats.creates_by_request_id == {"a": 1, "b": 1, "c": 1}
    assert server.stats.creates_by_prompt == {"one": 2, "two": 1}
    assert server.stats.creates_refused == {"seed": 1, "auth": 1}
    assert [(m, p) for _, m, p in server.stats.request_times] == [("POST", CREATE_PATH)] * 5
    assert server.stats.max_open_tasks == 3
    url = server.add_file("a.png", PNG)
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200
    assert server.stats.downloads_with_authorization == 1  # a key sent to a file host
    async with http.get(server.url + "/_fake/stats") as r:
        assert r.status == 200
    assert server.stats.requests == 6  # control endpoints are not counted
    stats = server.stats
    server.reset_stats()
    assert stats is server.stats  # reset in place: references stay valid
    assert stats.creates == 0
    assert stats.request_times == []
    assert stats.max_open_tasks == server.open_tasks()


async def test_max_open_tasks_counts_until_completion_time(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(task_duration_ms=100, clock=clock)
    for _ in range(3):
        await create(http, server)
        clock.advance(40)  # the first ends at 100: three overlap at 80
    clock.advance(100)
    await create(http, server)
    assert server.stats.max_open_tasks == 3
    assert server.open_tasks() == 1


def test_max_requests_in_window() -> None:
    stats = ServerStats()
    for moment in (0.0, 0.1, 0.2, 0.95, 1.0, 1.05, 1.1, 3.0):
        stats.request_times.append((moment, "GET", "/model/v1/generation/task/x"))
    stats.request_times.append((1.02, "GET", "/files/x/0.png"))
    assert stats.max_requests_in_window(1.0) == 5  # [0.1, 1.1) or [0.2, 1.2)
    assert stats.max_requests_in_window(1.0, api_only=False) == 6  # the download too
    assert stats.max_requests_in_window(0.12) == 3  # 0.95, 1.0, 1.05
    assert stats.max_requests_in_window(10) == 8
    assert ServerStats().max_requests_in_window() == 0


# ------------------------------------------------------------------ files


async def test_add_file_serves_bytes_for_image_urls(
    dreamo_server_factory: ServerFactory, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    server = await dreamo_server_factory(clock=clock)
    jpeg_url = server.add_file("/assets/refs/cat.jpg", make_jpeg(64, 64))
    assert jpeg_url == f"{server.url}/assets/refs/cat.jpg"
    blob_url = server.add_file("blob.bin", b"\x00\x01", "application/x-custom")
    async with http.get(jpeg_url) as r:
        assert r.content_type == "image/jpeg"
        assert await r.read() == make_jpeg(64, 64)
    async with http.get(blob_url) as r:
        assert r.content_type == "application/x-custom"
    async with http.get(f"{server.url}/assets/missing.png") as r:
        assert r.status == 404
    good = await create(http, server, binary_data_base64=None, image_urls=[jpeg_url])
    missing = f"{server.url}/assets/missing.png"
    bad = await create(http, server, binary_data_base64=None, image_urls=[missing])
    clock.advance(100)
    assert (await poll(http, server, good["id"]))["status"] == "completed"
    failed = await poll(http, server, bad["id"])
    assert failed["error"]["code"] == "003013097"  # the service could not fetch the input


# ------------------------------------------------------------------ images


def test_sample_images_are_small_real_files_in_the_aspect_range() -> None:
    paths = sample_images()
    assert len(paths) >= 6
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    for path in paths:
        data = path.read_bytes()
        assert len(data) < 5000
        with Image.open(path) as image:
            image.load()
            assert image.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
            width, height = image.size
        assert image_info(data) == (image.format.lower(), width, height)
        assert DEFAULT_LIMITS.min_aspect_ratio - 1e-9 <= width / height
        assert width / height <= DEFAULT_LIMITS.max_aspect_ratio + 1e-9


def test_made_images_are_real() -> None:
    with Image.open(io.BytesIO(make_png(300, 17, color=(1, 2, 3)))) as image:
        image.load()
        assert (image.format, image.size, image.getpixel((5, 5))) == ("PNG", (300, 17), (1, 2, 3))
    jpeg = make_jpeg(640, 480, padding=70_000)
    assert len(jpeg) > 70_000
    assert image_info(jpeg) == ("jpeg", 640, 480)
    assert image_info(b"GIF89a....") is None
    assert image_info(b"\xff\xd8\xff\xe0\x00") is None
    with pytest.raises(ValueError, match="positive"):
        make_png(0, 1)


# ------------------------------------------------------------------ standalone process


async def _read_ready(stream: asyncio.StreamReader) -> str:
    line = (await asyncio.wait_for(stream.readline(), 15)).decode().strip()
    assert line.startswith("READY "), line
    return line.removeprefix("READY ")


async def test_standalone_process_mode(http: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dreamo_async.testing",
        "--port",
        "0",
        "--task-duration-ms",
        "10",
        "--api-key",
        "other-key",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        url = await _read_ready(process.stdout)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        headers = {"Authorization": "Bearer other-key"}
        fault = {"endpoint": "create", "fault": Fault.status(503).to_dict(), "times": 1}
        async with http.post(url + "/_fake/inject", json=fault) as r:
            assert r.status == 200
        async with http.post(url + CREATE_PATH, json=create_body(), headers=headers) as r:
            assert r.status == 503
        async with http.post(url + CREATE_PATH, json=create_body(), headers=headers) as r:
            task = await r.json()
        async with http.get(url + "/_fake/stats") as r:
            stats = await r.json()
        assert stats["creates"] == 1
        assert stats["create_requests"] == 2
        assert stats["faults"] == {"create:status": 1}
        async with http.post(url + "/_fake/reset") as r:
            assert r.status == 200
        await asyncio.sleep(0.02)
        async with http.get(f"{url}/model/v1/generation/task/{task['id']}", headers=headers) as r:
            assert (await r.json())["status"] == "completed"
        async with http.get(url + "/_fake/stats") as r:
            assert (await r.json())["polls"] == 1
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0 or sys.platform == "win32"
        await process.stdout.read()
