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
import functools
import logging
import math
import os
import random
import secrets
import ssl
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, cast

import aiohttp
import anyio
import attrs

from ._body import BodyParts
from .budget import Budget, BudgetLedger, ExpectedCost, LocalLedger, Spending, to_money
from .errors import (
    ClientClosedError,
    ConfigurationError,
    CreateOutcomeUnknownError,
    DreamOError,
    InvalidRequestError,
    MoneyState,
    TaskFailedError,
    TaskTimeoutError,
)
from .images import (
    _prepare_slow,
    check_paths_readable,
    live_payload_count,
    prepare_inline,
    warm_up_stage,
)
from .lifecycle import JobLifecycle
from .limits import DEFAULT_LIMITS, Limits
from .models import TERMINAL_STATUSES, GenerationResult, Task, TaskStatus
from .polling import PollPolicy, PollSchedule
from .ratelimit import AdaptiveLimiter, LimitsBackend, LocalLimits, LocalSlots, RateLimiter
from .request import GenerationRequest
from .retry import RetryPolicy, is_testing
from .transport import DEFAULT_BASE_URL, Endpoints, Transport
from .wire import create_body_parts, request_params

__all__ = ["BatchItem", "BatchProgress", "ClientStatistics", "DreamOClient"]

logger = logging.getLogger("dreamo_async")

#: Create bodies up to this size are joined into one buffer; larger ones are sent as
#: parts. aiohttp warns about bytes bodies over 1 MiB, and joining costs a copy.
_JOIN_MAX_BYTES: Final = 256 * 1024
#: How long past a job's deadline the answer of a poll sent at the deadline is awaited.
_LAST_POLL_GRACE_S: Final = 0.05
#: A job's deadline nearer than this arms the poll loop's timer (see _poll): more than
#: one poll attempt's timeout can last.
_ARM_S: Final = 120.0
#: Environment variables read for the API key, in order.
API_KEY_ENV_VARS: Final = ("DREAMO_API_KEY", "VTRIX_API_KEY")
#: Environment variable read for the base URL when ``base_url`` is not given.
BASE_URL_ENV_VAR: Final = "DREAMO_BASE_URL"
#: Results of watched tasks kept for ``wait`` (the most recent; each is a few hundred bytes).
_KEPT_RESULTS: Final = 256


