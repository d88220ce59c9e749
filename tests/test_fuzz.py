"""Hostile input: property-based fuzzing of everything that reads untrusted bytes.

Bounded and derandomized here (a few hundred inputs per target, the same ones on
every run); ``make fuzz`` runs the same properties with fresh randomness and
many more examples (``DREAMO_FUZZ_EXAMPLES``, ``DREAMO_FUZZ_RANDOM=1``) next to the
atheris targets of ``fuzz/``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dreamo_async as d
from dreamo_async.testing import FakeDreamOServer, Fault, make_jpeg, make_png

from .fuzz_targets import (
    jpeg_with_frame,
    png_chunk,
    png_with_ihdr,
    target_error_body,
    target_image,
    target_response,
    target_retry_after,
)

#: Examples per property: a bounded, seeded share in `make test`, many more in `make fuzz`.
EXAMPLES = int(os.environ.get("DREAMO_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=os.environ.get("DREAMO_FUZZ_RANDOM") != "1",
    database=None,
    # A generous bound per input: the parsers do a few dozen steps, so only a
    # pathological (quadratic, unbounded) path could come near it.
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = [make_png(64, 48), make_jpeg(64, 48), make_png(1, 1), make_jpeg(16, 16, padding=300)]
EXTREMES = [0, 1, 2, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid JPEG or PNG with bytes flipped, fields set to extremes, cut or spliced."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        action = draw(st.sampled_from(["flip", "extreme", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif action == "extreme":
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(EXTREMES)) & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, "big")
        elif action == "cut":
            del data[pos:]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


hostile_pngs = st.builds(
    png_with_ihdr,
    width=st.integers(0, 2**32 - 1),
    height=st.integers(0, 2**32 - 1),
    depth=st.sampled_from([1, 2, 4, 8, 16, 0, 255]),
    color=st.sampled_from([0, 2, 3, 4, 6, 7]),
    tail=st.lists(
        st.builds(
            png_chunk,
            kind=st.sampled_from([b"IDAT", b"IEND", b"tEXt", b"CgBI", b"\x00\x00\x00\x00"]),
            declared_length=st.sampled_from(EXTREMES) | st.integers(0, 2**32 - 1),
            data=st.binary(max_size=32),
        ),
        max_size=6,
    ).map(b"".join),
)
hostile_jpegs = st.builds(
    jpeg_with_frame,
    width=st.integers(0, 65535),
    height=st.integers(0, 65535),
    marker=st.sampled_from([0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xF7]),
    precision=st.sampled_from([8, 12, 16, 0]),
    tail=st.binary(max_size=64) | st.just(b"\xff\xd9"),
)
image_bytes = st.binary(max_size=2048) | mutated_images() | hostile_pngs | hostile_jpegs


@FUZZ
@given(image_bytes)
@example(jpeg_with_frame(65535, 65535, tail=b"\xff\xd9"))  # a 4-gigapixel claim
@example(png_with_ihdr(65535, 65535, tail=png_chunk(b"IDAT", 2**31)))
@example(png_with_ihdr(2**31 - 1, 2**31 - 1, tail=png_chunk(b"IDAT", 2**31 - 1)))
@example(b"\xff\xd8" + b"\xff" * 100_000)  # a run of fill bytes
@example(b"\xff\xd8" + b"\xff\xe0\x00\x02" * 5000)  # thousands of empty segments
def test_image_header_reader_accepts_or_raises_image_error(data: bytes) -> None:
    target_image(data)


def _peak_allocation(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (
            "jpeg claiming 65535 x 65535",
            jpeg_with_frame(65535, 65535, tail=b"\0" * 64 + b"\xff\xd9"),
        ),
        (
            "png claiming 65535 x 65535",
            png_with_ihdr(65535, 65535, tail=png_chunk(b"IDAT", 64, b"\0" * 64)),
        ),
        ("png chunk length 2^31", png_with_ihdr(100, 100, tail=png_chunk(b"IDAT", 2**31))),
        ("png chunk length 2^31 - 1", png_with_ihdr(100, 100, tail=png_chunk(b"IDAT", 2**31 - 1))),
        ("png size 2^31 - 1", png_with_ihdr(2**31 - 1, 2**31 - 1)),
    ],
)
def test_no_allocation_follows_a_size_or_length_field(name: str, data: bytes) -> None:
    """The header's claims never size an allocation: a few KB whatever they say."""
    peak = _peak_allocation(lambda: target_image(data))
    assert peak < 64 * 1024, f"{name}: {peak} bytes allocated"
    with pytest.raises(d.ImageError) as info:
        d.images.inspect_image(data, index=3, source="x.png")
    assert info.value.index == 3


