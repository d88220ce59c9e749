"""Scripted and random misbehaviour of :class:`FakeDreamOServer`, one :class:`Fault` per answer.

``server.inject("create", Fault.status(503, body="<html>..."), times=2)`` makes the
next two create requests fail that way; the endpoints are ``"create"``, ``"poll"``
and ``"download"`` (result files and ``/assets``). Scripted faults are used in
order, then the server answers normally again. ``server.chaos(0.2, seed=1)``
instead gives every request a seeded chance of one fault drawn from a weighted
list (scripted faults win over chaos).

A fault strikes *before* or *after* the service did its work, because the
difference is what a client must reason about ("did my create make a task?"):

=====================  ======  =============================================================
kind                   when    what the client sees
=====================  ======  =============================================================
``status``             before  that HTTP status; JSON error, or ``body`` as given ("" = empty)
``envelope_error``     before  HTTP 200 ``{"data": null, "status": {"code": C, "message": M}}``
``drop_before``        before  the connection closes without an answer; nothing is created
``slow``               before  the normal answer, ``delay_ms`` later
``drop_after``         after   the work is done (a create DID make a task), then the
                               connection closes without an answer
``slow_answer``        after   the work is done (a create made its task), then the normal
                               answer, ``delay_ms`` later (a client closed meanwhile never
                               hears of the task)
``create_then_500``    after   the work is done (a task exists), then HTTP 500 (or ``status``)
``invalid_json``       after   HTTP 200, body cut in half (not parseable)
``wrong_shape``        after   HTTP 200, JSON of no known shape
``huge``               after   HTTP 200, the real answer padded to ``size`` bytes (valid JSON
                               or image bytes; ``chunked=True`` omits Content-Length)
``reset_mid``          after   the work is done, the status line, headers and half the body
                               are sent, then the connection is reset
=====================  ======  =============================================================

Any fault can also be delayed: ``Fault.status(502).after(300)`` waits 300 ms first.

Beware: a bare aiohttp client silently re-sends an idempotent request (GET) once
after the server drops a pooled connection, so one ``drop_*`` fault on ``"poll"`` is
invisible to it. ``dreamo_async`` turns that re-send off for its API calls (each
retry goes through its own loop and rate limiter), so with it one fault is one
failed attempt, seen and retried; result downloads still get aiohttp's re-send.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Mapping
from typing import Any, Final, Literal, Self, get_args

import attrs

__all__ = ["CHAOS_FAULTS", "ENDPOINTS", "Endpoint", "Fault", "FaultKind"]

Endpoint = Literal["create", "poll", "download"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("create", "poll", "download")

#: Kinds that replace the answer after the service did the work (a create made a task).
AfterKind = Literal[
    "slow_answer",
    "drop_after",
    "create_then_500",
    "invalid_json",
    "wrong_shape",
    "huge",
    "reset_mid",
]
FaultKind = Literal["status", "envelope_error", "drop_before", "slow", AfterKind]
AFTER_KINDS: Final[frozenset[str]] = frozenset(get_args(AfterKind))


def _retry_after_text(value: str | float | dt.datetime | None) -> str | None:
    """``Retry-After`` as sent: seconds stay as written, datetimes become an HTTP-date."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True)
    return f"{value:g}"


