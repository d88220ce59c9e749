"""``DreamOClient``: one per process or web app, any number of concurrent jobs.

A job is ``generate``: check -> [job slot: prepare images -> create -> poll] ->
result. The slot (``max_concurrency``) covers the whole life of a job, so both
the memory held by encoded images and the number of tasks running at the
service are bounded. Every HTTP request also passes the rate limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import ssl
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, cast

import aiohttp
import attrs

from ._body import BodyParts
from .budget import Budget, BudgetLedger, ExpectedCost, LocalLedger, Spending, to_money
from .errors import (
    ClientClosedError,
    ConfigurationError,
    TaskFailedError,
    TaskTimeoutError,
)
from .images import _prepare_slow, live_payload_count, prepare_inline
from .lifecycle import JobLifecycle
from .limits import DEFAULT_LIMITS, Limits
from .models import TERMINAL_STATUSES, GenerationResult, Task, TaskStatus
from .polling import PollPolicy, PollSchedule
from .ratelimit import LimitsBackend, LocalLimits, LocalSlots, RateLimiter
from .request import GenerationRequest
from .retry import RetryPolicy, is_testing
from .transport import DEFAULT_BASE_URL, Endpoints, Transport
from .wire import create_body_parts, request_params

__all__ = ["BatchItem", "BatchProgress", "ClientStatistics", "DreamOClient"]

logger = logging.getLogger("dreamo_async")

#: Create bodies up to this size are joined into one buffer; larger ones are sent as
#: parts. aiohttp warns about bytes bodies over 1 MiB, and joining costs a copy.
_JOIN_MAX_BYTES: Final = 256 * 1024
#: Environment variables read for the API key, in order.
API_KEY_ENV_VARS: Final = ("DREAMO_API_KEY", "VTRIX_API_KEY")


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
            base_url=base_url or DEFAULT_BASE_URL,
            **({"create_path": create_path} if create_path else {}),
            **({"task_path": task_path} if task_path else {}),
        )
        self.limits_backend: LimitsBackend = limits_backend or LocalLimits()
        if limiter is None:
            limiter = _make_limiter(self.limits_backend, requests_per_second, burst)
        self.max_concurrency = max_concurrency
        self.poll_policy = poll or PollPolicy()
        self.limits = limits
        self.fit_images = fit_images
        self._rng = random.Random(seed)
        self._transport = Transport(
            api_key=api_key,
            endpoints=endpoints,
            retry=retry or RetryPolicy(),
            limiter=limiter,
            limits=limits,
            timeout=request_timeout,
            max_connections=max_connections,
            rng=self._rng,
            allow_private_urls=allow_private_urls,
            ssl_context=ssl_context,
        )
        self._slots = self.limits_backend.make_slots(max_concurrency)
        #: The in-process slots, taken and given back without a coroutine when free.
        self._local_slots = self._slots if type(self._slots) is LocalSlots else None
        self._jobs: set[asyncio.Task[Any]] = set()
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
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel running jobs (they raise :class:`ClientClosedError`) and close the session."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        running = [job for job in self._jobs if job is not current and not job.done()]
        if running:
            logger.warning("closing the client cancels %d running job(s)", len(running))
            for job in running:
                job.cancel("DreamOClient closed")
            await asyncio.wait(running, timeout=5.0)
        await self._budget.aclose()
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
            f"<DreamOClient {self._transport.endpoints.base_url} key={_mask(self._api_key)} "
            f"max_concurrency={self.max_concurrency} {state}>"
        )

    def statistics(self) -> ClientStatistics:
        """What the client is doing now (immutable snapshot)."""
        return ClientStatistics(
            jobs_running=self._slots.in_use,
            jobs_waiting=self._slots.waiting,
            max_concurrency=self.max_concurrency,
            live_payloads=live_payload_count(),
            spending=self._budget.snapshot(),
        )

    def spending(self) -> Spending:
        """Spent, reserved and the cap (``max_spend``), with task counts (immutable snapshot)."""
        return self._budget.snapshot()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this DreamOClient is closed; create a new one")

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
        :class:`TaskFailedError` with the provider's code.
        """
        built = self.build_request(request, **params)
        deadline_s = self.poll_policy.timeout if isinstance(timeout, _Unset) else timeout
        async with self._job() as job:
            lifecycle = JobLifecycle()
            reservation = await self._budget.reserve(built)  # may wait; raises over the cap
            try:
                started = asyncio.get_running_loop().time()
                task = await self._create(built, lifecycle=lifecycle)
                job.task_id = task.id  # a ClientClosedError from here on names the task
                result = await self._poll(task, started=started, timeout=deadline_s)
            except BaseException as exc:
                self._budget.finish(reservation, lifecycle, error=exc)
                raise
            self._budget.finish(reservation, lifecycle, result=result)
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
        async with self._job():
            lifecycle = JobLifecycle()
            reservation = await self._budget.reserve(built)
            try:
                task = await self._create(built, before_send=before_send, lifecycle=lifecycle)
            except BaseException as exc:
                self._budget.finish(reservation, lifecycle, error=exc)
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
        """
        self._check_open()
        deadline_s = self.poll_policy.timeout if isinstance(timeout, _Unset) else timeout
        loop = asyncio.get_running_loop()
        with self._tracked():
            tid = task_id.id if isinstance(task_id, Task) else task_id
            try:
                if isinstance(task_id, Task):
                    first = task_id
                else:
                    first = await self._transport.get_task(task_id)
                result = await self._poll(
                    first, started=loop.time(), timeout=deadline_s, on_poll=on_poll
                )
            except BaseException as exc:
                self._budget.task_ended(tid, error=exc)
                raise
            self._budget.task_ended(tid, result=result)
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
        cancelled). ``ordered=True`` yields in input order.
        """
        from .bulk import run_many  # local: bulk imports this module

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
        *,
        before_send: Callable[[str], Awaitable[None]] | None = None,
        lifecycle: JobLifecycle | None = None,
    ) -> Task:
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
        if lifecycle is None:
            lifecycle = JobLifecycle()
        try:
            task = await self._transport.create(
                body, request_id=request_id, before_send=before_send, lifecycle=lifecycle
            )
        except asyncio.CancelledError:
            logger.warning(
                "a create request was cancelled in flight; a task may exist (X-Request-Id %s)",
                request_id,
            )
            raise
        except BaseException as exc:
            lifecycle.stamp(exc)
            raise
        logger.info("created task %s (%s; X-Request-Id %s)", task.id, task.raw_status, request_id)
        return task

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
        while task.status not in TERMINAL_STATUSES:
            delay = 0.0 if is_testing() else schedule.next_delay(now)
            if deadline is not None:
                if now >= deadline:
                    raise TaskTimeoutError(task.id, float(timeout or 0), task.raw_status)
                delay = min(delay, deadline - now)
            if delay > 0:  # zero: poll at once, without a trip round the loop
                await asyncio.sleep(delay)
            task = await self._transport.get_task(task.id)
            now = loop.time()
            schedule.observe(now, task.progress)
            if on_poll is not None:
                on_poll(task)
        if task.status is TaskStatus.FAILED:
            error = task.error
            raise TaskFailedError(
                task.id, error.code if error else None, error.message if error else None
            )
        return GenerationResult.from_task(task)