# --------------------------------------------------------------------------- responses

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.integers().map(lambda n: n * 10**300)  # ints too large for a float
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["completed", "failed", "pending", "success", "error", "1e999", "NaN"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["id", "task_id", "status", "progress", "created_at", "output", "usage", "error",
          "error_code", "error_message", "message", "metadata", "model", "data", "code"]
task_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
enveloped = st.builds(
    lambda data, code, message: {"data": data, "status": {"code": code, "message": message}},
    task_like | json_values,
    json_scalars,
    json_scalars,
)
output_like = st.builds(
    lambda content, url, job: {
        "id": "t1",
        "status": "completed",
        "output": [{"content": content, "url": url, "jobId": job}],
        "usage": {"cost": url, "discount": job},
    },
    json_values,
    json_scalars,
    json_scalars,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def _deep(depth: int, opener: str = "[") -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return ('{"a":' * depth + "1" + closer * depth).encode()
    return (opener * depth + closer * depth).encode()


response_bytes = (
    st.binary(max_size=512)
    | st.builds(_encode, task_like | enveloped | output_like | json_values)
    | st.builds(_deep, st.integers(1, 5000), st.sampled_from(["[", "{"]))
)


@FUZZ
@given(response_bytes)
@example(_deep(100_000))  # RecursionError inside json.loads
@example(_deep(100_000, "{"))
@example(b'{"id": "t", "status": "failed", "error": {"code": ' + _deep(950) + b"}}")
@example(b'{"id": "t", "status": "processing", "progress": 1' + b"0" * 400 + b"}")
@example(b'{"id": "t", "created_at": 1' + b"0" * 400 + b"}")
@example(b'{"id": "t", "created_at": 1e308}')
@example(b'{"id": "t", "status": "completed", "usage": {"cost": "1e999999999", "discount": 1'
         + b"0" * 400 + b"}}")
@example(b'{"id": "t", "created_at": "9999-99-99T99:99:99"}')
@example(b'{"id": "t", "status": "failed", "error": "x", "error_code": 1' + b"0" * 400 + b"}")
@example(b"\xef\xbb\xbf{}")  # a byte-order mark
@example('{"id": "\ud800"}'.encode("utf-8", "surrogatepass"))
def test_response_parser_returns_a_task_or_raises_api_error(data: bytes) -> None:
    target_response(data)


@FUZZ
@given(response_bytes)
@example(_deep(100_000))
@example(b'{"error": {"retry_after": 1' + b"0" * 400 + b"}}")
@example(b'{"retry_after": "NaN", "message": ' + _deep(950) + b"}")
def test_error_body_parser_never_raises(data: bytes) -> None:
    target_error_body(data)


retry_after_texts = (
    st.text(max_size=40)
    | st.floats().map(repr)
    | st.integers().map(str)
    | st.datetimes().map(lambda t: t.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    | st.from_regex(
        r"\A(Mon|Sun), \d{1,3} (Jan|Feb|Foo) -?\d{1,12} \d\d:\d\d:\d\d ([+-]\d{4}|GMT|XYZ)\Z"
    )
)


@FUZZ
@given(retry_after_texts)
@example("Fri, 31 Dec 9999 23:59:59 GMT")
@example("Mon, 01 Jan 0001 00:00:00 GMT")
@example("Thu, 01 Jan 1970 00:00:00 +9999")
@example("Mon, 01 Jan 99999999999 00:00:00 GMT")  # found by atheris: OverflowError
@example("1e999")
@example("nan")
@example("-5")
@example("9" * 5000)
def test_retry_after_parser_never_raises(text: str) -> None:
    target_retry_after(text.encode("latin-1", "replace"))


# ---------------------------------------------------- the whole transport, over HTTP


class _ScriptedServer:
    """One aiohttp.web route answering whatever the current example says."""

    def __init__(self) -> None:
        self.answer: tuple[int, str, bytes, str | None] = (200, "application/json", b"{}", None)

    async def handle(self, request: web.Request) -> web.Response:
        status, content_type, body, retry_after = self.answer
        headers = {"Content-Type": content_type}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return web.Response(status=status, body=body, headers=headers)


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[asyncio.Runner, _ScriptedServer, d.DreamOClient]]:
    """A server and a client on one long-lived loop, so each example is one HTTP round trip."""
    server = _ScriptedServer()
    with asyncio.Runner() as runner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        app_runner = web.AppRunner(app, access_log=None)
        runner.run(app_runner.setup())
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        runner.run(site.start())
        port = app_runner.addresses[0][1]
        client = d.DreamOClient(
            api_key="k",
            base_url=f"http://127.0.0.1:{port}",
            retry=d.RetryPolicy(max_attempts=1),
        )
        try:
            yield runner, server, client
        finally:
            runner.run(client.aclose())
            runner.run(app_runner.cleanup())


statuses = st.sampled_from([200, 201, 202, 204, 301, 400, 401, 403, 404, 409, 429, 500, 502, 503])
content_types = st.sampled_from(
    ["application/json", "text/html", "text/plain", "application/json; charset=latin-1", ""]
)
header_texts = st.none() | retry_after_texts.map(
    lambda t: "".join(c for c in t if " " <= c <= "~")
)


@settings(FUZZ, max_examples=max(20, EXAMPLES // 5))
@given(statuses, content_types, response_bytes, header_texts)
def test_any_answer_to_a_poll_is_a_task_or_an_api_error(
    scripted: tuple[asyncio.Runner, _ScriptedServer, d.DreamOClient],
    status: int,
    content_type: str,
    body: bytes,
    retry_after: str | None,
) -> None:
    runner, server, client = scripted
    server.answer = (status, content_type or "application/octet-stream", body, retry_after)
    try:
        task = runner.run(client.get_task("t1"))
    except d.APIError as exc:  # the contract: a typed error about this task
        assert exc.task_id == "t1"  # noqa: PT017
        if isinstance(exc, d.RateLimitError) and exc.retry_after is not None:
            assert exc.retry_after >= 0  # noqa: PT017
    else:
        assert status == 200
        assert isinstance(task, d.Task)


async def test_an_absurd_retry_after_raises_at_once_instead_of_sleeping(
    dreamo_server: FakeDreamOServer,
) -> None:
    far = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    dreamo_server.inject("create", Fault.status(429, retry_after=far))
    async with d.DreamOClient(api_key="test-key", base_url=dreamo_server.url) as client:
        with pytest.raises(d.RateLimitError) as info:
            await client.submit(prompt="p", images=[make_png(64, 64)])
    assert info.value.retry_after is not None
    assert info.value.retry_after > 200_000_000_000  # seconds: about 7,900 years
    assert dreamo_server.stats.create_requests == 1  # no retry, no sleep
