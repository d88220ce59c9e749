"""The fake server's answers before they become bytes, and the ways faults mangle them.

An :class:`Answer` stays a Python object until the last moment so that a fault
striking *after* the work (``invalid_json``, ``huge``...) can still reshape the
real answer: the task was created, only the reply is broken.
"""

from __future__ import annotations

import collections
import datetime as dt
import email.utils
import json
import math
import time
from typing import Any, Literal

import attrs
from aiohttp import web

from ._faults import Fault

__all__ = [
    "Answer",
    "AttemptWindow",
    "Dropped",
    "RetryAfterFormat",
    "TokenBucket",
    "drop",
    "error_answer",
    "fault_answer",
    "format_retry_after",
    "render",
    "stream_cut",
    "stream_padded",
]

RetryAfterFormat = Literal["seconds", "int", "date", "none"]


@attrs.define
class Answer:
    """Status, JSON payload (or raw bytes) and headers of one answer."""

    status: int
    payload: Any = None
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = attrs.Factory(dict)

    def encode(self) -> bytes:
        if self.body is not None:
            return self.body
        return json.dumps(self.payload, separators=(",", ":")).encode()


class Dropped(web.Response):
    """Returned after the connection was closed: aiohttp's write fails and it moves on."""


def render(answer: Answer) -> web.Response:
    # Content-Type through the headers, so a fault may carry a charset parameter.
    headers = {**answer.headers, "Content-Type": answer.content_type}
    return web.Response(status=answer.status, body=answer.encode(), headers=headers)


def error_answer(status: int, code: str, message: str) -> Answer:
    """The service's JSON error body, ``{"error": {"code", "message"}}``."""
    return Answer(status, {"error": {"code": code, "message": message}})


def fault_answer(fault: Fault) -> Answer:
    """The answer of a ``status`` / ``create_then_500`` fault."""
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if fault.body is not None:
        return Answer(
            fault.status_code,
            body=fault.body.encode(),
            content_type=fault.content_type,
            headers=headers,
        )
    code = fault.code or str(fault.status_code)
    answer = error_answer(
        fault.status_code, code, fault.message or f"injected HTTP {fault.status_code}"
    )
    answer.headers.update(headers)
    return answer


def format_retry_after(seconds: float, style: RetryAfterFormat) -> str | None:
    """``Retry-After`` as the server spells it; ``None`` = send no header.

    ``"seconds"`` (fractional, e.g. ``0.125``) is not strictly RFC 9110 but keeps
    tests fast; ``"int"`` and ``"date"`` are what real servers send.
    """
    seconds = max(seconds, 0.001)
    if style == "none":
        return None
    if style == "int":
        return str(math.ceil(seconds))
    if style == "date":
        moment = dt.datetime.fromtimestamp(math.ceil(time.time() + seconds), tz=dt.UTC)
        return email.utils.format_datetime(moment, usegmt=True)
    return f"{seconds:.3f}"


def drop(request: web.Request, *, reset: bool) -> web.StreamResponse:
    """Close the connection without an answer (the client sees a disconnect)."""
    transport = request.transport
    if transport is not None:
        if reset:
            transport.abort()
        else:
            transport.close()
    return Dropped()


async def stream_padded(
    request: web.Request, answer: Answer, size: int, *, chunked: bool
) -> web.StreamResponse:
    """Stream ``answer`` padded to ``size`` bytes: still valid JSON, or image bytes + zeros.

    Streamed in 64 KiB blocks so a "huge" answer of hundreds of MB costs no memory,
    and a client that gives up mid-body (its size cap) ends the stream quietly.
    """
    if answer.body is not None:
        head, tail, filler = answer.body, b"", b"\0"
    else:
        payload = answer.payload if isinstance(answer.payload, dict) else {"data": answer.payload}
        text = json.dumps(payload, separators=(",", ":"))
        head = (text[:-1] + ("," if payload else "") + '"padding":"').encode()
        tail, filler = b'"}', b"x"
    padding = max(0, size - len(head) - len(tail))
    response = web.StreamResponse(status=answer.status)
    response.headers["Content-Type"] = answer.content_type
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = len(head) + padding + len(tail)
    block = filler * 65536
    try:
        await response.prepare(request)
        await response.write(head)
        while padding > 0:
            await response.write(block[:padding])
            padding -= len(block)
        await response.write(tail)
        await response.write_eof()
    except ConnectionError:
        pass  # the client stopped reading: that is what the fault is for
    return response


async def stream_cut(request: web.Request, answer: Answer) -> web.StreamResponse:
    """Send the status, the headers (full Content-Length) and half the body, then reset."""
    body = answer.encode()
    response = web.StreamResponse(status=answer.status, headers=answer.headers)
    response.headers["Content-Type"] = answer.content_type
    response.content_length = len(body)
    try:
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
    except ConnectionError:
        pass
    return drop(request, reset=True)


@attrs.define
class TokenBucket:
    """The service's rate limit: ``burst`` requests at once, refilled at ``rate`` per second.

    A token bucket rather than a fixed window, as most real APIs do; tests that
    check the client's own pacing use ``ServerStats.max_requests_in_window``.
    """

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float | None:
        """Take one token; ``None`` on success, else the seconds until one is back."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


@attrs.define
class AttemptWindow:
    """A harsher rate limit: at most ``rate`` attempts in any 1-s window, refused ones
    counted too, so a client that keeps hammering stays refused until it backs off."""

    rate: float
    attempts: collections.deque[float] = attrs.field(factory=collections.deque)

    def take(self, now: float) -> float | None:
        """Count one attempt; ``None`` if allowed, else the seconds until the window frees."""
        attempts = self.attempts
        while attempts and attempts[0] <= now - 1.0:
            attempts.popleft()
        allowed = len(attempts) < self.rate
        attempts.append(now)
        return None if allowed else max(0.001, attempts[0] + 1.0 - now)
