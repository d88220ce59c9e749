"""Spending you can see and cap: ``DreamOClient(max_spend=...)`` and ``client.spending()``.

The rule: a create is sent only when ``spent + reserved + estimate <= cap``, checked
after the job holds its slot and before the create takes its rate turn.

- *spent*: the costs reported by tasks that ended, plus the estimate of each task that
  ended without a reported cost (failed tasks included: whether they are billed is
  unknown) and of each create whose outcome is unknown (it may be billed).
- *reserved*: the estimate of every task created (or being created) and not ended yet.
- *estimate*: ``expected_cost`` (a number per task, or a callable of the request), else
  the highest cost seen so far for a request with as many images, else none: the task
  is a *probe*: sent only while no other probe runs and there is room left, and no
  other create is sent until it ends (one task at a time until a cost is known; a
  probe whose job timed out or was cancelled stops holding the others back).

A job that does not fit waits while other tasks are in flight (they may end cheaper
than reserved) and raises :class:`~dreamo_async.errors.BudgetExceededError` (nothing
sent) once ``spent + estimate`` alone is over the cap. This module holds the rules and
the in-process ledger; :mod:`dreamo_async.coordination.redis_budget` keeps the ledger in Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import (
    BudgetExceededError,
    ConfigurationError,
    DreamOError,
    MoneyState,
    NotFoundError,
    TaskFailedError,
)
from ..lifecycle import JobLifecycle
from ..models import GenerationResult
from ..request import GenerationRequest
from .protocols import BudgetLedger, Reservation, Spending

__all__ = ["Budget", "BudgetLedger", "LocalLedger", "Reservation", "Spending", "to_money"]

logger = logging.getLogger("dreamo_async")

#: ``expected_cost=``: a cost per task, or a function of the request giving one.
ExpectedCost = Decimal | str | int | float | Callable[[GenerationRequest], Any] | None


def to_money(value: object, name: str) -> Decimal | None:
    """``value`` as a finite, non-negative Decimal (``None`` stays ``None``).

    Floats go through ``str`` (``0.1`` is 0.1, not its binary expansion).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int | float):
        raise ConfigurationError(f"{name} must be a Decimal, a string or a number, got {value!r}")
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ConfigurationError(f"{name} must be an amount in USD, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigurationError(f"{name} must be a finite amount >= 0, got {value!r}")
    return amount


def _exceeded(cap: Decimal, spent: Decimal, reserved: Decimal, estimate: Decimal | None) -> Any:
    return BudgetExceededError(cap=cap, spent=spent, reserved=reserved, estimate=estimate)


class LocalLedger:
    """The ledger of one process: exact Decimals, waiters woken by every settle."""

    def __init__(self, cap: Decimal | None) -> None:
        self.cap = cap
        self._spent = Decimal(0)
        self._estimated = Decimal(0)
        self._reserved = Decimal(0)
        self._probes = 0
        self._in_flight = 0
        self._completed = 0
        self._failed = 0
        self._unpriced = 0
        #: Highest reported cost per image count: the default estimate.
        self._highest: dict[int, Decimal] = {}
        self._ids = 0
        self._changed: asyncio.Event | None = None

    async def reserve(self, estimate: Decimal | None, images: int) -> Reservation:
        while True:
            amount = estimate if estimate is not None else self._highest.get(images)
            if self._fits(amount):
                self._ids += 1
                reservation = Reservation(str(self._ids), amount, images)
                self._in_flight += 1
                if amount is None:
                    self._probes += 1
                else:
                    self._reserved += amount
                return reservation
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def _fits(self, amount: Decimal | None) -> bool:
        """True: send now; False: wait for a settle; raises when it never can fit."""
        cap = self.cap
        if cap is None:
            return True
        if amount is None:  # a probe: alone, while there is room at all
            if self._spent >= cap:
                raise _exceeded(cap, self._spent, self._reserved, None)
            return self._probes == 0 and self._spent + self._reserved < cap
        if self._spent + amount > cap:
            raise _exceeded(cap, self._spent, self._reserved, amount)
        return self._probes == 0 and self._spent + self._reserved + amount <= cap

    def settle(self, reservation: Reservation, cost: Decimal | None, *, failed: bool) -> None:
        if cost is not None:
            if reservation.images not in self._highest or cost > self._highest[reservation.images]:
                self._highest[reservation.images] = cost
            self._spent += cost
        elif reservation.amount is not None:
            self._spent += reservation.amount
            self._estimated += reservation.amount
        else:
            self._unpriced += 1
            logger.warning(
                "a task ended with no reported cost and no estimate: the cap cannot count "
                "it (give DreamOClient(expected_cost=...))"
            )
        if failed:
            self._failed += 1
        else:
            self._completed += 1
        self._drop(reservation)

    def release(self, reservation: Reservation) -> None:
        self._drop(reservation)

    def unblock(self, reservation: Reservation) -> None:
        if reservation.blocking:
            reservation.blocking = False
            self._probes -= 1
            self._wake()

    def _drop(self, reservation: Reservation) -> None:
        self._in_flight -= 1
        if reservation.amount is not None:
            self._reserved -= reservation.amount
        elif reservation.blocking:
            self._probes -= 1
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def snapshot(self) -> Spending:
        counts = (self._completed, self._failed, self._in_flight, self._unpriced)
        return Spending(self.cap, self._spent, self._reserved, self._estimated, *counts)

    async def aclose(self) -> None:
        return None


class Budget:
    """The client's side of the budget: estimates, and what each job's end means for money.

    A job calls :meth:`reserve` once it holds its slot, and :meth:`finish` when it ends
    (with its result or error and its :class:`JobLifecycle`). A task that outlives its
    job (``submit``, a timeout, a cancelled poll) keeps its reservation under its id
    until :meth:`task_ended` (``wait``) or :meth:`aclose` (settled at its estimate).
    """

    def __init__(self, ledger: BudgetLedger, expected_cost: ExpectedCost = None) -> None:
        self.ledger = ledger
        self._expected: Callable[[GenerationRequest], Any] | None = None
        self._fixed: Decimal | None = None
        if callable(expected_cost):
            self._expected = expected_cost
        else:
            self._fixed = to_money(expected_cost, "expected_cost")
        #: task id -> reservation of tasks that outlived their job.
        self._open: dict[str, Reservation] = {}

    def estimate(self, request: GenerationRequest) -> Decimal | None:
        """``expected_cost`` for ``request``; ``None`` leaves it to the ledger."""
        if self._expected is not None:
            return to_money(self._expected(request), "expected_cost(request)")
        return self._fixed

    async def reserve(self, request: GenerationRequest) -> Reservation:
        return await self.ledger.reserve(self.estimate(request), len(request.images))

    def finish(
        self,
        reservation: Reservation,
        lifecycle: JobLifecycle,
        *,
        result: GenerationResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The job ended: release, settle, or keep the reservation for a task still running."""
        if result is not None:
            self.ledger.settle(reservation, result.cost, failed=False)
        elif isinstance(error, TaskFailedError):
            self.ledger.settle(reservation, None, failed=True)
        elif lifecycle.state is MoneyState.NOT_SENT and lifecycle.task_id is None:
            self.ledger.release(reservation)
        elif lifecycle.task_id is not None:
            # The job gave up on a task that runs on: a probe must not hold back the rest.
            self.ledger.unblock(reservation)
            self.keep(reservation, lifecycle.task_id)
        else:
            # The create's outcome is unknown: it may be billed and never be known.
            self.ledger.settle(reservation, None, failed=True)

    def keep(self, reservation: Reservation, task_id: str) -> None:
        """The task runs on past its job: its reservation stays until it ends."""
        reservation.task_id = task_id
        self._open[task_id] = reservation

    def task_ended(
        self,
        task_id: str,
        *,
        result: GenerationResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """``wait`` saw the end of a task that outlived its job (else nothing to do)."""
        reservation = self._open.get(task_id)
        if reservation is None:
            return
        if result is not None:
            self.ledger.settle(self._open.pop(task_id), result.cost, failed=False)
        elif isinstance(error, TaskFailedError | NotFoundError) or (
            isinstance(error, DreamOError) and error.money_state is MoneyState.FAILED
        ):
            self.ledger.settle(self._open.pop(task_id), None, failed=True)

    def snapshot(self) -> Spending:
        return self.ledger.snapshot()

    async def aclose(self) -> None:
        """Tasks never seen to end are counted at their estimate (they may be billed)."""
        open_, self._open = list(self._open.values()), {}
        for reservation in open_:
            self.ledger.settle(reservation, None, failed=True)
        await self.ledger.aclose()
