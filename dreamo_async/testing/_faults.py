"""Scripted faults for :class:`FakeDreamOServer`: what the next answers of an endpoint do.

``server.inject("create", Fault.status(503, body="<html>..."), times=2)`` makes the
next two create requests fail that way; the endpoints are ``"create"``, ``"poll"``
and ``"download"``. Faults are used in order, then the server answers normally.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["Endpoint", "Fault"]

Endpoint = Literal["create", "poll", "download"]

FaultKind = Literal[
    "status",  # answer with an HTTP status and a body
    "drop_before",  # close the connection without answering; nothing is created
    "drop_after",  # create: the task IS created, then the connection is closed
    "create_then_500",  # create: the task IS created, then a 500 is answered
    "invalid_json",  # 200 with a body that is not JSON
    "wrong_shape",  # 200 with JSON of no known shape
    "slow",  # wait delay_ms, then answer normally
    "huge",  # 200 with a body of `size` bytes
]


@attrs.frozen(kw_only=True)
class Fault:
    """One scripted misbehaviour of the fake server. Build it with the class methods."""

    kind: FaultKind
    status_code: int = 500
    body: str | None = None
    content_type: str = "application/json"
    retry_after: str | None = None
    message: str | None = None
    delay_ms: int = 0
    size: int = 0

    @classmethod
    def status(
        cls,
        status: int,
        *,
        body: str | None = None,
        content_type: str = "application/json",
        retry_after: str | float | None = None,
        message: str | None = None,
    ) -> Fault:
        """Answer ``status``; the body is JSON ``{"error": {...}}`` unless ``body`` is given."""
        return cls(
            kind="status",
            status_code=status,
            body=body,
            content_type=content_type,
            retry_after=None if retry_after is None else str(retry_after),
            message=message,
        )

    @classmethod
    def drop_before(cls) -> Fault:
        return cls(kind="drop_before")

    @classmethod
    def drop_after(cls) -> Fault:
        return cls(kind="drop_after")

    @classmethod
    def create_then_500(cls) -> Fault:
        return cls(kind="create_then_500", status_code=500)

    @classmethod
    def invalid_json(cls) -> Fault:
        return cls(kind="invalid_json")

    @classmethod
    def wrong_shape(cls) -> Fault:
        return cls(kind="wrong_shape")

    @classmethod
    def slow(cls, delay_ms: int) -> Fault:
        return cls(kind="slow", delay_ms=delay_ms)

    @classmethod
    def huge(cls, size: int) -> Fault:
        return cls(kind="huge", size=size)