@attrs.frozen(kw_only=True)
class Fault:
    """One scripted misbehaviour of the fake server. Build it with the class methods.

    Frozen and hashable so the same fault can be queued many times and used as a
    key of the chaos weights; :meth:`from_dict` rebuilds one sent over HTTP to a
    standalone server (``POST /_fake/inject``).
    """

    kind: FaultKind = attrs.field(validator=attrs.validators.in_(get_args(FaultKind)))
    #: HTTP status of ``status`` / ``create_then_500``; ``status.code`` of ``envelope_error``.
    status_code: int = 500
    #: Exact body to send (``""`` = empty); ``None`` = a JSON ``{"error": {...}}`` body.
    body: str | None = None
    content_type: str = "application/json"
    #: ``Retry-After`` header value (seconds or an HTTP-date), if any.
    retry_after: str | None = None
    #: ``error.code`` of the JSON error body (default: the HTTP status as a string).
    code: str | None = None
    message: str | None = None
    #: Wait this long before answering (every kind; ``slow`` is only this).
    delay_ms: float = 0
    #: ``huge``: total body size in bytes.
    size: int = 0
    #: ``huge``: stream without Content-Length.
    chunked: bool = False
    #: ``drop_*``: abort with a TCP reset instead of a clean close.
    reset: bool = False
    #: ``wrong_shape``: the JSON sent (``None`` = a small object of no known shape).
    payload: Any = attrs.field(default=None, eq=False, hash=False)
    #: Name counted in ``ServerStats.faults`` instead of ``kind`` (chaos: "html_502"...).
    label: str | None = None

    @property
    def after_work(self) -> bool:
        """Whether the fault strikes after the service did the work (a create made a task)."""
        return self.kind in AFTER_KINDS

    # -- builders ---------------------------------------------------------------------

    @classmethod
    def status(
        cls,
        status: int,
        *,
        body: str | None = None,
        content_type: str = "application/json",
        retry_after: str | float | dt.datetime | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> Self:
        """Answer ``status`` before doing any work (a gateway error: nothing is created).

        Without ``body`` the answer is ``{"error": {"code", "message"}}``; ``body=""``
        sends an empty body, any other text is sent as ``content_type``. ``retry_after``
        takes seconds (``0.05``, ``"2"``) or a ``datetime`` (sent as an HTTP-date).
        """
        return cls(
            kind="status",
            status_code=status,
            body=body,
            content_type=content_type,
            retry_after=_retry_after_text(retry_after),
            code=code,
            message=message,
        )

    @classmethod
    def envelope_error(cls, code: int = 500, message: str = "internal error") -> Self:
        """HTTP 200 whose envelope says ``status.code`` = ``code`` (nothing is created)."""
        return cls(kind="envelope_error", status_code=code, message=message)

    @classmethod
    def drop_before(cls, *, reset: bool = False) -> Self:
        """Close the connection before reading the request: nothing is created."""
        return cls(kind="drop_before", reset=reset)

    @classmethod
    def drop_after(cls, *, reset: bool = False) -> Self:
        """Do the work (a create makes its task), then close without answering."""
        return cls(kind="drop_after", reset=reset)

    @classmethod
    def create_then_500(
        cls, status: int = 500, *, body: str | None = None, content_type: str = "application/json"
    ) -> Self:
        """Do the work (a create makes its task), then answer ``status`` (default 500)."""
        return cls(kind="create_then_500", status_code=status, body=body, content_type=content_type)

    @classmethod
    def invalid_json(cls) -> Self:
        """Do the work, then answer 200 with the body cut in half."""
        return cls(kind="invalid_json")

    @classmethod
    def wrong_shape(cls, payload: Any = None) -> Self:
        """Do the work, then answer 200 with JSON of no known shape (or ``payload``)."""
        return cls(kind="wrong_shape", payload=payload)

    @classmethod
    def slow(cls, delay_ms: float) -> Self:
        """Answer normally, ``delay_ms`` later."""
        return cls(kind="slow", delay_ms=delay_ms)

    @classmethod
    def slow_answer(cls, delay_ms: float) -> Self:
        """Do the work (a create makes its task), then answer normally ``delay_ms`` later."""
        return cls(kind="slow_answer", delay_ms=delay_ms)

    @classmethod
    def huge(cls, size: int, *, chunked: bool = False) -> Self:
        """Do the work, then answer 200 with the real answer padded to ``size`` bytes."""
        return cls(kind="huge", size=size, chunked=chunked)

    @classmethod
    def reset_mid(cls) -> Self:
        """Do the work, send the headers and half the body, then reset the connection."""
        return cls(kind="reset_mid")

    def named(self, label: str) -> Self:
        """The same fault, counted as ``label`` in ``ServerStats.faults``."""
        return attrs.evolve(self, label=label)

    def after(self, delay_ms: float) -> Self:
        """The same fault, struck ``delay_ms`` after the request arrived."""
        return attrs.evolve(self, delay_ms=delay_ms)

    # -- over the wire (standalone server) ------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fault as JSON-able fields, for ``POST /_fake/inject``."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a fault from :meth:`to_dict` output; unknown fields raise ``TypeError``."""
        return cls(**dict(data))


#: What ``server.chaos()`` draws from by default, with weights: every failure a
#: production client meets on the way to this service.
CHAOS_FAULTS: Final[Mapping[Fault, float]] = {
    Fault.status(500): 2,
    Fault.status(
        502, body="<html><body>502 Bad Gateway</body></html>", content_type="text/html"
    ): 2,
    Fault.status(503, retry_after=0.01): 2,
    Fault.status(429, retry_after=0.01): 2,
    Fault.status(504, body=""): 1,
    Fault.drop_before(): 2,
    Fault.drop_after(): 1,
    Fault.create_then_500(): 1,
    Fault.invalid_json(): 1,
    Fault.slow(30): 2,
}
