"""Bulk runs: many generations through one client, fed lazily, yielded as they end.

:class:`JobWindow` is the one feeding loop of both bulk paths: ``generate_many``
(:func:`run_many`, each job a ``generate``) and ``dreamo batch`` (``batch/engine.py``,
each job a create, a poll and journal writes). Both report :class:`BatchProgress`.

``run_many`` keeps about ``2 * max_concurrency`` jobs in hand: enough that a
free job slot never waits for the input iterable, few enough that a generator
of a million requests is never materialised. Every job ends as a result or an
error in a :class:`BatchItem`; nothing is dropped. With ``return_exceptions=False``
every result already in hand is yielded before the first error is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from .request import GenerationRequest

if TYPE_CHECKING:
    from .client import DreamOClient
    from .models import GenerationResult

__all__ = ["BatchItem", "BatchProgress", "JobWindow", "run_many"]

_S = TypeVar("_S")
_J = TypeVar("_J")
_T = TypeVar("_T")


@attrs.frozen
class BatchItem:
    """One finished job of :meth:`DreamOClient.generate_many`."""

    #: Position of the request in the input iterable.
    index: int
    request: GenerationRequest = attrs.field(repr=False)
    result: GenerationResult | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.frozen
class BatchProgress:
    """Progress of a bulk run: passed to ``generate_many``'s ``on_progress``, and the
    ``state`` of every ``dreamo batch`` event."""

    #: Jobs ended (``failed`` included; for a batch, ``skipped`` ones too).
    done: int
    failed: int
    #: Requests read so far; the final total once the input is exhausted.
    total: int | None
    cost: Any  # Decimal
    #: Jobs started and not ended (for a batch: creating or polling).
    running: int = 0
    #: Jobs not started yet (known for a batch, whose jobs are read up front).
    queued: int = 0
    #: Jobs a batch found completed by an earlier run (counted in ``done``).
    skipped: int = 0


class JobWindow(Generic[_S, _J, _T]):
    """At most ``size`` jobs in hand: inputs taken from ``source`` only as room frees up,
    each started as its own asyncio task, collected as they end.

    Enough in hand that a free job slot never waits for the input iterable, few enough
    that a generator of a million inputs is never materialised.
    """

    def __init__(
        self, source: Iterable[tuple[int, _S]], run: Callable[[_J], Awaitable[_T]], size: int
    ) -> None:
        self._source: Iterator[tuple[int, _S]] = iter(source)
        self._run = run
        self.size = max(1, size)
        self.running: dict[asyncio.Future[_T], tuple[int, _J]] = {}
        #: Inputs taken from the source so far.
        self.read = 0
        self.exhausted = False

    def take(self, held: int = 0) -> tuple[int, _S] | None:
        """The next input if there is room (``held``: finished items still in hand count
        against it), else ``None``."""
        if self.exhausted or len(self.running) + held >= self.size:
            return None
        try:
            item = next(self._source)
        except StopIteration:
            self.exhausted = True
            return None
        self.read += 1
        return item

    @property
    def active(self) -> int:
        """Jobs started and not ended (one that just ended is not collected yet)."""
        return sum(not task.done() for task in self.running)

    def start(self, index: int, job: _J) -> None:
        self.running[asyncio.ensure_future(self._run(job))] = (index, job)

    async def finished(self) -> list[tuple[int, _J, asyncio.Future[_T]]]:
        """Wait until at least one job ends; the ended ones, by index."""
        done, _ = await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
        ended = [(*self.running.pop(task), task) for task in done]
        return sorted(ended, key=lambda item: item[0])

    async def aclose(self) -> None:
        """Cancel the jobs still running and wait for them to end."""
        for task in self.running:
            task.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        self.running.clear()


async def run_many(
    client: DreamOClient,
    requests: Iterable[GenerationRequest | Mapping[str, Any]],
    *,
    return_exceptions: bool = True,
    ordered: bool = False,
    on_progress: Callable[[BatchProgress], None] | None = None,
    timeout: Any,
) -> AsyncGenerator[BatchItem, None]:
    """The engine behind :meth:`DreamOClient.generate_many`.

    ``timeout`` is passed to every ``generate`` as it came (the client's "unset"
    marker, ``None`` for no deadline, or seconds). Finished items waiting for an
    earlier one (``ordered``) count against the window, so what is in hand stays
    about ``2 * max_concurrency`` however slow the head of the line is.
    """
    window: JobWindow[GenerationRequest | Mapping[str, Any], GenerationRequest, Any] = JobWindow(
        enumerate(requests),
        lambda request: client.generate(request, timeout=timeout),
        2 * client.max_concurrency,
    )
    held: dict[int, BatchItem] = {}
    next_to_yield = 0
    done = failed = 0
    cost = Decimal(0)

    def refill() -> list[BatchItem]:
        """Start jobs until the window is full; a request that fails its checks ends at once."""
        immediate: list[BatchItem] = []
        while (taken := window.take(len(held))) is not None:
            index, raw = taken
            try:
                request = (
                    client.build_request(raw)
                    if isinstance(raw, GenerationRequest)
                    else client.build_request(**raw)
                )
            except Exception as exc:
                immediate.append(BatchItem(index=index, request=raw, error=exc))  # type: ignore[arg-type]
                continue
            window.start(index, request)
        return immediate

    try:
        pending_items = refill()
        while window.running or pending_items:
            if not pending_items:
                for index, request, job in await window.finished():
                    if job.cancelled():
                        error: BaseException | None = asyncio.CancelledError()
                        pending_items.append(BatchItem(index=index, request=request, error=error))
                    elif (exc := job.exception()) is not None:
                        pending_items.append(BatchItem(index=index, request=request, error=exc))
                    else:
                        pending_items.append(
                            BatchItem(index=index, request=request, result=job.result())
                        )
                pending_items.extend(refill())
            pending_items.sort(key=lambda item: item.index)
            outgoing, pending_items = pending_items, []
            for position, item in enumerate(outgoing):
                done += 1
                if item.error is not None:
                    failed += 1
                    if not return_exceptions:
                        # Paid results are never dropped: every job that finished well is
                        # yielded (by index) before the error is raised.
                        for extra in _finished_well(outgoing[position + 1 :], held, window):
                            yield extra
                        raise item.error
                elif item.result is not None and item.result.cost is not None:
                    cost += item.result.cost
                if on_progress is not None:
                    total = window.read if window.exhausted else None
                    on_progress(
                        BatchProgress(
                            done=done,
                            failed=failed,
                            total=total,
                            cost=cost,
                            running=window.active,
                        )
                    )
                if ordered:
                    held[item.index] = item
                else:
                    yield item
            while ordered and next_to_yield in held:
                yield held.pop(next_to_yield)
                next_to_yield += 1
    finally:
        await window.aclose()


def _finished_well(
    rest: list[BatchItem],
    held: dict[int, BatchItem],
    window: JobWindow[Any, GenerationRequest, Any],
) -> list[BatchItem]:
    """The successful items not yielded yet: the rest of this round, those held for
    order, and jobs that finished but were not collected. By index."""
    items = [item for item in (*rest, *held.values()) if item.ok]
    held.clear()
    for job, (index, request) in list(window.running.items()):
        if job.done() and not job.cancelled() and job.exception() is None:
            items.append(BatchItem(index=index, request=request, result=job.result()))
            del window.running[job]
    return sorted(items, key=lambda item: item.index)
