"""``DreamOClient``: one per process or web app, any number of concurrent jobs.

A job is ``generate``: check -> [job slot: prepare images -> create -> poll] ->
result. The slot (``max_concurrency``) covers the whole life of a job, so both
the memory held by encoded images and the number of tasks running at the
service are bounded. Every HTTP request also passes the rate limiter.

Each job carries one :class:`~dreamo_async.lifecycle.JobLifecycle`; every error that
leaves it is stamped with the job's money state. A job that ends early (its deadline,
a cancellation) once its task exists hands the task and its slot to a background
watcher, which polls it until the service reports its end and keeps its result for
:meth:`DreamOClient.wait`: ``max_concurrency`` bounds what runs at the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import ssl
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Self, Unpack, cast

import aiohttp
import anyio
import attrs

from ._create import create_task, prepare_body
from ._jobs import _Job, _Tracker
from ._loopbind import LoopBinding
from ._pollloop import poll_until_end
from ._setup import (
    API_KEY_ENV_VARS,
    BASE_URL_ENV_VAR,
    checked_base_url,
    make_limiters,
    mask_key,
)
from ._turns import StartTurns
from ._types import NOT_GIVEN, NotGiven
from ._watch import Watcher
from .bulk import BatchItem, BatchProgress, run_many
from .coordination import (
    Budget,
    BudgetLedger,
    Coordinator,
    LocalCoordinator,
    LocalLedger,
    LocalSlots,
    RateLimiter,
    Spending,
    to_money,
)
from .coordination.budget import ExpectedCost
from .errors import ClientClosedError, ConfigurationError, InvalidRequestError, TaskTimeoutError
from .images import (
    check_limiter,
    check_paths_readable,
    live_payload_count,
    warm_up_stage,
)
from .limits import DEFAULT_LIMITS, Limits
from .models import GenerationResult, Task
from .polling import PollPolicy
from .request import GenerationParams, GenerationRequest, check_keywords
from .retry import RetryPolicy
from .transport import DEFAULT_BASE_URL, Endpoints, Transport

__all__ = [
    "API_KEY_ENV_VARS",
    "BASE_URL_ENV_VAR",
    "ClientStatistics",
    "DreamOClient",
]

logger = logging.getLogger("dreamo_async")


@attrs.frozen
class ClientStatistics:
    """An immutable snapshot of what the client is doing right now.

    ``tasks_watched``: tasks whose job ended early (deadline, cancellation), watched
    until the service reports their end; each still holds a job slot (counted in
    ``jobs_running``). ``spending``: what the jobs spent and hold (``client.spending()``).
    """

    jobs_running: int
    jobs_waiting: int
    max_concurrency: int
    live_payloads: int
    tasks_watched: int = attrs.field(default=0, kw_only=True)
    spending: Spending | None = attrs.field(default=None, kw_only=True)




class DreamOClient:
    """An async client for the Spark DreamO image API.

    Use it as ``async with DreamOClient(...) as client:`` (or call
    :meth:`aclose`). Construction needs no running loop; the HTTP session is
    made inside the loop on first use. One client is meant to be shared by all
    the coroutines of a process: the limits it enforces are per client.

    The API key and the base URL come from the arguments, else from the environment
    (``DREAMO_API_KEY`` or ``VTRIX_API_KEY``; ``DREAMO_BASE_URL``), else (base URL
    only) the provider's default: argument > environment > default.

    A client belongs to one event loop at a time: the loop of its first job. Once that
    loop is closed (a second ``asyncio.run``), the next job starts afresh in the new
    loop; used from another loop while the first still runs (another thread), it
    raises :class:`ConfigurationError`: make one client per thread.

    Security options: ``allow_private_urls`` lets the client download image URLs
    (mixed with local images) from private, loopback and link-local addresses,
    refused by default; ``ssl_context`` replaces the system's trusted certificates
    (certificate verification itself cannot be turned off).

    Money: ``max_spend`` (USD; ``None`` = no cap) sends a create only while spent +
    reserved + this task's estimate stays within it, else the job raises
    :class:`BudgetExceededError` with nothing sent; ``expected_cost`` (per task, or a
    callable of the request) is the estimate (see :mod:`dreamo_async.budget`).
    With :class:`RedisCoordinator` the cap is shared by every process using the key.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        max_concurrency: int = 4,
        requests_per_second: float | Literal["auto"] | None = None,
        burst: int = 1,
        poll: PollPolicy | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        limiter: RateLimiter | None = None,
        coordinator: Coordinator | None = None,
        max_connections: int = 100,
        request_timeout: aiohttp.ClientTimeout | None = None,
        create_path: str | None = None,
        task_path: str | None = None,
        fit_images: bool = False,
        jitter_seed: int | None = None,
        allow_private_urls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        max_spend: Decimal | str | float | None = None,
        expected_cost: ExpectedCost = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        if limiter is not None and requests_per_second is not None:
            raise ConfigurationError(
                "pass either limiter= or requests_per_second=, not both: a given limiter "
                "sets the rate itself"
            )
        if api_key is None:
            api_key = next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        self._api_key = api_key
        endpoints = Endpoints(
            base_url=checked_base_url(
                base_url or os.environ.get(BASE_URL_ENV_VAR) or DEFAULT_BASE_URL
            ),
            **({"create_path": create_path} if create_path else {}),
            **({"task_path": task_path} if task_path else {}),
        )
        #: The event loop this client works in; only what the client made itself is
        #: remade for a new loop (a given limiter or backend may hold loop-bound state).
        self._loop = LoopBinding(remakes_limits=limiter is None and coordinator is None)
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        limiter, learn = make_limiters(self.coordinator, limiter, requests_per_second, burst)
        self.max_concurrency = max_concurrency
        self.poll_policy = poll or PollPolicy()
        self.limits = limits
        self.fit_images = fit_images
        self._rng = random.Random(jitter_seed)
        #: What a fresh transport is made of: a new event loop gets a new one (_check_open).
        self._transport_options: dict[str, Any] = {
            "api_key": api_key,
            "endpoints": endpoints,
            "retry": retry or RetryPolicy(),
            "limits": limits,
            "timeout": request_timeout,
            "max_connections": max_connections,
            "rng": self._rng,
            "allow_private_urls": allow_private_urls,
            "ssl_context": ssl_context,
            "learn_limiter": learn,
        }
        self._rate = (requests_per_second, burst)
        self._transport = Transport(limiter=limiter, **self._transport_options)
        self._slots = self.coordinator.make_slots(max_concurrency)
        #: The in-process slots, taken and given back without a coroutine when free.
        self._local_slots = self._slots if type(self._slots) is LocalSlots else None
        #: Running jobs (calls of generate, submit, wait), so aclose can end them.
        self._jobs: dict[asyncio.Task[Any], _Tracker] = {}
        self._budget = Budget(self._make_ledger(to_money(max_spend, "max_spend")), expected_cost)
        #: Abandoned tasks watched to their end, and their kept results.
        self._watcher = Watcher(self._poll, self._budget, self.poll_policy.timeout)
        #: Job starts take turns: a burst of calls does not hold the loop for all of them.
        self._start_turns = StartTurns()
        self._closed = False

    def _make_ledger(self, cap: Decimal | None) -> BudgetLedger:
        """A capped budget lives where the limits do (Redis is shared); no cap: this process."""
        make_budget = getattr(self.coordinator, "make_budget", None)
        if cap is None or make_budget is None:
            return LocalLedger(cap)
        return cast(BudgetLedger, make_budget(cap))

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._check_open()
        await warm_up_stage()  # imports and a thread start here, not in the first job
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End running jobs and stop watching abandoned tasks, then close the session.

        A job ended here raises :class:`ClientClosedError` (nothing sent, or its task
        named), or :class:`CreateOutcomeUnknownError` when its create was in flight.
        """
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        running = [job for job in self._jobs if job is not current and not job.done()]
        if running:
            logger.warning("closing the client cancels %d running job(s)", len(running))
            for job in running:
                self._jobs[job].closed_by_client = True
                job.cancel()
        watchers = self._watcher.stop()
        if running or watchers:
            await asyncio.wait([*running, *watchers], timeout=5.0)
        self._watcher.forget()  # a watcher cancelled before its first step never ran
        await self._budget.aclose()  # what is still open settles at its estimate
        await self._transport.aclose()
        await self.coordinator.aclose()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None and transport.is_open:
            _warn(
                f"unclosed {self!r}: use 'async with DreamOClient(...)' or 'await client.aclose()'",
                ResourceWarning,
                source=self,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<DreamOClient base_url={self._transport.endpoints.base_url} "
            f"key={mask_key(self._api_key)} "
            f"max_concurrency={self.max_concurrency} {state}>"
        )

    def statistics(self) -> ClientStatistics:
        """What the client is doing now (immutable snapshot)."""
        return ClientStatistics(
            jobs_running=self._slots.in_use,
            jobs_waiting=self._slots.waiting,
            max_concurrency=self.max_concurrency,
            live_payloads=live_payload_count(),
            tasks_watched=len(self._watcher.watches),
            spending=self._budget.snapshot(),
        )

    def spending(self) -> Spending:
        """Spent, reserved and the cap (``max_spend``), with task counts (immutable snapshot)."""
        return self._budget.snapshot()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this DreamOClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        if loop is not self._loop.loop and self._loop.enter(loop):
            # The previous loop is closed: what the client holds of it is dead (its
            # connections, waiters and tasks belong to it); start afresh in this one.
            self._jobs.clear()
            self._watcher.forget()
            # The old sessions are marked closed (their loop already dropped what they held).
            self._watcher.spawn(self._transport.aclose())
            limiter, _ = make_limiters(self.coordinator, None, *self._rate)
            self._transport = Transport(limiter=limiter, **self._transport_options)
            self._slots = self.coordinator.make_slots(self.max_concurrency)
            self._local_slots = self._slots if type(self._slots) is LocalSlots else None

    def _deadline(self, timeout: float | NotGiven | None) -> float | None:
        """The job's deadline in seconds, checked before anything queues (0 or -1 would
        create a task, then time out at once)."""
        if isinstance(timeout, NotGiven):
            return self.poll_policy.timeout
        if timeout is None:
            return None
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or math.isnan(timeout)
            or timeout <= 0
        ):
            raise InvalidRequestError(
                f"timeout must be a positive number of seconds or None; got {timeout!r}",
                parameter="timeout",
            )
        return float(timeout)

    async def _check_inputs(self, request: GenerationRequest) -> None:
        """What can fail without the service is checked before the job queues for a slot:
        the local files exist and are readable (a stat in a worker thread, one check
        at a time: a burst of jobs must not start a thread each)."""
        if any(source.kind == "path" for source in request.images):
            await anyio.to_thread.run_sync(
                check_paths_readable, request.images, limiter=check_limiter()
            )

    # -- building requests ---------------------------------------------------------

    def build_request(
        self, request: GenerationRequest | None = None, /, **params: Unpack[GenerationParams]
    ) -> GenerationRequest:
        """A checked request from a request object or keywords, against this client's limits.

        An unknown keyword is an :class:`InvalidRequestError` naming the closest one.
        """
        if params:
            check_keywords(params)
        if request is not None:
            if params or request.limits is not self.limits:
                # One check, against this client's limits; the result carries them, so
                # passing it again (generate_many -> generate) checks nothing twice.
                request = attrs.evolve(request, limits=self.limits, **params)
            return request
        return GenerationRequest(limits=self.limits, **params)

    # -- the public calls ----------------------------------------------------------

    async def generate(
        self,
        request: GenerationRequest | None = None,
        /,
        *,
        timeout: float | NotGiven | None = NOT_GIVEN,
        on_poll: Callable[[Task], None] | None = None,
        **params: Unpack[GenerationParams],
    ) -> GenerationResult:
        """Create a task and poll it to the end; return its result.

        ``timeout`` (seconds, default ``PollPolicy.timeout``) is the deadline of the
        job once it holds a slot; past it :class:`TaskTimeoutError` carries the task
        id so the caller can resume with :meth:`wait`. Failures raise
        :class:`TaskFailedError` with the provider's code. A job that times out or is
        cancelled once its task exists returns at once; the task keeps its slot and is
        watched until it ends (its result is kept for :meth:`wait`). ``on_poll`` is
        called with every task snapshot received, the create's answer first (a live
        status line), as in :meth:`wait`. The keywords are :class:`GenerationParams`.
        """
        await self._start_turns.wait_turn()
        built = self.build_request(request, **params)
        deadline_s = self._deadline(timeout)
        await self._check_inputs(built)
        async with self._job() as job:
            reservation = await self._budget.reserve(built)  # may wait; raises over the cap
            try:
                started = asyncio.get_running_loop().time()
                task = await self._create(built, job)
                try:
                    result = await self._poll(
                        task, started=started, timeout=deadline_s, on_poll=on_poll
                    )
                except TaskTimeoutError:
                    self._watcher.watch(job, task, None, "passed its deadline")
                    raise
                except asyncio.CancelledError as exc:
                    if not job.closed_by_client:
                        self._watcher.watch(job, task, None, "was cancelled")
                        exc.add_note(
                            f"task {task.id} exists and is watched: client.wait({task.id!r})"
                        )
                    raise
            except BaseException as exc:
                self._budget.finish(reservation, job.lifecycle, error=exc)
                raise
            job.lifecycle.ended(failed=False)
            self._budget.finish(reservation, job.lifecycle, result=result)
            return result

    async def submit(
        self,
        request: GenerationRequest | None = None,
        /,
        *,
        before_send: Callable[[str], Awaitable[None]] | None = None,
        **params: Unpack[GenerationParams],
    ) -> Task:
        """Create a task and return at once (no polling): the task id is yours to ``wait`` on.

        ``before_send(request_id)`` is awaited after the images are prepared, right
        before the create request first leaves, with the ``X-Request-Id`` it carries:
        the hook where a journal records that a task may exist from now on.
        """
        await self._start_turns.wait_turn()
        built = self.build_request(request, **params)
        await self._check_inputs(built)
        async with self._job() as job:
            reservation = await self._budget.reserve(built)
            try:
                task = await self._create(built, job, before_send=before_send)
            except BaseException as exc:
                self._budget.finish(reservation, job.lifecycle, error=exc)
                raise
            self._budget.keep(reservation, task.id)  # settled when wait() sees its end
            return task

    async def get_task(self, task_id: str) -> Task:
        """One poll of a task."""
        self._check_open()
        return await self._transport.get_task(task_id)

    async def wait(
        self,
        task_id: str | Task,
        *,
        timeout: float | NotGiven | None = NOT_GIVEN,
        on_poll: Callable[[Task], None] | None = None,
    ) -> GenerationResult:
        """Poll an existing task until it ends (resume after a timeout, a restart...).

        It takes no job slot: the task already runs at the service. Given the
        :class:`Task` that ``submit`` returned, polling starts from it (after the
        first delay, as ``generate`` does) instead of with an immediate poll.
        ``on_poll`` is called with every task snapshot received (a live status line).
        A task this client watches (its job ended early) is not polled twice: the
        call joins the watcher, or returns the kept result without a request.
        """
        self._check_open()
        deadline_s = self._deadline(timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        tid = task_id.id if isinstance(task_id, Task) else task_id
        with self._tracked() as job:
            job.lifecycle.created(tid)
            try:
                result = await self._wait_for(tid, task_id, job, deadline_s, started, on_poll)
            except BaseException as exc:
                self._budget.task_ended(tid, error=exc)
                raise
            self._budget.task_ended(tid, result=result)
            return result

    async def _wait_for(
        self,
        tid: str,
        task_id: str | Task,
        job: _Tracker,
        deadline_s: float | None,
        started: float,
        on_poll: Callable[[Task], None] | None,
    ) -> GenerationResult:
        """The body of :meth:`wait`: join a watcher, return a kept end, or poll."""
        loop = asyncio.get_running_loop()
        kept = await self._watcher.kept_end(tid, deadline_s)
        if kept is not None:
            job.lifecycle.ended(failed=False)
            return kept
        if isinstance(task_id, Task):
            first = task_id
        else:
            first = await self._transport.get_task(task_id)
        remaining = None if deadline_s is None else deadline_s - (loop.time() - started)
        result = await self._poll(first, started=loop.time(), timeout=remaining, on_poll=on_poll)
        job.lifecycle.ended(failed=False)
        return result

    async def download(
        self,
        url: str,
        directory: str | os.PathLike[str],
        stem: str,
        *,
        max_bytes: int | None = None,
    ) -> Path:
        """Save one result image as ``directory/stem.<ext>`` (atomically; see ``download.py``).

        Streamed with retries, capped at ``max_bytes`` (default
        ``Limits.max_download_bytes``), checked to be a JPEG, PNG or WebP by its
        bytes; the extension comes from the content. Raises :class:`DownloadError`.
        """
        from .download import download_to  # local: keeps file handling out of import time

        self._check_open()
        cap = self.limits.max_download_bytes if max_bytes is None else max_bytes
        return await download_to(self._transport, url, Path(directory), stem, max_bytes=cap)

    async def generate_many(
        self,
        requests: Iterable[GenerationRequest | GenerationParams],
        *,
        return_exceptions: bool = True,
        ordered: bool = False,
        on_progress: Callable[[BatchProgress], None] | None = None,
        timeout: float | NotGiven | None = NOT_GIVEN,
    ) -> AsyncGenerator[BatchItem, None]:
        """Run many generations; yield each :class:`BatchItem` as it finishes.

        Requests are read lazily from ``requests`` (any iterable, a generator of
        millions included): only about ``2 * max_concurrency`` are in hand at once.
        With ``return_exceptions=False`` the first error is raised (the rest are
        cancelled), once every job that already finished well was yielded (a paid
        result is never dropped). ``ordered=True`` yields in input order (after an
        error, the finished items in increasing index, with gaps).
        """
        self._deadline(timeout)  # a bad deadline is refused before any job starts

        # aclosing: when the caller stops early, the jobs still running are cancelled
        # now, not whenever the inner generator happens to be collected.
        async with contextlib.aclosing(
            run_many(
                self,
                requests,
                return_exceptions=return_exceptions,
                ordered=ordered,
                on_progress=on_progress,
                timeout=timeout,
            )
        ) as items:
            async for item in items:
                yield item

    # -- internals -----------------------------------------------------------------

    def _job(self) -> _Job:
        return _Job(self)

    def _tracked(self) -> _Tracker:
        return _Tracker(self)

    async def _create(
        self,
        request: GenerationRequest,
        job: _Job,
        *,
        before_send: Callable[[str], Awaitable[None]] | None = None,
    ) -> Task:
        """Prepare the body and send the create; the job's lifecycle follows it (a
        cancellation while the body may be on the wire: see :func:`create_task`)."""
        body = await prepare_body(request, self.limits, self.fit_images, self._fetch_input)
        return await create_task(self._transport, body, job, self._watcher, before_send=before_send)

    async def _fetch_input(self, url: str, max_bytes: int) -> bytes:
        # A URL from the user: public addresses only, unless allow_private_urls.
        return await self._transport.download(url, max_bytes, untrusted=True)

    def _poll(
        self,
        task: Task,
        *,
        started: float,
        timeout: float | None,
        on_poll: Callable[[Task], None] | None = None,
    ) -> Awaitable[GenerationResult]:
        return poll_until_end(
            self._transport,
            self.poll_policy,
            self._rng,
            task,
            started=started,
            timeout=timeout,
            on_poll=on_poll,
        )