class _Unset:
    """Marker for "not given" where ``None`` means something (no timeout)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Final = _Unset()


@attrs.frozen
class ClientStatistics:
    """An immutable snapshot of what the client is doing right now."""

    jobs_running: int
    jobs_waiting: int
    max_concurrency: int
    live_payloads: int
    #: Tasks whose job ended early (deadline, cancellation), watched until the service
    #: reports their end; each still holds a job slot (counted in ``jobs_running``).
    tasks_watched: int = 0
    #: What the jobs spent and hold (``client.spending()``).
    spending: Spending | None = None


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


def _make_limiter(
    backend: LimitsBackend, rate: float | Literal["auto"] | None, burst: int
) -> RateLimiter:
    """The request limiter: strict (a number), none (``None``) or learned (``"auto"``).

    ``"auto"`` needs the backend's optional ``make_adaptive_limiter`` (the in-process
    default has it). A shared backend without one is refused rather than given a
    per-process learned rate, which would silently stop sharing the budget.
    """
    if rate == "auto":
        factory = getattr(backend, "make_adaptive_limiter", None)
        if factory is None:
            raise ConfigurationError(
                f'requests_per_second="auto" is learned in one process; {backend!r} shares '
                "a fixed budget between processes: give requests_per_second a number"
            )
        return cast(RateLimiter, factory(burst))
    if isinstance(rate, str):
        raise ValueError(f'requests_per_second must be a number, None or "auto"; got {rate!r}')
    return backend.make_limiter(rate, burst)


def _learned(factory: Callable[[int], RateLimiter], burst: int, seen: float) -> RateLimiter:
    """The limiter a client without a rate switches to at its first 429, from the rate
    the service accepted just before (``"auto"``'s limiter, without its slow start)."""
    limiter = factory(burst)
    if isinstance(limiter, AdaptiveLimiter):
        limiter.settle(seen)
    return limiter


def _mask(key: str | None) -> str:
    if not key:
        return "missing"
    return f"...{key[-4:]}" if len(key) >= 12 else "***"


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
    With :class:`RedisLimits` the cap is shared by every process using the key.
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
        limits_backend: LimitsBackend | None = None,
        max_connections: int = 100,
        request_timeout: aiohttp.ClientTimeout | None = None,
        create_path: str | None = None,
        task_path: str | None = None,
        fit_images: bool = False,
        seed: int | None = None,
        allow_private_urls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        max_spend: Decimal | str | float | None = None,
        expected_cost: ExpectedCost = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        if api_key is None:
            api_key = next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        self._api_key = api_key
        endpoints = Endpoints(
            base_url=base_url or os.environ.get(BASE_URL_ENV_VAR) or DEFAULT_BASE_URL,
            **({"create_path": create_path} if create_path else {}),
            **({"task_path": task_path} if task_path else {}),
        )
        #: Only what the client made itself is remade for a new loop; a given limiter or
        #: backend may hold loop-bound state, so a second loop is refused with it.
        self._own_limits = limiter is None and limits_backend is None
        self.limits_backend: LimitsBackend = limits_backend or LocalLimits()
        learn = None
        if limiter is None:
            limiter = _make_limiter(self.limits_backend, requests_per_second, burst)
            if requests_per_second is None:
                # No rate given: full speed until the service answers 429, then learned
                # as "auto" does (a backend that shares a fixed budget has no learning).
                factory = getattr(self.limits_backend, "make_adaptive_limiter", None)
                learn = None if factory is None else functools.partial(_learned, factory, burst)
        self.max_concurrency = max_concurrency
        self.poll_policy = poll or PollPolicy()
        self.limits = limits
        self.fit_images = fit_images
        self._rng = random.Random(seed)
        #: What a fresh transport is made of: a new event loop gets a new one (_bind_loop).
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
        self._slots = self.limits_backend.make_slots(max_concurrency)
        #: The in-process slots, taken and given back without a coroutine when free.
        self._local_slots = self._slots if type(self._slots) is LocalSlots else None
        #: Running jobs (calls of generate, submit, wait), so aclose can end them.
        self._jobs: dict[asyncio.Task[Any], _Tracker] = {}
        #: Background watchers of abandoned tasks (and the creates they wait for).
        self._background: set[asyncio.Task[Any]] = set()
        #: The watcher of each watched task, by task id (``wait`` joins it).
        self._watches: dict[str, asyncio.Task[Any]] = {}
        #: Ends of watched tasks (result or TaskFailedError), the latest _KEPT_RESULTS.
        self._kept: OrderedDict[str, GenerationResult | TaskFailedError] = OrderedDict()
        #: The event loop this client works in (see _bind_loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._budget = Budget(self._make_ledger(to_money(max_spend, "max_spend")), expected_cost)

    def _make_ledger(self, cap: Decimal | None) -> BudgetLedger:
        """A capped budget lives where the limits do (Redis is shared); no cap: this process."""
        make_budget = getattr(self.limits_backend, "make_budget", None)
        if cap is None or make_budget is None:
            return LocalLedger(cap)
        return cast(BudgetLedger, make_budget(cap))

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._check_open()
        await warm_up_stage()  # imports and a thread start here, not in the first job
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        watchers = [task for task in self._background if not task.done()]
        if self._watches:
            logger.warning(
                "closing the client stops watching %d task(s) still running at the service: %s",
                len(self._watches),
                ", ".join(sorted(self._watches)),
            )
        for task in watchers:
            task.cancel()
        if running or watchers:
            await asyncio.wait([*running, *watchers], timeout=5.0)
        self._watches.clear()  # a watcher cancelled before its first step never ran
        await self._budget.aclose()  # what is still open settles at its estimate
        await self._transport.aclose()
        await self.limits_backend.aclose()

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
            f"key={_mask(self._api_key)} "
            f"max_concurrency={self.max_concurrency} {state}>"
        )

    def statistics(self) -> ClientStatistics:
        """What the client is doing now (immutable snapshot)."""
        return ClientStatistics(
            jobs_running=self._slots.in_use,
            jobs_waiting=self._slots.waiting,
            max_concurrency=self.max_concurrency,
            live_payloads=live_payload_count(),
            tasks_watched=len(self._watches),
            spending=self._budget.snapshot(),
        )

    def spending(self) -> Spending:
        """Spent, reserved and the cap (``max_spend``), with task counts (immutable snapshot)."""
        return self._budget.snapshot()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this DreamOClient is closed; create a new one")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind_loop(loop)

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Work in ``loop``: the first one, or a new one once the previous loop is closed.

        A closed loop's sessions, slots and limiter cannot be used again (their
        connections and waiters belong to it), so the client makes fresh ones; what it
        holds of the old loop is already dead. Two live loops at once (threads) would
        split ``max_concurrency`` and the rate between them: refused.
        """
        old = self._loop
        if old is not None:
            if not old.is_closed():
                raise ConfigurationError(
                    "this DreamOClient is in use by another event loop (another thread?); "
                    "make one client per thread or event loop"
                )
            if not self._own_limits:
                raise ConfigurationError(
                    "this DreamOClient was used in an event loop that is now closed, and its "
                    "limiter or limits_backend may belong to that loop; create the client "
                    "inside the coroutine that asyncio.run runs"
                )
            logger.info("the client's event loop was closed: starting afresh in a new one")
            self._jobs.clear()
            self._background.clear()
            self._watches.clear()
            # The old sessions are marked closed (their loop already dropped what they held).
            closing = loop.create_task(self._transport.aclose())
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)
            self._transport = Transport(
                limiter=_make_limiter(self.limits_backend, *self._rate),
                **self._transport_options,
            )
            self._slots = self.limits_backend.make_slots(self.max_concurrency)
            self._local_slots = self._slots if type(self._slots) is LocalSlots else None
        self._loop = loop

    def _deadline(self, timeout: float | _Unset | None) -> float | None:
        """The job's deadline in seconds, checked before anything queues (0 or -1 would
        create a task, then time out at once)."""
        if isinstance(timeout, _Unset):
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
        the local files exist and are readable (a stat in a worker thread)."""
        if any(source.kind == "path" for source in request.images):
            await anyio.to_thread.run_sync(check_paths_readable, request.images)

    # -- building requests ---------------------------------------------------------

    def build_request(
        self, request: GenerationRequest | None = None, /, **params: Any
    ) -> GenerationRequest:
        """A checked request from a request object or keywords, against this client's limits."""
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
        timeout: float | _Unset | None = _UNSET,
        **params: Any,
    ) -> GenerationResult:
        """Create a task and poll it to the end; return its result.

        ``timeout`` (seconds, default ``PollPolicy.timeout``) is the deadline of the
        job once it holds a slot; past it :class:`TaskTimeoutError` carries the task
        id so the caller can resume with :meth:`wait`. Failures raise
        :class:`TaskFailedError` with the provider's code. A job that times out or is
        cancelled once its task exists returns at once; the task keeps its slot and is
        watched until it ends (its result is kept for :meth:`wait`).
        """
        built = self.build_request(request, **params)
        deadline_s = self._deadline(timeout)
        await self._check_inputs(built)
        async with self._job() as job:
            reservation = await self._budget.reserve(built)  # may wait; raises over the cap
            try:
                started = asyncio.get_running_loop().time()
                task = await self._create(built, job)
                try:
                    result = await self._poll(task, started=started, timeout=deadline_s)
                except TaskTimeoutError:
                    self._watch(job, task, None, "passed its deadline")
                    raise
                except asyncio.CancelledError as exc:
                    if not job.closed_by_client:
                        self._watch(job, task, None, "was cancelled")
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
        **params: Any,
    ) -> Task:
        """Create a task and return at once (no polling): the task id is yours to ``wait`` on.

        ``before_send(request_id)`` is awaited after the images are prepared, right
        before the create request first leaves, with the ``X-Request-Id`` it carries:
        the hook where a journal records that a task may exist from now on.
        """
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
        timeout: float | _Unset | None = _UNSET,
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
        watcher = self._watches.get(tid)
        if watcher is not None:
            await asyncio.wait([watcher], timeout=deadline_s)
            if tid not in self._kept and not watcher.done():
                raise TaskTimeoutError(tid, float(deadline_s or 0))
        kept = self._kept.get(tid)
        if kept is not None:
            if isinstance(kept, TaskFailedError):
                raise TaskFailedError(kept.task_id, kept.code, kept.message)
            job.lifecycle.ended(failed=False)
            return kept
        if isinstance(task_id, Task):
            first = task_id
        else:
            first = await self._transport.get_task(task_id)
        remaining = None if deadline_s is None else deadline_s - (loop.time() - started)
        result = await self._poll(
            first, started=loop.time(), timeout=remaining, on_poll=on_poll
        )
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
        requests: Iterable[GenerationRequest | Mapping[str, Any]],
        *,
        return_exceptions: bool = True,
        ordered: bool = False,
        on_progress: Callable[[BatchProgress], None] | None = None,
        timeout: float | _Unset | None = _UNSET,
    ) -> AsyncGenerator[BatchItem, None]:
        """Run many generations; yield each :class:`BatchItem` as it finishes.

        Requests are read lazily from ``requests`` (any iterable, a generator of
        millions included): only about ``2 * max_concurrency`` are in hand at once.
        With ``return_exceptions=False`` the first error is raised (the rest are
        cancelled), once every job that already finished well was yielded (a paid
        result is never dropped). ``ordered=True`` yields in input order (after an
        error, the finished items in increasing index, with gaps).
        """
        from .bulk import run_many  # local: bulk imports this module

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
        lifecycle: JobLifecycle | None = None,
    ) -> Task:
        """Prepare the body and send the create; the job's lifecycle follows it.

        The create runs as its own asyncio task. A caller's cancellation while the
        body may be on the wire does not abort it: it goes on in the background (bounded
        by the request's timeout, never sent again), so a task it makes is known and
        watched instead of lost. ``aclose`` aborts it: the outcome is then unknown.
        """
        prepared = None if self.fit_images else prepare_inline(request.images, self.limits)
        if prepared is None:
            # URLs alone pass through, with no I/O; files, data URIs, large or fitted
            # images, and URLs mixed with local images (downloaded first) go to the
            # worker thread. prepare_images would run prepare_inline again.
            prepared = await _prepare_slow(
                request.images, self.limits, self._fetch_input, self.fit_images
            )
        params = request_params(request)
        parts = create_body_parts(request.model, params, prepared.base64, prepared.urls)
        del prepared  # the encoded images now live only in the body's parts
        # Small bodies go as one buffer (aiohttp sends it with the headers in one
        # syscall); large ones as their parts, never joined (a copy of up to 31 MB).
        body: bytes | BodyParts = (
            BodyParts(parts) if sum(map(len, parts)) > _JOIN_MAX_BYTES else b"".join(parts)
        )
        del parts
        request_id = secrets.token_hex(16)  # 32 hex digits, as uuid4().hex, 5x cheaper
        lifecycle = job.lifecycle
        create = asyncio.ensure_future(
            self._transport.create(
                body, request_id=request_id, before_send=before_send, lifecycle=lifecycle
            )
        )
        try:
            task = await asyncio.shield(create)
        except asyncio.CancelledError:
            if job.closed_by_client or self._closed or lifecycle.state is MoneyState.NOT_SENT:
                # Closing, or nothing left yet: abort (the job's error says which).
                create.cancel()
                await asyncio.wait([create])
                if not create.cancelled() and create.exception() is None:
                    lifecycle.created(create.result().id)
                if job.closed_by_client and lifecycle.task_may_exist:
                    logger.warning(
                        "the client was closed while a create was in flight; a task may "
                        "exist (X-Request-Id %s)",
                        request_id,
                    )
            else:
                self._watch(job, None, create, "was cancelled while its create was in flight")
            raise
        if isinstance(body, BodyParts):
            await body.release()  # megabytes freed a part at a time, not in one callback
        logger.info("created task %s (%s; X-Request-Id %s)", task.id, task.raw_status, request_id)
        return task

    def _watch(
        self, job: _Job, task: Task | None, create: asyncio.Task[Task] | None, why: str
    ) -> None:
        """Hand an abandoned task (or its create still in flight) and the job's slot to a
        background watcher (none once the client is closing: ``aclose`` ends everything)."""
        if self._closed:
            return
        job.handed_over = True
        job.lifecycle.abandoned = True  # from now on a refused create is not sent again
        watcher = asyncio.ensure_future(self._watch_until_end(job, task, create, why))
        self._background.add(watcher)
        watcher.add_done_callback(self._background.discard)
        if task is not None:
            self._watches[task.id] = watcher

    async def _watch_until_end(
        self, job: _Job, task: Task | None, create: asyncio.Task[Task] | None, why: str
    ) -> None:
        """Poll an abandoned task at the poll policy's pace until the service reports its
        end (at most ``PollPolicy.timeout``); keep its end for ``wait``; free the slot."""
        lifecycle = job.lifecycle
        try:
            if task is None:
                assert create is not None
                try:
                    task = await create
                except asyncio.CancelledError:
                    logger.warning(
                        "stopped waiting for the create of a cancelled job; a task may exist "
                        "(X-Request-Id %s)",
                        lifecycle.request_id,
                    )
                    raise
                except BaseException as exc:
                    lifecycle.stamp(exc)
                    if lifecycle.task_may_exist:
                        logger.warning(
                            "the create of a cancelled job failed (%s); a task may exist "
                            "(X-Request-Id %s)",
                            exc,
                            lifecycle.request_id,
                        )
                    return
                lifecycle.created(task.id)
                self._watches[task.id] = asyncio.current_task()  # type: ignore[assignment]
            logger.warning(
                "task %s is still running at the service after its job %s: watched until it "
                "ends, holding its job slot; client.wait(%r) returns its result",
                task.id,
                why,
                task.id,
            )
            loop = asyncio.get_running_loop()
            try:
                result = await self._poll(
                    task, started=loop.time(), timeout=self.poll_policy.timeout
                )
            except TaskFailedError as exc:
                lifecycle.ended(failed=True)
                self._keep(task.id, exc)
            except DreamOError as exc:
                logger.warning("stopped watching task %s: %s", task.id, exc)
            else:
                lifecycle.ended(failed=False)
                self._keep(task.id, result)
                logger.info("watched task %s ended: its result is kept for wait()", task.id)
        finally:
            if task is not None:
                self._watches.pop(task.id, None)
            await job.release_slot()

    def _keep(self, task_id: str, end: GenerationResult | TaskFailedError) -> None:
        """Keep the end of a watched task for ``wait``, and settle what it reserved."""
        if isinstance(end, TaskFailedError):
            self._budget.task_ended(task_id, error=end)
        else:
            self._budget.task_ended(task_id, result=end)
        self._kept[task_id] = end
        while len(self._kept) > _KEPT_RESULTS:
            self._kept.popitem(last=False)

    async def _fetch_input(self, url: str, max_bytes: int) -> bytes:
        # A URL from the user: public addresses only, unless allow_private_urls.
        return await self._transport.download(url, max_bytes, untrusted=True)

    async def _poll(
        self,
        task: Task,
        *,
        started: float,
        timeout: float | None,
        on_poll: Callable[[Task], None] | None = None,
    ) -> GenerationResult:
        loop = asyncio.get_running_loop()
        if on_poll is not None:
            on_poll(task)
        deadline = None if timeout is None else started + timeout
        now = loop.time()  # one clock read per answer: the next delay is reckoned from it
        schedule = PollSchedule(self.poll_policy, started_at=now, rng=self._rng)
        schedule.observe(now, task.progress)
        # The deadline bounds everything below (a slow answer, retries, backoff, the
        # limiter's wait): one timer for the whole loop, not one per poll. The last poll,
        # sent at the deadline, may still see the task end: its answer gets a short grace.
        # Its timer is armed only once the deadline is near: a far one cannot be passed by
        # one poll (get_task bounds its retries by it), and a timer per job costs the loop.
        scope = asyncio.timeout(None) if deadline is not None else None
        try:
            async with scope or contextlib.nullcontext():
                while task.status not in TERMINAL_STATUSES:
                    delay = 0.0 if is_testing() else schedule.next_delay(now)
                    if deadline is not None:
                        if now >= deadline:
                            raise TaskTimeoutError(task.id, float(timeout or 0), task.raw_status)
                        delay = min(delay, deadline - now)
                        if scope is not None and scope.when() is None and deadline - now < _ARM_S:
                            scope.reschedule(deadline + _LAST_POLL_GRACE_S)
                    if delay > 0:  # zero: poll at once, without a trip round the loop
                        await asyncio.sleep(delay)
                    task = await self._transport.get_task(
                        task.id, deadline=math.inf if deadline is None else deadline
                    )
                    now = loop.time()
                    schedule.observe(now, task.progress)
                    if on_poll is not None:
                        on_poll(task)
        except TimeoutError as exc:
            if isinstance(exc, TaskTimeoutError) and exc.timeout:
                raise
            if isinstance(exc, TaskTimeoutError) or (scope is not None and scope.expired()):
                raise TaskTimeoutError(task.id, float(timeout or 0), task.raw_status) from None
            raise
        if task.status is TaskStatus.FAILED:
            error = task.error
            raise TaskFailedError(
                task.id, error.code if error else None, error.message if error else None
            )
        return GenerationResult.from_task(task)