class _Tracker:
    """Registers the current asyncio task as a job, so ``aclose`` can cancel it.

    A job cancelled by ``aclose`` raises :class:`ClientClosedError` instead of
    ``CancelledError``: its caller did not ask for the cancellation.
    """

    __slots__ = ("_client", "_task", "task_id")

    def __init__(self, client: DreamOClient) -> None:
        self._client = client
        self._task: asyncio.Task[Any] | None = None
        #: The task the job created, once it exists: a job ended by ``aclose`` then
        #: says which task to resume with ``wait`` (it may still finish, and is paid).
        self.task_id: str | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._client._jobs.add(self._task)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None:
            return
        self._client._jobs.discard(task)
        if (
            exc_type is asyncio.CancelledError
            and self._client._closed
            and task.cancelling()
            and any(arg == "DreamOClient closed" for arg in getattr(exc, "args", ()))
        ):
            task.uncancel()
            message = "the client was closed while this job was running"
            if self.task_id is not None:
                message += f" (task {self.task_id} exists: resume it with wait())"
            error = ClientClosedError(message)
            error.task_id = self.task_id
            raise error from exc


class _Job(_Tracker):
    """A tracked job that also holds a job slot while it runs (``async with``)."""

    __slots__ = ("_token",)

    def __init__(self, client: DreamOClient) -> None:
        super().__init__(client)
        self._token: object = None

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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            local = self._client._local_slots
            if local is not None:
                local.release_nowait()
            else:
                # JobSlots.release completes even when this job is being cancelled.
                await self._client._slots.release(self._token)
        finally:
            self.__exit__(exc_type, exc, tb)
