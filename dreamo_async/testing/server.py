"""``FakeDreamOServer``: the service of API.md, simulated on 127.0.0.1 with aiohttp.web.

It speaks the real protocol (paths, wrapped bodies, bearer key, statuses, error
codes), checks the documented limits server-side, runs tasks on its own clock
(no background timers: a task's status is computed when it is polled), and
counts everything from the server's side (:class:`ServerStats`) so tests prove
what the client did rather than what it believes it did.

Routes::

    POST /model/v1/generation              create (bearer key, wrapped JSON body)
    GET  /model/v1/generation/task/{id}    poll
    GET  /files/{task_id}/0.png            the result image of a completed task
    GET  /assets/{name}                    files added with add_file() (input images by URL)
    GET  /_fake/stats                      ServerStats as JSON (for other processes)
    POST /_fake/reset                      reset_stats()
    POST /_fake/inject                     {"endpoint", "fault": Fault.to_dict(), "times"}

Scripted outcomes ride in the prompt, so a test or the demo needs no set-up:
``[fail:003013095]`` ends the task ``failed`` with that code, ``[slow:MS]`` sets
its duration, ``[never]`` never finishes. ``fail_tasks(code, ratio, seed)`` fails
a seeded random share. Transport faults are scripted with :meth:`inject` or drawn
at random with :meth:`chaos` (see :mod:`dreamo_async.testing._faults`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import secrets
import ssl
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, Self

import attrs
from aiohttp import web
from multidict import CIMultiDict

from ..limits import DEFAULT_LIMITS, Limits
from ._control import CONTROL_PREFIX, control_routes
from ._fault_plan import FaultPlan, after_work, before_work
from ._faults import ENDPOINTS, Endpoint, Fault
from ._http import (
    Answer,
    AttemptWindow,
    Dropped,
    RetryAfterFormat,
    TokenBucket,
    error_answer,
    format_retry_after,
    render,
)
from ._images import image_info, make_png
from ._stats import RecordedRequest, RefusalRecord, ServerStats
from ._tasks import (
    CANONICAL_STATUSES,
    CreatedAtFormat,
    ErrorFormat,
    FakeTask,
    OutputLayout,
    Presentation,
)
from ._validate import CreateRequest, Refusal, parse_create_body
from .chaos import ChaosConfig

__all__ = ["CREATE_PATH", "TASK_PATH", "FakeDreamOServer"]

CREATE_PATH: Final = "/model/v1/generation"
TASK_PATH: Final = "/model/v1/generation/task/{id}"

_OUTPUT_PNG: Final = make_png(64, 64, color=(40, 120, 200))
#: Bodies above this are checked in a worker thread, so the shared loop stays responsive.
_THREAD_BODY_BYTES: Final = 256 * 1024
_UPSTREAM_ERROR: Final = "003013097"


class FakeDreamOServer:
    """A faithful in-process simulation of the Spark DreamO API (see the module docstring).

    Times are in milliseconds so tests stay fast. Every option is keyword-only:

    - ``api_key``: the accepted bearer key; ``None`` accepts any non-empty key.
    - ``task_duration_ms`` / ``queue_ms``: time in ``processing`` / in ``pending`` first.
    - ``report_progress``: a linear ``progress`` 0..1 on running tasks.
    - ``envelope``: wrap answers as ``{"data": task, "status": {"code": 200, ...}}``.
    - ``status_words``: canonical word -> word sent, e.g. ``{"processing": "in_progress"}``.
    - ``output_layout``: ``"content"`` (``output[].content[].url``) or ``"flat"``.
    - ``created_at_format``: ``"s"``, ``"ms"`` or ``"iso"`` (also ``completed_at``).
    - ``error_format``: failed task's ``error`` as ``{code, message}`` (``"message"``),
      ``{code, error_message}`` (``"error_message"``) or a plain string (``"string"``).
    - ``cost``: ``usage.cost`` of a completed task: a string, ``None`` (no cost reported)
      or a callable of the new :class:`FakeTask` giving either (costs that vary);
      ``cost_per_image``: price tasks per input image instead (``"0.01"`` x images).
      ``stats.cost_created`` sums the costs of the tasks created (what would be billed).
    - ``create_status``: 200 or 201.
    - ``limits``: the limits checked server-side; ``strict_params``: refuse unknown params.
    - ``rate_limit`` / ``rate_burst``: token bucket over creates and polls (req/s, bucket
      size, default ``max(1, rate_limit)``); above it: 429 with ``Retry-After`` spelled
      per ``retry_after_format`` (``"seconds"`` = fractional, fast tests; ``"int"``;
      ``"date"`` = HTTP-date; ``"none"``).
    - ``rate_counts_rejected``: instead of the bucket, at most ``rate_limit`` attempts in
      any 1-s window, refused ones counted too (a storm stays refused);
      ``rate_retry_after_ms``: the ``Retry-After`` sent then (default: until the window frees).
    - ``max_open_tasks``: refuse creates with 429 while that many tasks are running.
    - ``result_ttl_ms``: result files answer 404 that long after completion.
    - ``extra_fields``: add undocumented fields everywhere (tolerance tests).
    - ``clock``: the server clock (seconds, monotonic), replaceable for frozen-time tests.
    - ``chaos_config``: every fault at once, seeded (:class:`ChaosConfig`; also
      :meth:`set_chaos`).
    - ``ssl_context``: serve HTTPS with this context (TLS tests).
    """

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        host: str = "127.0.0.1",
        port: int = 0,
        task_duration_ms: float = 50,
        queue_ms: float = 0,
        report_progress: bool = False,
        envelope: bool = False,
        status_words: Mapping[str, str] | None = None,
        output_layout: OutputLayout = "content",
        created_at_format: CreatedAtFormat = "s",
        error_format: ErrorFormat = "message",
        cost: str | Callable[[FakeTask], str | None] | None = "0.03",
        cost_per_image: str | None = None,
        create_status: int = 200,
        limits: Limits = DEFAULT_LIMITS,
        strict_params: bool = True,
        rate_limit: float | None = None,
        rate_burst: float | None = None,
        retry_after_format: RetryAfterFormat = "seconds",
        rate_counts_rejected: bool = False,
        rate_retry_after_ms: float | None = None,
        max_open_tasks: int | None = None,
        result_ttl_ms: float | None = None,
        extra_fields: bool = False,
        clock: Callable[[], float] = time.monotonic,
        chaos_config: ChaosConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        words = dict(status_words or {})
        if unknown := set(words) - set(CANONICAL_STATUSES):
            raise ValueError(f"status_words keys must be among {CANONICAL_STATUSES}: {unknown}")
        _require(output_layout, ("content", "flat"), "output_layout")
        _require(created_at_format, ("s", "ms", "iso"), "created_at_format")
        _require(error_format, ("message", "error_message", "string"), "error_format")
        _require(retry_after_format, ("seconds", "int", "date", "none"), "retry_after_format")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or None)")
        if api_key == "":
            raise ValueError("api_key must be non-empty (or None to accept any key)")
        self.api_key = api_key
        self.host = host
        self.port = port
        self.task_duration_ms = task_duration_ms
        self.queue_ms = queue_ms
        self.create_status = create_status
        self.limits = limits
        self.strict_params = strict_params
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst if rate_burst is not None else max(1.0, rate_limit or 1.0)
        self.retry_after_format: RetryAfterFormat = retry_after_format
        self.max_open_tasks = max_open_tasks
        self.result_ttl_ms = result_ttl_ms
        self.stats = ServerStats()
        self.cost = cost
        self.cost_per_image = None if cost_per_image is None else Decimal(cost_per_image)
        self._clock = clock
        self._presentation = Presentation(
            base_url="",
            envelope=envelope,
            status_words=words,
            output_layout=output_layout,
            created_at_format=created_at_format,
            error_format=error_format,
            report_progress=report_progress,
            extra_fields=extra_fields,
        )
        self._tasks: dict[str, FakeTask] = {}
        self._open: list[tuple[float, str]] = []  # heap of (ends_at, task id)
        self._plan = FaultPlan(chaos_config)
        self._ssl_context = ssl_context
        self._files: dict[str, tuple[bytes, str]] = {}
        self._last: dict[str, RecordedRequest] = {}
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(3)
        self.rate_retry_after_ms = rate_retry_after_ms
        self._bucket: TokenBucket | AttemptWindow | None = None
        if rate_limit is not None:
            self._bucket = (
                AttemptWindow(rate_limit)
                if rate_counts_rejected
                else TokenBucket(rate_limit, self.rate_burst, self.rate_burst, clock())
            )
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (still readable after close)."""
        if self._url is None:
            raise RuntimeError("FakeDreamOServer is not started: use `async with` or start()")
        return self._url

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 = a free port, read back into ``self.port``)."""
        if self._runner is not None:
            raise RuntimeError("FakeDreamOServer is already started")
        body_limit = self.limits.max_images * self.limits.max_image_bytes * 4 // 3 + (1 << 20)
        app = web.Application(
            middlewares=[self._middleware], client_max_size=max(64 << 20, body_limit)
        )
        app.router.add_post(CREATE_PATH, self._handle_create)
        app.router.add_get(TASK_PATH, self._handle_poll)
        app.router.add_get("/files/{task_id}/{name}", self._handle_file)
        app.router.add_get("/assets/{name:.+}", self._handle_asset)
        app.router.add_routes(control_routes(self))
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        scheme = "https" if self._ssl_context is not None else "http"
        self._url = f"{scheme}://{self.host}:{self.port}"
        self._presentation = attrs.evolve(self._presentation, base_url=self._url)

    async def close(self) -> None:
        """Stop listening and close open connections (idempotent)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    # -- test controls ---------------------------------------------------------------

    def inject(self, endpoint: Endpoint, fault: Fault, *, times: int = 1) -> None:
        """Make the next ``times`` requests to ``endpoint`` misbehave as ``fault`` (in order)."""
        self._plan.inject(endpoint, fault, times)

    def pending_faults(self, endpoint: Endpoint) -> int:
        """Scripted faults of ``endpoint`` not used yet."""
        return self._plan.pending(endpoint)

    def chaos(
        self,
        probability: float | Mapping[Endpoint, float],
        *,
        seed: int = 0,
        faults: Sequence[Fault] | Mapping[Fault, float] | None = None,
        endpoints: Iterable[Endpoint] = ENDPOINTS,
    ) -> None:
        """Give each request a seeded ``probability`` of a random fault (0 turns it off).

        ``probability`` may be per endpoint (``{"poll": 0.3}``). ``faults`` are drawn
        from (weighted when a mapping); the default is :data:`CHAOS_FAULTS`.
        """
        self._plan.chaos(probability, seed, faults, endpoints)

    def set_chaos(self, config: ChaosConfig | None) -> None:
        """Turn on every fault of ``config`` at once (seeded afresh), or off with ``None``."""
        self._plan.set_chaos(config)

    def clear_faults(self) -> None:
        """Forget every scripted fault and turn chaos (both kinds) off."""
        self._plan.clear()

    def fail_tasks(self, code: str = "003013095", ratio: float = 1.0, seed: int = 0) -> None:
        """Make a seeded random ``ratio`` of new tasks end ``failed`` with ``code`` (0 = off)."""
        self._plan.fail_tasks(code, ratio, seed)

    def finish_task(self, task_id: str, *, fail_code: str | None = None) -> None:
        """End a task now (e.g. one made with ``[never]``), optionally as failed."""
        task = self._tasks[task_id]
        now = self._clock()
        task.starts_at = min(task.starts_at, now)
        task.ends_at = min(task.ends_at, now)
        if fail_code is not None:
            task.fail_code = fail_code
        self._open = [(t.ends_at, t.id) for t in self._tasks.values() if t.is_open(now)]
        heapq.heapify(self._open)

    def add_file(self, path: str, data: bytes, content_type: str | None = None) -> str:
        """Serve ``data`` at ``/assets/<path>`` and return its full URL (server started).

        ``content_type`` defaults to what the bytes are (PNG, JPEG, else octet-stream).
        """
        name = path.removeprefix("/").removeprefix("assets/")
        if content_type is None:
            info = image_info(data)
            content_type = f"image/{info[0]}" if info else "application/octet-stream"
        self._files[name] = (data, content_type)
        return f"{self.url}/assets/{name}"

    def reset_stats(self) -> None:
        """Zero every counter in place (``max_open_tasks`` restarts at the tasks running now)."""
        fresh = ServerStats(max_open_tasks=self.open_tasks())
        for field in attrs.fields(ServerStats):
            setattr(self.stats, field.name, getattr(fresh, field.name))

    def forget_tasks(self) -> None:
        """Drop every task (and the last requests kept), e.g. before measuring memory."""
        self._tasks.clear()
        self._open.clear()
        self._last.clear()

    def open_tasks(self) -> int:
        """Tasks running at the service now (created, completion time not reached)."""
        return self._prune_open(self._clock())

    @property
    def tasks(self) -> Mapping[str, FakeTask]:
        """Every task created, by id (read-only view; inspect, do not modify)."""
        return types.MappingProxyType(self._tasks)

    def last_request(self, endpoint: Endpoint = "create") -> RecordedRequest | None:
        """The last request ``endpoint`` received, headers (with Authorization) and body."""
        return self._last.get(endpoint)

    @property
    def last_create_body(self) -> Any:
        """The last create body parsed as JSON (refused ones too), or ``None``."""
        recorded = self._last.get("create")
        if recorded is None or not recorded.body:
            return None
        try:
            return recorded.json()
        except ValueError:
            return None

    @property
    def last_create_headers(self) -> Mapping[str, str] | None:
        """Headers of the last create request (case-insensitive, Authorization included)."""
        recorded = self._last.get("create")
        return None if recorded is None else recorded.headers

    # -- plumbing --------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        control = request.path.startswith(CONTROL_PREFIX)
        if not control:
            self.stats.request_times.append((self._clock(), request.method, request.path))
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # unknown path or method: a JSON error like the rest
            if exc.status < 400:
                raise
            reason = "not_found" if exc.status == 404 else "method"
            refusal = Refusal(exc.status, str(exc.status), exc.reason, reason)
            response = render(self._refuse("other", refusal))
        if not control and not isinstance(response, Dropped):
            self.stats.status_codes[response.status] += 1
            if response.status == 429:
                self.stats.rate_limited += 1
        request_id = request.headers.get("X-Request-Id")
        if request_id and not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    async def _serve(
        self,
        endpoint: Endpoint,
        request: web.Request,
        work: Callable[[web.Request], Awaitable[Answer]],
    ) -> web.StreamResponse:
        """Run one request: the fault "before", the service's work, the fault "after"."""
        self._last[endpoint] = RecordedRequest(
            request.method, request.path_qs, CIMultiDict(request.headers)
        )
        fault = self._plan.next(endpoint)
        if fault is not None:
            self.stats.faults[f"{endpoint}:{fault.label or fault.kind}"] += 1
            if (early := await before_work(fault, request)) is not None:
                return early
        try:
            answer = await work(request)
        except Refusal as refusal:
            answer = self._refuse(endpoint, refusal)
        except ConnectionResetError:  # the client gave up (its timeout) before we read the body
            return Dropped()
        if fault is None or not fault.after_work:
            return render(answer)
        return await after_work(fault, request, answer)

    def _refuse(self, endpoint: str, refusal: Refusal) -> Answer:
        """Count a refusal and turn it into the service's JSON error answer."""
        self.stats.refused[refusal.reason] += 1
        if endpoint == "create":
            self.stats.creates_refused[refusal.reason] += 1
        self.stats.refusals.append(
            RefusalRecord(endpoint, refusal.status, refusal.code, refusal.reason, refusal.message)
        )
        answer = error_answer(refusal.status, refusal.code, refusal.message)
        if refusal.retry_after is not None:
            value = format_retry_after(refusal.retry_after, self.retry_after_format)
            if value is not None:
                answer.headers["Retry-After"] = value
        if refusal.status == 401:
            answer.headers["WWW-Authenticate"] = "Bearer"
        return answer

    def _check_auth(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Refusal(401, "401", "missing API key: send Authorization: Bearer <key>", "auth")
        if self.api_key is not None and key != self.api_key:
            raise Refusal(401, "401", "invalid API key", "auth")

    def _check_rate(self) -> None:
        """Creates and polls share one token bucket (``rate_limit``/s, ``rate_burst`` at once)."""
        if self._bucket is None:
            return
        wait = self._bucket.take(self._clock())
        if wait is not None:
            if self.rate_retry_after_ms is not None:
                wait = self.rate_retry_after_ms / 1000.0
            raise Refusal(
                429,
                "429",
                f"rate limit exceeded: {self.rate_limit:g} requests/s",
                "rate_limit",
                retry_after=wait,
            )

    def _prune_open(self, now: float) -> int:
        while self._open and self._open[0][0] <= now:
            heapq.heappop(self._open)
        return len(self._open)

    # -- the service -----------------------------------------------------------------

    async def _handle_create(self, request: web.Request) -> web.StreamResponse:
        self.stats.create_requests += 1
        return await self._serve("create", request, self._create)

    async def _handle_poll(self, request: web.Request) -> web.StreamResponse:
        self.stats.polls += 1
        return await self._serve("poll", request, self._poll)

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        self._count_download(request)
        return await self._serve("download", request, self._file)

    async def _handle_asset(self, request: web.Request) -> web.StreamResponse:
        self._count_download(request)
        return await self._serve("download", request, self._asset)

    def _count_download(self, request: web.Request) -> None:
        self.stats.downloads += 1
        if "Authorization" in request.headers:
            self.stats.downloads_with_authorization += 1

    async def _create(self, request: web.Request) -> Answer:
        raw = await request.read()
        recorded = self._last["create"]
        self._last["create"] = attrs.evolve(recorded, body=raw)
        self._check_auth(request)
        self._check_rate()
        if request.content_type != "application/json":
            raise Refusal(
                400,
                "003013004",
                f"invalid Content-Type {request.content_type!r}: send application/json",
                "content_type",
            )
        if len(raw) > _THREAD_BODY_BYTES:
            parsed = await asyncio.to_thread(
                parse_create_body, raw, self.limits, strict_params=self.strict_params
            )
        else:
            parsed = parse_create_body(raw, self.limits, strict_params=self.strict_params)
        now = self._clock()
        running = self._prune_open(now)
        if self.max_open_tasks is not None and running >= self.max_open_tasks:
            soonest = self._open[0][0] - now if self._open else math.inf
            raise Refusal(
                429,
                "429",
                f"too many running tasks: {running} of at most {self.max_open_tasks}",
                "open_tasks",
                retry_after=soonest if math.isfinite(soonest) else None,
            )
        task = self._new_task(parsed, request.headers.get("X-Request-Id", ""), now)
        return Answer(self.create_status, self._presentation.wrap(self._presentation.created(task)))

    def _cost_of(self, task: FakeTask) -> str | None:
        if self.cost_per_image is not None:
            return str(self.cost_per_image * task.image_count)
        return self.cost(task) if callable(self.cost) else self.cost

    def _new_task(self, parsed: CreateRequest, request_id: str, now: float) -> FakeTask:
        prompt = parsed.prompt
        duration, fail_code = self._plan.task_outcome(prompt, self.task_duration_ms / 1000.0)
        if fail_code is None and self._missing_own_asset(parsed.image_urls):
            fail_code = _UPSTREAM_ERROR  # the service could not fetch an input image
        starts_at = now + self.queue_ms / 1000.0
        task = FakeTask(
            id=f"fake{self._tag}{next(self._ids):06d}",
            model=parsed.model,
            prompt=prompt,
            params=parsed.params,
            image_count=parsed.image_count,
            request_id=request_id,
            created_at=now,
            created_wall=time.time(),
            starts_at=starts_at,
            ends_at=starts_at + duration,
            fail_code=fail_code,
        )
        task.cost = self._cost_of(task)
        if task.cost is not None:
            self.stats.cost_created += Decimal(task.cost)
        if self._plan.state is not None and (shaped := self._plan.state.shape_task(task)):
            self.stats.faults[f"task:{shaped}"] += 1
        self._tasks[task.id] = task
        heapq.heappush(self._open, (task.ends_at, task.id))
        self.stats.creates += 1
        self.stats.creates_by_request_id[request_id] += 1
        self.stats.creates_by_prompt[prompt] += 1
        self.stats.max_open_tasks = max(self.stats.max_open_tasks, self._prune_open(now))
        return task

    def _missing_own_asset(self, urls: Sequence[str]) -> bool:
        """An input URL on this server that serves nothing (the real task would fail)."""
        prefix = f"{self.url}/assets/"
        return any(u.startswith(prefix) and u[len(prefix) :] not in self._files for u in urls)

    async def _poll(self, request: web.Request) -> Answer:
        self._check_auth(request)
        self._check_rate()
        task_id = request.match_info["id"]
        task = self._tasks.get(task_id)
        if task is None or self._clock() >= task.gone_at:
            raise Refusal(404, "404", f"task {task_id!r} not found", "not_found")
        data = self._presentation.describe(task, self._clock())
        return Answer(200, self._presentation.wrap(data))

    async def _file(self, request: web.Request) -> Answer:
        task = self._tasks.get(request.match_info["task_id"])
        now = self._clock()
        if (
            task is None
            or request.match_info["name"] != "0.png"
            or task.state_at(now) != "completed"
        ):
            raise Refusal(404, "404", f"no such file {request.path!r}", "not_found")
        if self.result_ttl_ms is not None and now > task.ends_at + self.result_ttl_ms / 1000.0:
            raise Refusal(404, "404", f"result expired: {request.path!r}", "expired")
        return Answer(200, body=_OUTPUT_PNG, content_type="image/png")

    async def _asset(self, request: web.Request) -> Answer:
        entry = self._files.get(request.match_info["name"])
        if entry is None:
            raise Refusal(404, "404", f"no such file {request.path!r}", "not_found")
        return Answer(200, body=entry[0], content_type=entry[1])


def _require(value: Any, allowed: Sequence[Any], name: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
