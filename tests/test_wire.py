"""The wire format: the create body, and every response variant of API.md."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest

import dreamo_async as d
from dreamo_async._body import BodyParts
from dreamo_async.wire import (
    create_body_parts,
    parse_error_body,
    parse_task,
    request_params,
)

URL = "https://example.com/a.png"


def test_request_params_omit_unset_and_rename_ref_types() -> None:
    request = d.GenerationRequest(
        prompt="猫", images=[URL], ref_types=["ID"], seed=7, swap_face=False
    )
    assert request_params(request) == {
        "prompt": "猫",
        "ref_type_list": ["ID"],
        "seed": 7,
        "swap_face": False,
    }


def test_create_body_is_the_wrapped_form_with_spliced_base64() -> None:
    body = b"".join(
        create_body_parts("spark_multi_dreamo", {"prompt": "猫", "seed": 1}, [b"QUJD", b"REVG"])
    )
    assert json.loads(body) == {
        "model": "spark_multi_dreamo",
        "input": [{"params": {"prompt": "猫", "seed": 1, "binary_data_base64": ["QUJD", "REVG"]}}],
    }
    assert json.loads(b"".join(create_body_parts("m", {}, [b"QQ=="])))["input"][0]["params"] == {
        "binary_data_base64": ["QQ=="]
    }


def test_create_body_with_urls() -> None:
    body = json.loads(
        b"".join(create_body_parts("spark_dreamo", {"prompt": "p"}, image_urls=[URL]))
    )
    assert body["input"][0]["params"]["image_urls"] == [URL]
    assert "binary_data_base64" not in body["input"][0]["params"]


COMPLETED: dict[str, Any] = {
    "id": "t1",
    "status": "completed",
    "model": "spark_multi_dreamo",
    "created_at": 1769757744,
    "output": [{"content": [{"type": "image", "url": "https://x/0.jpg", "jobId": "j1"}]}],
    "usage": {"cost": "0.03", "discount": 1},
    "metadata": {"completed_at": 1769757790},
    "surprise": {"nested": True},
}


def test_completed_task_parses_fully_and_keeps_unknown_fields() -> None:
    task = parse_task(COMPLETED)
    assert task.status is d.TaskStatus.COMPLETED
    assert task.is_terminal
    result = d.GenerationResult.from_task(task)
    assert result.image_urls == ["https://x/0.jpg"]
    assert result.job_id == "j1"
    assert result.cost == Decimal("0.03")
    assert result.discount == 1.0
    assert result.metadata == {"completed_at": 1769757790}
    assert result.raw["surprise"] == {"nested": True}
    assert task.created_at == dt.datetime.fromtimestamp(1769757744, tz=dt.UTC)


def test_envelope_is_unwrapped() -> None:
    task = parse_task({"data": COMPLETED, "status": {"code": 200, "message": "success"}})
    assert task.id == "t1"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (401, d.AuthenticationError),
        (403, d.PermissionDeniedError),
        (429, d.RateLimitError),
        (500, d.ServerError),
        (400, d.APIError),
    ],
)
def test_envelope_error_status_maps_to_error_class(code: int, cls: type[d.APIError]) -> None:
    with pytest.raises(cls) as info:
        parse_task({"data": None, "status": {"code": code, "message": "nope"}})
    assert info.value.status == code
    assert "nope" in str(info.value)


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("pending", "pending"),
        ("in_queue", "pending"),
        ("processing", "processing"),
        ("in_progress", "processing"),
        ("warming_up", "processing"),
        ("completed", "completed"),
        ("success", "completed"),
        ("succeeded", "completed"),
        ("SUCCEEDED", "completed"),
        ("failed", "failed"),
        ("error", "failed"),
        ("cancelled", "failed"),
    ],
)
def test_every_status_word(word: str, status: str) -> None:
    task = parse_task({"id": "t", "status": word})
    assert task.status == d.TaskStatus(status)
    assert task.raw_status == word


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            {"code": "003013095", "message": "Internal generation error"},
            "003013095",
            "Internal generation error",
        ),
        ({"code": 3013095, "error_message": "boom"}, "3013095", "boom"),
        ("plain text failure", None, "plain text failure"),
    ],
)
def test_every_error_form(error: object, code: str | None, message: str) -> None:
    task = parse_task({"id": "t", "status": "failed", "error": error})
    assert task.error == d.TaskError(code=code, message=message)


def test_flat_output_layout_and_job_id_on_the_item() -> None:
    task = parse_task(
        {"id": "t", "status": "success", "output": [{"url": "https://x/1.png", "jobId": "j9"}]}
    )
    assert [(i.url, i.job_id) for i in task.images] == [("https://x/1.png", "j9")]


@pytest.mark.parametrize(
    "created_at",
    [1769757744, 1769757744000, "2026-01-30T07:22:24Z", "2026-01-30T07:22:24+00:00", "1769757744"],
)
def test_every_created_at_form(created_at: object) -> None:
    task = parse_task({"id": "t", "status": "pending", "created_at": created_at})
    assert task.created_at == dt.datetime(2026, 1, 30, 7, 22, 24, tzinfo=dt.UTC)


def test_progress_is_a_fraction() -> None:
    assert parse_task({"id": "t", "status": "in_progress", "progress": 0.45}).progress == 0.45
    assert parse_task({"id": "t", "status": "in_progress", "progress": 45}).progress == 0.45
    assert parse_task({"id": "t", "status": "in_progress", "progress": "x"}).progress is None


@pytest.mark.parametrize("body", [[], "x", {"status": "completed"}, {"id": ""}])
def test_wrong_shapes_raise_response_format_error(body: object) -> None:
    with pytest.raises(d.ResponseFormatError):
        parse_task(body)


def test_odd_usage_values_do_not_break_parsing() -> None:
    task = parse_task({"id": "t", "status": "completed", "usage": {"cost": "n/a"}})
    assert task.usage == d.Usage(cost=None, discount=None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "bad key", "code": 401}}', ("bad key", "401", None)),
        (b'{"error": {"error_message": "slow down", "retry_after": 2}}', ("slow down", None, 2.0)),
        (b'{"message": "oops"}', ("oops", None, None)),
        (b'{"error": "plain"}', ("plain", None, None)),
        (b"<html>bad gateway</html>", (None, None, None)),
        (b"", (None, None, None)),
    ],
)
def test_error_bodies(body: bytes, expected: tuple[object, ...]) -> None:
    assert parse_error_body(body, "application/json") == expected


@pytest.mark.parametrize("count", [0, 1, 5])
async def test_body_parts_payload_is_the_json_body(count: int) -> None:
    """BodyParts writes exactly encode_create_body's bytes, and can be written twice
    (a create retried after a refused connection sends the same parts again)."""
    images = [bytes([65 + i]) * (10 + i) for i in range(count)]
    parts = create_body_parts("spark_multi_dreamo", {"prompt": "p", "seed": 1}, images)
    payload = BodyParts(parts)
    expected = b"".join(parts)
    assert json.loads(expected)["input"][0]["params"].get("binary_data_base64", []) == [
        image.decode() for image in images
    ]

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk

    for _ in range(2):
        sink = Sink()
        await payload.write(sink)  # type: ignore[arg-type]
        assert bytes(sink.data) == expected
    assert payload.size == len(expected) == len(payload)
    cut = Sink()
    await payload.write_with_length(cut, 7)  # type: ignore[arg-type]
    assert bytes(cut.data) == expected[:7]
