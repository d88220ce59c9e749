"""The interfaces of coordination: how a client's requests and jobs are paced and paid.

A :class:`Coordinator` makes the :class:`RateLimiter` (permission to send one HTTP
request), the :class:`JobSlots` (``max_concurrency``) and, optionally, the
:class:`BudgetLedger` (``max_spend``) of a client: in this process
(:class:`~dreamo_async.coordination.LocalCoordinator`) or shared through Redis by
every process using one API key (:class:`~dreamo_async.coordination.RedisCoordinator`).
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Protocol

import attrs

__all__ = [
    "BudgetLedger",
    "Coordinator",
    "JobSlots",
    "Priority",
    "RateLimiter",
    "Reservation",
    "Spending",
]


class Priority(enum.IntEnum):
    """Which requests go first when several wait: work in flight finishes first."""

    POLL = 0
    CREATE = 1


class RateLimiter(Protocol):
    """What the transport needs from a limiter."""

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        """Wait until one request may be sent."""

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (a 429's ``Retry-After``)."""

    def record(self, status: int) -> None:
        """Feedback after each response (its HTTP status): how an adaptive limiter learns.

        Strict limiters ignore it; ``requests_per_second="auto"`` slows down on 429.
        """


class JobSlots(Protocol):
    """The ``max_concurrency`` slots of a client: one per job alive.

    ``acquire`` returns a token that ``release`` takes back (a Redis lease id, or
    nothing for the in-process pool). Waiters are served in FIFO order.
    """

    async def acquire(self) -> object:
        """Wait for a free slot."""

    async def release(self, token: object) -> None:
        """Give the slot back; must finish even if the caller is being cancelled
        (an implementation that awaits I/O shields it)."""

    @property
    def in_use(self) -> int:
        """Slots held by this process now."""

    @property
    def waiting(self) -> int:
        """Coroutines of this process waiting for a slot."""


class Coordinator(Protocol):
    """Where the pacing of a client's jobs is held: in this process, or shared (Redis) by
    many. Not to be confused with :class:`~dreamo_async.Limits`, the service's rules."""

    def make_limiter(self, rate: float | None, burst: int) -> RateLimiter:
        """The request limiter for ``rate`` requests/s (``None``: unlimited)."""

    def make_slots(self, max_concurrency: int) -> JobSlots:
        """The job slots."""

    async def aclose(self) -> None:
        """Release what the backend holds (connections, leases)."""


@attrs.frozen
class Spending:
    """What this client's jobs spent and hold (immutable snapshot; amounts in USD).

    With a Redis ledger the figures are those of every process sharing the key, as of
    this process's last exchange with Redis.
    """

    #: The cap (``max_spend``), or ``None``.
    cap: Decimal | None
    #: Reported costs of ended tasks, plus the estimates of those that reported none.
    spent: Decimal
    #: Estimates of the tasks created (or being created) and not ended yet.
    reserved: Decimal
    #: The part of ``spent`` that is estimates, not reported costs.
    estimated: Decimal
    completed: int
    failed: int
    in_flight: int
    #: Tasks that ended with neither a reported cost nor an estimate (probes): not in ``spent``.
    unpriced: int = 0

    @property
    def remaining(self) -> Decimal | None:
        """Room left under the cap for new tasks (``None`` without a cap)."""
        if self.cap is None:
            return None
        return max(Decimal(0), self.cap - self.spent - self.reserved)


class Reservation:
    """One job's hold on the budget: its estimate (``None`` for a probe) and image count."""

    __slots__ = ("amount", "blocking", "id", "images", "task_id")

    def __init__(self, id: str, amount: Decimal | None, images: int) -> None:
        self.id = id
        self.amount = amount
        self.images = images
        self.task_id: str | None = None
        #: A probe holds back every other create until it ends (or :meth:`unblock`).
        self.blocking = amount is None

    def __repr__(self) -> str:
        amount = "probe" if self.amount is None else f"${self.amount}"
        return f"<Reservation {self.id} {amount} images={self.images}>"


class BudgetLedger(Protocol):
    """Where spend and reservations are kept: this process, or Redis (shared)."""

    cap: Decimal | None

    async def reserve(self, estimate: Decimal | None, images: int) -> Reservation:
        """Hold ``estimate`` (``None``: the highest cost seen for ``images``, else a probe);
        wait while it may fit later; raise :class:`BudgetExceededError` when it cannot."""

    def settle(self, reservation: Reservation, cost: Decimal | None, *, failed: bool) -> None:
        """The task ended: count ``cost`` (``None``: the reservation's estimate) as spent."""

    def release(self, reservation: Reservation) -> None:
        """Nothing was created: give the reservation back."""

    def unblock(self, reservation: Reservation) -> None:
        """A probe whose job gave up (timeout, cancel) stops holding back other creates."""

    def snapshot(self) -> Spending: ...

    async def aclose(self) -> None: ...
