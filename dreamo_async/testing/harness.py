"""Drive a client through a chaotic :class:`FakeDreamOServer` and report what happened.

:func:`run_chaos` runs jobs against a server with a :class:`~.chaos.ChaosConfig` and
returns a :class:`ChaosReport`; it can also close the client while creates are in
flight (``close_after``) and give the client a strict rate (``requests_per_second``),
which every request reaching the service must keep to (no silent re-send of a dropped
poll). The fault model itself is ``chaos.py``; this module is its only client-side user.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import selectors
import time
import tracemalloc
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

import attrs

from .chaos import ChaosConfig

if TYPE_CHECKING:
    from ..client import DreamOClient

__all__ = ["ChaosReport", "run_chaos"]


# --------------------------------------------------------------------------- the run


@attrs.frozen
class ChaosReport:
    """What a chaos run did and how every job ended."""

    jobs: int
    #: Outcome type name -> jobs (``"GenerationResult"`` for the successes).
    outcomes: Mapping[str, int]
    #: Error type name -> how many of those errors carried ``task_id``.
    errors_with_task_id: Mapping[str, int]
    #: ``"endpoint:fault"`` -> times injected (server side).
    faults: Mapping[str, int]
    #: Tasks the server created, and the most any one request id / prompt made.
    tasks_created: int
    #: Tasks the service made that the client knows nothing of: neither a job's task id
    #: (result or error) nor the X-Request-Id of a ``CreateOutcomeUnknownError``.
    unaccounted_tasks: int
    max_creates_per_request_id: int
    max_creates_per_prompt: int
    create_requests: int
    polls: int
    seconds: float
    #: Growth of traced memory (bytes) once the client is closed and the fake server has
    #: forgotten its tasks and counters: what a leak would leave behind.
    memory_growth: int
    #: asyncio tasks and open file descriptors before and after (fds: Linux only, else -1).
    tasks_before: int
    tasks_after: int
    fds_before: int
    fds_after: int
    #: Most requests the service saw in any one second, and what the client's strict rate
    #: allowed (``requests_per_second + burst``; ``None``: the client had no strict rate).
    max_requests_per_second: int = 0
    rate_budget: int | None = None

    @property
    def lost(self) -> int:
        return self.jobs - sum(self.outcomes.values())

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def problems(self) -> list[str]:
        """The invariants this run broke, one sentence each (empty: none).

        A job lost, a task created twice (per request id or per job), a task the
        client knows nothing of, more requests at the service than the client's strict
        rate allows, asyncio tasks or file descriptors left behind.
        """
        checks = [
            (self.lost != 0, f"{self.lost} jobs lost"),
            (self.max_creates_per_request_id > 1, "a request id created two tasks"),
            (self.max_creates_per_prompt > 1, "a job created two tasks"),
            (self.unaccounted_tasks != 0, f"{self.unaccounted_tasks} tasks unaccounted for"),
            (
                self.rate_budget is not None and self.max_requests_per_second > self.rate_budget,
                f"the service saw {self.max_requests_per_second} requests in one second, over "
                f"the client's rate of {self.rate_budget} (a request the limiter never saw)",
            ),
            (self.tasks_after != self.tasks_before, "asyncio tasks left behind"),
            (self.fds_after != self.fds_before, "file descriptors left open"),
        ]
        return [text for failed, text in checks if failed]

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [
            f"chaos run: {self.jobs} jobs in {self.seconds:.1f} s, "
            f"{self.create_requests} create requests, {self.polls} polls",
            "",
            f"{'fault injected':<36}{'times':>8}",
        ]
        for name, count in sorted(self.faults.items()):
            lines.append(f"  {name:<34}{count:>8}")
        lines.append(f"  {'total':<34}{self.faults_injected:>8}")
        lines += ["", f"{'outcome':<36}{'jobs':>8}{'with task_id':>14}"]
        for name, count in sorted(self.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
            tagged = "" if name == "GenerationResult" else self.errors_with_task_id.get(name, 0)
            lines.append(f"  {name:<34}{count:>8}{tagged:>14}")
        lines.append(f"  {'total':<34}{sum(self.outcomes.values()):>8}")
        lines += [
            "",
            f"jobs lost: {self.lost}; tasks created: {self.tasks_created} "
            f"({self.unaccounted_tasks} unaccounted for); most creates per "
            f"request id: {self.max_creates_per_request_id}, per job: "
            f"{self.max_creates_per_prompt}",
            *(
                []
                if self.rate_budget is None
                else [
                    f"most requests in one second at the service: "
                    f"{self.max_requests_per_second} (client's rate: {self.rate_budget})"
                ]
            ),
            f"client memory growth: {self.memory_growth / 1024:.0f} KiB; asyncio tasks "
            f"{self.tasks_before} -> {self.tasks_after}; open fds {self.fds_before} -> "
            f"{self.fds_after}",
        ]
        return "\n".join(lines)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


#: Allocations that are not the client's: log records a test runner keeps (pytest's
#: log capture holds every WARNING of the run), the interpreter's isinstance caches of
#: abstract classes (one entry per type seen, not per job), the tracer's own, and the
#: service's side: the fake server and aiohttp.web's connections, which close on their
#: own schedule, and the selector's fd table, sized by the most sockets ever open.
_NOT_THE_CLIENT: Final = (
    tracemalloc.Filter(False, logging.__file__),
    tracemalloc.Filter(False, "<frozen abc>"),
    tracemalloc.Filter(False, "*/_pytest/*"),
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "*/dreamo_async/testing/*"),
    tracemalloc.Filter(False, "*/aiohttp/web_*"),
    tracemalloc.Filter(False, selectors.__file__),
)


def _traced_memory() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(_NOT_THE_CLIENT)
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def run_chaos(
    jobs: int = 500,
    *,
    config: ChaosConfig | None = None,
    concurrency: int = 50,
    job_timeout: float = 1.0,
    read_timeout: float = 0.1,
    task_duration_ms: float = 5.0,
    trace_memory: bool = True,
    close_after: float | None = None,
    requests_per_second: float | None = None,
) -> ChaosReport:
    """Run ``jobs`` generations through a :class:`FakeDreamOServer` under ``config``.

    Every job must end as a result or a :class:`DreamOError`; anything else is
    re-raised (the run fails loudly). The client uses short timeouts and small
    retry delays so thousands of jobs take seconds. A run of as many jobs without
    faults comes first, so that lazy imports, bounded caches and containers sized
    for the number of live jobs are not counted as memory growth.

    ``close_after``: the client is closed that many seconds into the run (with slow
    create answers, while creates are in flight). ``requests_per_second``: the client
    gets that strict rate (burst 1), and the service must see no more.

    A task is accounted for when a result or an error names it, or when an error
    says a task may exist and names the create's ``X-Request-Id``: read from the
    error's money state, never from its class.
    """
    from ..errors import DreamOError
    from ._images import make_png
    from .server import FakeDreamOServer

    config = config or ChaosConfig.everything(slow_ms=read_timeout * 1000 * 2)
    png = make_png(64, 64)
    outcomes: collections.Counter[str] = collections.Counter()
    with_task_id: collections.Counter[str] = collections.Counter()
    known_tasks: set[str] = set()
    maybe_created: set[str] = set()

    async def run(server: FakeDreamOServer, count: int, close_after: float | None) -> None:
        async with _chaos_client(
            server.url, concurrency, job_timeout, read_timeout, requests_per_second
        ) as client:

            async def one(index: int) -> None:
                try:
                    result = await client.generate(prompt=f"chaos job {index}", images=[png])
                except DreamOError as exc:
                    name = type(exc).__name__
                    if exc.task_id is not None:
                        with_task_id[name] += 1
                        known_tasks.add(exc.task_id)
                    elif exc.unknown_task_possible and exc.request_id is not None:
                        maybe_created.add(exc.request_id)
                else:
                    name = "GenerationResult"
                    known_tasks.add(result.task_id)
                outcomes[name] += 1

            async def close_later(delay: float) -> None:
                await asyncio.sleep(delay)
                await client.aclose()

            closer = None if close_after is None else asyncio.create_task(close_later(close_after))
            await asyncio.gather(*(one(i) for i in range(count)))
            if closer is not None:
                await closer

    started_tracing = trace_memory and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start(1)
    try:
        async with FakeDreamOServer(api_key=_KEY, task_duration_ms=task_duration_ms) as server:
            # Warm-up without faults, as many jobs: lazy imports, bounded caches and the
            # hash tables sized for `jobs` live asyncio tasks are then not counted as growth.
            await run(server, jobs, None)
            outcomes.clear()
            with_task_id.clear()
            known_tasks.clear()  # the harness's, measured neither before nor after
            maybe_created.clear()
            server.forget_tasks()
            server.reset_stats()
            server.set_chaos(config)
            await _settle(lambda: len(asyncio.all_tasks()) > 1, 2.0)
            tasks_before = len(asyncio.all_tasks())
            fds_before = _open_fds()
            memory_before = _traced_memory() if trace_memory else 0
            began = time.perf_counter()
            await run(server, jobs, close_after)
            seconds = time.perf_counter() - began
            # The server closes its side of the connections, and its handlers of "slow"
            # answers finish sleeping: wait for both (bounded), then measure.
            await _settle(
                lambda: _open_fds() > fds_before or len(asyncio.all_tasks()) > tasks_before,
                2.0 + config.slow_ms / 1000.0,
            )
            stats = server.stats
            unaccounted = sum(
                1
                for task in server.tasks.values()
                if task.id not in known_tasks and task.request_id not in maybe_created
            )
            report = ChaosReport(
                jobs=jobs,
                outcomes=dict(outcomes),
                errors_with_task_id=dict(with_task_id),
                faults=dict(stats.faults),
                tasks_created=stats.creates,
                unaccounted_tasks=unaccounted,
                max_creates_per_request_id=max(stats.creates_by_request_id.values(), default=0),
                max_creates_per_prompt=max(stats.creates_by_prompt.values(), default=0),
                create_requests=stats.create_requests,
                polls=stats.polls,
                seconds=seconds,
                memory_growth=0,
                tasks_before=tasks_before,
                tasks_after=len(asyncio.all_tasks()),
                fds_before=fds_before,
                fds_after=_open_fds(),
                max_requests_per_second=stats.max_requests_in_window(1.0),
                rate_budget=None if requests_per_second is None else int(requests_per_second) + 1,
            )
            known_tasks.clear()  # the run's own bookkeeping, not the client's memory
            maybe_created.clear()
            server.set_chaos(None)
            server.forget_tasks()  # what the service keeps is not the client's memory
            server.reset_stats()
            if trace_memory:
                report = attrs.evolve(report, memory_growth=_traced_memory() - memory_before)
            return report
    finally:
        if started_tracing:
            tracemalloc.stop()


_KEY: Final = "chaos-key"


async def _settle(busy: Callable[[], bool], timeout: float) -> None:
    """Wait (at most ``timeout`` s) while ``busy()``: connections and handlers wind down."""
    until = time.monotonic() + timeout
    # No event to wait on: open fds and the loop's task set are polled.
    while busy() and time.monotonic() < until:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def _chaos_client(
    url: str,
    concurrency: int,
    job_timeout: float,
    read_timeout: float,
    requests_per_second: float | None = None,
) -> DreamOClient:
    """A client with short timeouts and millisecond retry and poll delays."""
    import aiohttp

    from ..client import DreamOClient
    from ..coordination import UnlimitedLimiter
    from ..polling import PollPolicy
    from ..retry import RetryPolicy

    return DreamOClient(
        api_key=_KEY,
        base_url=url,
        max_concurrency=concurrency,
        # No learned rate: the storms here are random, not a limit to learn, and the
        # jobs' 1-s deadlines leave no room for a client that slows down. A strict rate
        # when one is given.
        limiter=UnlimitedLimiter() if requests_per_second is None else None,
        poll=PollPolicy(initial_delay=0.002, max_delay=0.01, timeout=job_timeout),
        retry=RetryPolicy(
            max_attempts=4,
            initial_delay=0.001,
            max_delay=0.01,
            max_retry_after=1.0,
            # The pause after a 429 without a hint, in the same millisecond scale as the
            # other delays.
            rate_limit_pause=0.01,
        ),
        request_timeout=aiohttp.ClientTimeout(sock_connect=1.0, sock_read=read_timeout),
        requests_per_second=requests_per_second,
        burst=1,
        jitter_seed=0,
    )