class _JobState(JobLifecycle):
    """A job's lifecycle, plus the client's rule for jobs abandoned by their caller."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        super().__init__()
        #: The job's caller is gone: a refused create must not be sent again.
        self.abandoned = False

    def sending(self, request_id: str) -> None:
        if self.abandoned and self.state is MoneyState.NOT_SENT:
            raise _CreateAbandoned(request_id)
        super().sending(request_id)


class _CreateAbandoned(Exception):
    """A retry of the create of a cancelled job: nothing was created, nothing is sent."""


class _Tracker:
    """Registers the current asyncio task as a job, so ``aclose`` can end it, and stamps
    every error that leaves the job with its money state (:class:`JobLifecycle`).

    A job ended by ``aclose`` raises :class:`ClientClosedError` (or
    :class:`CreateOutcomeUnknownError` if its create was in flight) instead of
    ``CancelledError``: its caller did not ask for the cancellation. ``aclose`` says so
    with :attr:`closed_by_client`, not with a message to match.
    """

    __slots__ = ("_client", "_task", "closed_by_client", "lifecycle")

    def __init__(self, client: DreamOClient) -> None:
        self._client = client
        self._task: asyncio.Task[Any] | None = None
        #: The job's money state and ids, moved by the client and the transport.
        self.lifecycle = _JobState()
        #: Set by ``aclose`` before it cancels the job.
        self.closed_by_client = False

    def __enter__(self) -> Self:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._client._jobs[self._task] = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is not None:
            self._client._jobs.pop(task, None)
        if exc is None:
            return
        lifecycle = self.lifecycle
        if isinstance(exc, asyncio.CancelledError):
            if self.closed_by_client and task is not None and task.uncancel() == 0:
                raise self._closed_error() from exc
            return
        if isinstance(exc, TaskFailedError):
            lifecycle.ended(failed=True)
        if isinstance(exc, DreamOError):
            lifecycle.stamp(exc)
            return
        if isinstance(exc, Exception) and lifecycle.task_may_exist:
            # A bug or an unforeseen answer after the body may have left: never a bare
            # exception that reads as "nothing happened".
            error: DreamOError
            if lifecycle.task_id is None:
                error = CreateOutcomeUnknownError(
                    f"the create failed unexpectedly ({type(exc).__name__}: {exc})",
                    request_id=lifecycle.request_id,
                )
            else:
                error = DreamOError(
                    f"task {lifecycle.task_id} exists, but its job failed unexpectedly "
                    f"({type(exc).__name__}: {exc}); resume it with wait()"
                )
            lifecycle.stamp(error)
            raise error from exc

    def _closed_error(self) -> DreamOError:
        """What a job ended by ``aclose`` raises, from where its money stands."""
        lifecycle = self.lifecycle
        error: DreamOError
        if lifecycle.task_id is not None:
            error = ClientClosedError(
                f"the client was closed while this job was running (task {lifecycle.task_id} "
                "exists: resume it with wait() on a new client)"
            )
        elif lifecycle.task_may_exist:
            error = CreateOutcomeUnknownError(
                "the client was closed while the create request was in flight",
                request_id=lifecycle.request_id,
            )
        else:
            error = ClientClosedError(
                "the client was closed while this job was waiting; nothing was sent"
            )
        lifecycle.stamp(error)
        return error


class _Job(_Tracker):
    """A tracked job that also holds a job slot while it runs (``async with``).

    A job that hands its task to a watcher (:attr:`handed_over`) leaves the slot to it.
    """

    __slots__ = ("_token", "handed_over")

    def __init__(self, client: DreamOClient) -> None:
        super().__init__(client)
        self._token: object = None
        self.handed_over = False

    async def __aenter__(self) -> _Job:
        client = self._client
        client._check_open()
        # Registered before waiting for a slot: aclose() also ends jobs still queued.
        self.__enter__()
        local = client._local_slots
        if local is not None and local.try_acquire():
            return self  # a free in-process slot: no coroutine
        try:
            self._token = await client._slots.acquire()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def release_slot(self) -> None:
        local = self._client._local_slots
        if local is not None:
            local.release_nowait()
        else:
            # JobSlots.release completes even when this job is being cancelled.
            await self._client._slots.release(self._token)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.handed_over:
                await self.release_slot()
        finally:
            self.__exit__(exc_type, exc, tb)
