"""Bulk runs in Python: many generations through one client, fed lazily, yielded as they end.

(The resumable, journalled bulk runs of the ``dreamo batch`` command live in ``batch/``.)

``run_many`` keeps about ``2 * max_concurrency`` jobs in hand: enough that a
free job slot never waits for the input iterable, few enough that a generator
of a million requests is never materialised. Every job ends as a result or an
error in a :class:`BatchItem`; nothing is dropped. With ``return_exceptions=False``
every result already in hand is yielded before the first error is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs

from .request import GenerationRequest

if TYPE_CHECKING:
    from .client import DreamOClient
    from .models import GenerationResult

__all__ = ["BatchItem", "BatchProgress", "run_many"]


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
    """Progress of a bulk run, passed to ``on_progress``."""

    done: int
    failed: int
    #: Requests read so far; the final total once the input is exhausted.
    total: int | None
    cost: Any  # Decimal


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
    window = 2 * client.max_concurrency
    source: Iterator[tuple[int, GenerationRequest | Mapping[str, Any]]] = enumerate(requests)
    running: dict[asyncio.Task[Any], tuple[int, GenerationRequest]] = {}
    held: dict[int, BatchItem] = {}
    next_to_yield = 0
    read = done = failed = 0
    exhausted = False
    cost = Decimal(0)

    def refill() -> list[BatchItem]:
        """Start jobs until the window is full; a request that fails its checks ends at once."""
        nonlocal read, exhausted
        immediate: list[BatchItem] = []
        while not exhausted and len(running) + len(held) < window:
            try:
                index, raw = next(source)
            except StopIteration:
                exhausted = True
                break
            read += 1
            try:
                request = (
                    client.build_request(raw)
                    if isinstance(raw, GenerationRequest)
                    else client.build_request(**raw)
                )
            except Exception as exc:
                immediate.append(BatchItem(index=index, request=raw, error=exc))  # type: ignore[arg-type]
                continue
            job = asyncio.ensure_future(client.generate(request, timeout=timeout))
            running[job] = (index, request)
        return immediate

    try:
        pending_items = refill()
        while running or pending_items:
            if not pending_items:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for job in finished:
                    index, request = running.pop(job)
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
                        for extra in _finished_well(outgoing[position + 1 :], held, running):
                            yield extra
                        raise item.error
                elif item.result is not None and item.result.cost is not None:
                    cost += item.result.cost
                if on_progress is not None:
                    on_progress(
                        BatchProgress(
                            done=done, failed=failed, total=read if exhausted else None, cost=cost
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
        for job in running:
            job.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def _finished_well(
    rest: list[BatchItem],
    held: dict[int, BatchItem],
    running: dict[asyncio.Task[Any], tuple[int, GenerationRequest]],
) -> list[BatchItem]:
    """The successful items not yielded yet: the rest of this round, those held for
    order, and jobs that finished but were not collected. By index."""
    items = [item for item in (*rest, *held.values()) if item.ok]
    held.clear()
    for job, (index, request) in list(running.items()):
        if job.done() and not job.cancelled() and job.exception() is None:
            items.append(BatchItem(index=index, request=request, result=job.result()))
            del running[job]
    return sorted(items, key=lambda item: item.index)
