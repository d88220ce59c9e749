"""The fuzz targets, shared by ``tests/test_fuzz.py`` (hypothesis) and ``fuzz/`` (atheris).

Each target takes untrusted bytes and checks the contract: the input is either
accepted or refused with the library's typed error; anything else (IndexError,
struct.error, RecursionError, OverflowError, MemoryError...) propagates and is
reported as a crash by the fuzzer.
"""

from __future__ import annotations

import math
import struct
import zlib

from dreamo_async import APIError, ImageError
from dreamo_async._answers import read_json as _json
from dreamo_async.images import inspect_image
from dreamo_async.images.headers import HeaderError, read_header, sniff_format
from dreamo_async.models import Task
from dreamo_async.retry import parse_retry_after
from dreamo_async.wire import parse_error_body, parse_task

__all__ = [
    "jpeg_with_frame",
    "png_with_ihdr",
    "target_error_body",
    "target_image",
    "target_response",
    "target_retry_after",
]


def target_image(data: bytes) -> None:
    """The image header reader and the image checks: a header, or HeaderError / ImageError."""
    sniff_format(data[:512])
    try:
        header = read_header(data)
    except HeaderError:
        pass
    else:
        assert header.format in ("jpeg", "png")
        assert 0 < header.width < 2**31
        assert 0 < header.height < 2**31
        assert 1 <= header.orientation <= 8
    try:
        info, notes = inspect_image(data, index=0, source="<fuzz>")
    except ImageError as exc:
        assert exc.index == 0  # noqa: PT017  # a fuzz target, not a test: either outcome is fine
    else:
        assert info.size == len(data)
        assert all(isinstance(note, str) for note in notes)


def target_response(data: bytes) -> None:
    """An answer body of the service: a Task, or an APIError (ResponseFormatError included)."""
    try:
        task = parse_task(_json(data, 200, None))
    except APIError:
        return
    assert isinstance(task, Task)
    assert task.id
    assert task.progress is None or 0.0 <= task.progress <= 1.0
    if task.usage is not None and task.usage.cost is not None:
        assert task.usage.cost.is_finite()
    repr(task)  # the repr of anything parsed must work (raw is left out of it)
    str(task.status)


def target_error_body(data: bytes) -> None:
    """An error answer's body: never raises; a retry hint is a non-negative number."""
    message, code, hint = parse_error_body(data, "application/json")
    assert message is None or isinstance(message, str)
    assert code is None or isinstance(code, str)
    assert hint is None or hint >= 0


def target_retry_after(data: bytes) -> None:
    """A ``Retry-After`` header: never raises; seconds >= 0 (possibly inf) or None."""
    text = data.decode("latin-1")  # how aiohttp decodes header bytes
    seconds = parse_retry_after(text)
    assert seconds is None or (seconds >= 0 and not math.isnan(seconds))


# --------------------------------------------------------------------------- builders


def png_with_ihdr(
    width: int, height: int, depth: int = 8, color: int = 2, tail: bytes = b""
) -> bytes:
    """A PNG signature and an IHDR with a valid CRC claiming any size, then ``tail``."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    return b"\x89PNG\r\n\x1a\n" + ihdr + tail


def png_chunk(kind: bytes, declared_length: int, data: bytes = b"") -> bytes:
    """A chunk whose length field says ``declared_length`` whatever ``data`` holds."""
    return struct.pack(">I", declared_length) + kind + data + struct.pack(">I", zlib.crc32(data))


def jpeg_with_frame(
    width: int, height: int, *, marker: int = 0xC0, precision: int = 8, tail: bytes = b""
) -> bytes:
    """SOI, a frame header claiming ``width`` x ``height``, a scan header, then ``tail``."""
    sof = bytes([0xFF, marker]) + struct.pack(">HBHHB", 17, precision, height, width, 3)
    sof += b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda" + struct.pack(">H", 12) + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + tail
