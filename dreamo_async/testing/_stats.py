"""What :class:`FakeDreamOServer` saw, counted from the server's side.

Tests assert on these instead of on the client's own bookkeeping: "exactly one
create per X-Request-Id" proves the client never paid twice, and
``max_requests_in_window`` proves its rate limiter held, whatever the client
believes it did.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import attrs

__all__ = ["RecordedRequest", "RefusalRecord", "ServerStats", "max_in_window"]


def max_in_window(times: Iterable[float], window_s: float = 1.0) -> int:
    """Most events in any half-open window ``[t, t + window_s)`` (times in seconds).

    Half-open: events exactly ``window_s`` apart fall in different windows, as a
    limiter of N per ``window_s`` allows. Shared by the fake server's counters,
    the tests and the benchmarks, so all of them judge a limiter the same way.
    """
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


@attrs.frozen
class RefusalRecord:
    """One request the simulated service refused (4xx), with the reason it gave."""

    endpoint: str
    status: int
    code: str
    reason: str
    message: str


@attrs.define
class ServerStats:
    """Counters of one :class:`FakeDreamOServer`; ``server.reset_stats()`` starts afresh.

    Requests to the control endpoints (``/_fake/...``) are never counted.
    """

    #: Create requests received (any outcome, injected faults included).
    create_requests: int = 0
    #: Tasks created (accepted creates, including those whose answer a fault then lost).
    creates: int = 0
    #: Create requests refused by the service, by reason (``"auth"``, ``"rate_limit"``,
    #: ``"open_tasks"``, ``"body"``, or the parameter name such as ``"ddim_steps"``).
    creates_refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Every refused request of any endpoint, by reason (adds ``"not_found"``, ``"expired"``).
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Details of each refusal, in order (for assertion messages).
    refusals: list[RefusalRecord] = attrs.field(factory=list)
    #: Poll requests received (any outcome).
    polls: int = 0
    #: Download requests received (result files and ``/assets``, any outcome).
    downloads: int = 0
    #: Downloads that carried an ``Authorization`` header (a key sent to a file host).
    downloads_with_authorization: int = 0
    #: 429 answers sent (rate limit, ``max_open_tasks`` and injected).
    rate_limited: int = 0
    #: Every HTTP status sent, by status (dropped connections are not answers).
    status_codes: collections.Counter[int] = attrs.field(factory=collections.Counter)
    #: Faults used, by ``"endpoint:kind"`` (scripted and chaos).
    faults: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Tasks created per ``X-Request-Id`` header (``""`` when absent).
    creates_by_request_id: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Sum of the costs of the tasks created (billed whether they complete or fail).
    cost_created: Decimal = Decimal(0)
    #: Tasks created per prompt.
    creates_by_prompt: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Most tasks running at the service at once (created, completion time not reached).
    max_open_tasks: int = 0
    #: ``(server clock, method, path)`` of every request, refused ones included.
    request_times: list[tuple[float, str, str]] = attrs.field(factory=list)

    @property
    def refused_total(self) -> int:
        """All refused requests; ``assert server.stats.refused_total == 0`` = "nothing refused"."""
        return sum(self.refused.values())

    @property
    def requests(self) -> int:
        """Requests received (control endpoints excluded)."""
        return len(self.request_times)

    def max_requests_in_window(self, window_s: float = 1.0, *, api_only: bool = True) -> int:
        """Most requests seen in any sliding window of ``window_s`` seconds.

        A window is half-open, ``[t, t + window_s)``: requests exactly ``window_s``
        apart fall in different windows, as a limiter of N per ``window_s`` allows.
        ``api_only`` counts only create and poll requests (what a rate limit of the
        service applies to), not downloads.
        """
        return max_in_window(
            [
                moment
                for moment, _, path in self.request_times
                if not api_only or path.startswith("/model/")
            ],
            window_s,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary, served at ``GET /_fake/stats`` for other processes."""
        return {
            "create_requests": self.create_requests,
            "creates": self.creates,
            "cost_created": str(self.cost_created),
            "creates_refused": dict(self.creates_refused),
            "refused": dict(self.refused),
            "refused_total": self.refused_total,
            "polls": self.polls,
            "downloads": self.downloads,
            "downloads_with_authorization": self.downloads_with_authorization,
            "rate_limited": self.rate_limited,
            "status_codes": {str(k): v for k, v in self.status_codes.items()},
            "faults": dict(self.faults),
            "creates_by_request_id": dict(self.creates_by_request_id),
            "creates_by_prompt": dict(self.creates_by_prompt),
            "max_open_tasks": self.max_open_tasks,
            "requests": self.requests,
            "max_requests_in_1s": self.max_requests_in_window(1.0),
        }


@attrs.frozen
class RecordedRequest:
    """The last request an endpoint received, as it arrived (wire-format tests).

    ``headers`` keeps ``Authorization``: tests check that the key travels there
    (and nowhere else). ``body`` is empty for requests whose body was never read.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not)."""
        return json.loads(self.body)
