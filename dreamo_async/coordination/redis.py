"""Limits shared by many processes and hosts through Redis: one API key, one budget.

The service limits requests and running tasks per API key. A web app with 8
workers, or a batch job on 3 machines, must therefore share one rate limiter and
one pool of job slots. :class:`RedisCoordinator` keeps both in Redis (the
``redis`` package's asyncio client; ``pip install 'dreamo_async[redis]'``)::

    shared = RedisCoordinator("redis://127.0.0.1:6379/0", key="team-a")
    async with DreamOClient(max_concurrency=8, requests_per_second=10,
                            coordinator=shared) as client:
        ...

How it works (every decision is one Lua script, atomic in Redis, timed by Redis's
own ``TIME`` so that hosts with skewed clocks agree):

* **Rate**: a GCRA ("virtual scheduling") reservation. A request reserves the
  next theoretical arrival time and sleeps until it; at most ``burst`` go early.
  While the bucket has credit, that one round trip also takes the turns due now
  of requests queued behind it in this process (``_MAX_TURNS_PER_CALL`` turns at
  most, its own included). A request reserves again after sleeping out a 429
  pause, and once more if its event loop stalled past its turn (rather than send
  late, bunched with the next turn). Any 1-second window holds at most
  ``rate + burst`` requests of all processes together, the first second included
  (the state starts empty). A 429 in one process writes a "paused until" key
  that every process's next reservation honours.
* **Job slots**: leases in a sorted set scored by expiry. Acquiring purges expired
  leases first, so the slots of a process that died (SIGKILL, lost host) come back
  within ``lease_ttl``; a live process renews its leases every ``lease_ttl / 3``.
  Releasing pushes a token onto a wake list, and one waiter per process blocks on
  it with ``BLPOP`` (served in arrival order by Redis); the other waiters of that
  process queue locally behind it, in order. Nobody polls Redis in a loop.
* **Outages**: a call that cannot reach Redis is retried for ``reconnect_timeout``
  seconds (a restart is survived; scripts are re-sent after Redis forgot them, and
  lost leases are re-created at the next renewal). Past that, or when Redis was
  never reachable, ``fallback="error"`` (default, fail closed) raises
  :class:`~dreamo_async.errors.LimitsBackendError`; ``fallback="local"`` warns
  (:class:`~dreamo_async.errors.DreamOWarning`) and enforces the limits in this
  process only until Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigurationError, LimitsBackendError
from ._lua import ACQUIRE_LUA, PAUSE_LUA, RATE_LUA, RELEASE_LUA, RENEW_LUA
from ._redis_core import RedisShared, Unavailable, stop_task
from ._waiting import CoolDown, WaiterQueue, check_burst, check_concurrency, check_rate
from .local import LocalCoordinator
from .protocols import JobSlots, Priority, RateLimiter
from .redis_budget import RedisBudget

if TYPE_CHECKING:
    from decimal import Decimal

    from redis.asyncio import Redis

__all__ = ["RedisCoordinator", "RedisRateLimiter", "RedisSlots"]

logger = logging.getLogger("dreamo_async")

#: Longest single BLPOP: waiters re-check the slots at least this often (seconds).
_MAX_BLOCK_S: Final = 1.0
#: Most turns one rate call takes for queued neighbours while the bucket has credit.
_MAX_TURNS_PER_CALL: Final = 16


# --------------------------------------------------------------------------- rate


class _PriorityGate:
    """A lock handed to waiters by (priority, arrival): polls before creates, FIFO within.

    Its owner may also :meth:`hand_out` turns it got in one Redis call to the next
    waiters, who then go at once without owning the gate. The order is the local
    limiter's :class:`~dreamo_async.coordination._waiting.WaiterQueue`.
    """

    __slots__ = ("_busy", "_queue")

    def __init__(self) -> None:
        self._busy = False
        #: A waiter's future: True = "a turn for you", False = "the gate is yours".
        self._queue = WaiterQueue()

    @property
    def waiting(self) -> int:
        return self._queue.waiting

    async def enter(self, priority: int) -> bool:
        """Wait; True if a turn was handed to us, False if we own the gate (then :meth:`leave`)."""
        if not self._busy and not self._queue:
            self._busy = True
            return False
        fut = self._queue.push(priority).future
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result() is False:
                self.leave()  # handed the gate as we were cancelled: pass it on
            raise

    def hand_out(self, turns: int) -> None:
        """Give ``turns`` turns to the first live waiters (a turn nobody takes is lost)."""
        while turns > 0 and (waiter := self._queue.pop()) is not None:
            waiter.future.set_result(True)
            turns -= 1

    def leave(self) -> None:
        waiter = self._queue.pop()
        if waiter is not None:
            waiter.future.set_result(False)  # the gate stays busy: ownership moves over
            return
        self._busy = False


class RedisRateLimiter:
    """The shared request limiter of a :class:`RedisCoordinator` (see the module docstring).

    Within one process, requests reserve in turn (polls of running tasks first);
    each reservation is one round trip to Redis, and the wait it returns is slept
    here, so a process never holds more than one reservation ahead of time.
    """

    def __init__(self, backend: RedisShared, rate: float | None, burst: int) -> None:
        if rate is not None and not isinstance(rate, int | float):
            raise ConfigurationError(
                f"RedisCoordinator shares a fixed requests_per_second between processes; "
                f"got {rate!r} (an adaptive rate would differ from process to process)"
            )
        self.rate = None if rate is None else check_rate(rate)
        self.burst = check_burst(burst)
        self._backend = backend
        # Spaced a little wider than 1 / rate: a request may reach the service up to
        # `headroom` seconds later than its turn (network, a busy loop) without the
        # service ever counting rate + burst in one second.
        spacing = (1.0 + backend.headroom) / self.rate if self.rate is not None else 0.0
        self._interval_us = 0 if self.rate is None else max(1, round(1_000_000 * spacing))
        #: A turn woken later than this (s) is given back for a fresh one (see acquire).
        self._late_s = max(0.001, self._interval_us / 2_000_000)
        #: This process's requests reserve one at a time, polls first; a reservation's
        #: extra turns go to the next waiters.
        self._gate = _PriorityGate()
        self._cooldown = CoolDown()
        self._local: RateLimiter | None = None

    async def acquire(self, priority: Priority = Priority.CREATE) -> None:
        link = self._backend._link
        keys = [self._backend.keys.rate, self._backend.keys.pause]
        args = [self._interval_us, self.burst]

        async def reserve(wanted: int, client: Redis) -> Any:
            return await link.script("rate", RATE_LUA)(keys=keys, args=[*args, wanted])

        loop = asyncio.get_running_loop()
        if await self._gate.enter(int(priority)):
            return  # a neighbour took this turn for us in its call
        try:
            await self._cooldown.wait()
            stale_ok = False
            while True:
                wanted = 1 + min(self._gate.waiting, _MAX_TURNS_PER_CALL - 1)
                try:
                    granted, wait_us, count = await link.call(
                        "rate limiter", functools.partial(reserve, wanted)
                    )
                except Unavailable as exc:
                    link.unavailable(exc)
                    await self._local_limiter().acquire(priority)
                    return
                if int(count) > 1:
                    self._gate.hand_out(int(count) - 1)  # due now, like ours
                if wait_us > 0:
                    wake_at = loop.time() + int(wait_us) / 1_000_000
                    await asyncio.sleep(int(wait_us) / 1_000_000)
                    if int(granted) and not stale_ok and loop.time() - wake_at > self._late_s:
                        # The loop stalled past our turn: sending now could bunch up with
                        # the next process's turn. Take a fresh turn, once (no starving).
                        stale_ok = True
                        continue
                if int(granted):
                    return
                # Paused by a 429 somewhere: the pause is over now, reserve afresh.
        finally:
            self._gate.leave()

    def pause(self, seconds: float) -> None:
        """Pause this process at once, and every process through Redis."""
        self._cooldown.pause(seconds)
        if seconds > 0:
            self._backend._spawn(self._publish_pause(seconds))

    async def _publish_pause(self, seconds: float) -> None:
        link = self._backend._link
        keys = [self._backend.keys.pause]

        async def write(client: Redis) -> Any:
            return await link.script("pause", PAUSE_LUA)(keys=keys, args=[round(seconds * 1e6)])

        try:
            await link.call("pause", write)
        except (Unavailable, LimitsBackendError) as exc:
            logger.warning("could not share a %g s pause through Redis: %s", seconds, str(exc))

    def record(self, status: int) -> None:
        return None

    def _local_limiter(self) -> RateLimiter:
        if self._local is None:
            self._local = LocalCoordinator().make_limiter(self.rate, self.burst)
        return self._local

    def __repr__(self) -> str:
        rate = "unlimited" if self.rate is None else f"{self.rate:g}/s burst={self.burst}"
        return f"<RedisRateLimiter {self._backend.keys.rate} {rate}>"


# --------------------------------------------------------------------------- slots


class _Lease:
    """A held slot: a lease id in Redis, or a slot of the local fallback pool."""

    __slots__ = ("id", "local")

    def __init__(self, lease_id: str, local: bool = False) -> None:
        self.id = lease_id
        self.local = local

    def __repr__(self) -> str:
        return f"<lease {self.id}{' (local)' if self.local else ''}>"


class RedisSlots:
    """The shared job slots of a :class:`RedisCoordinator`: ``max_concurrency`` leases in all."""

    def __init__(self, backend: RedisShared, capacity: int) -> None:
        self.capacity = check_concurrency(capacity)
        self._backend = backend
        self._turn = asyncio.Lock()  # FIFO: one waiter of this process talks to Redis
        self._held: dict[str, None] = {}
        self._local_held = 0
        self._waiting = 0
        self._ids = itertools.count(1)
        self._renewer: asyncio.Task[None] | None = None
        #: Set while a renewal is in flight: a release waits for it, or the renewal
        #: could re-create the lease just released (a ghost holding a slot for a TTL).
        self._renewal_done: asyncio.Event | None = None
        self._local: JobSlots | None = None

    @property
    def in_use(self) -> int:
        return len(self._held) + self._local_held

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self) -> object:
        link = self._backend._link
        keys = self._backend.keys
        ttl_ms = self._backend._lease_ttl_ms
        self._waiting += 1
        try:
            async with self._turn:
                lease = f"{self._backend.owner}:{next(self._ids)}"

                async def try_acquire(client: Redis) -> Any:
                    script = link.script("acquire", ACQUIRE_LUA)
                    return await script(keys=[keys.slots], args=[self.capacity, lease, ttl_ms])

                while True:
                    try:
                        try:
                            ok, retry_ms = await link.call("job slots", try_acquire)
                        except asyncio.CancelledError:
                            # The script may have run: take the lease back, or it would
                            # hold a slot for nobody until its TTL.
                            self._backend._spawn(self._release_remote(lease))
                            raise
                        if int(ok):
                            self._held[lease] = None
                            self._ensure_renewer()
                            return _Lease(lease)
                        await self._block(int(retry_ms) / 1000)
                    except Unavailable as exc:
                        link.unavailable(exc)
                        await self._local_slots().acquire()
                        self._local_held += 1
                        return _Lease(lease, local=True)
        finally:
            self._waiting -= 1

    async def _block(self, until_expiry_s: float) -> None:
        """Sleep in Redis until a release (a wake token) or the next lease expiry."""
        link = self._backend._link
        key = self._backend.keys.wake
        # Well inside the socket timeout, which would otherwise read as an outage.
        cap = min(_MAX_BLOCK_S, link.socket_timeout / 2)
        timeout = min(cap, max(0.01, until_expiry_s + 0.002))

        async def blpop(client: Redis) -> Any:
            return await client.blpop([key], timeout=timeout)

        try:
            await link.call("job slots", blpop)
        except asyncio.CancelledError:
            # A wake token may have been taken for nobody: leave one for the next waiter.
            self._backend._spawn(self._push_spare_wake())
            raise

    async def _push_spare_wake(self) -> None:
        key = self._backend.keys.wake
        with contextlib.suppress(Exception):
            await self._backend._link.client().lpush(key, "1")

    async def release(self, token: object) -> None:
        if not isinstance(token, _Lease):
            raise TypeError(f"not a lease of these slots: {token!r}")
        if token.local:
            self._local_held -= 1
            await self._local_slots().release(None)
            return
        if token.id not in self._held:
            return  # released already (or by aclose)
        del self._held[token.id]
        task = self._backend._spawn(self._release_remote(token.id))
        await asyncio.shield(task)

    async def _release_remote(self, lease: str) -> None:
        link = self._backend._link
        keys = self._backend.keys
        ttl_ms = self._backend._lease_ttl_ms

        async def release(client: Redis) -> Any:
            script = link.script("release", RELEASE_LUA)
            return await script(keys=[keys.slots, keys.wake], args=[lease, self.capacity, ttl_ms])

        try:
            if self._renewal_done is not None:
                await self._renewal_done.wait()
            await link.call("job slots", release)
        except (Unavailable, LimitsBackendError) as exc:
            logger.warning("lease %s not released (%s); it expires by its TTL", lease, str(exc))

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"dreamo-lease-renewal-{self._backend.keys.slots}"
            )

    async def _renew_forever(self) -> None:
        """Extend every lease of this process each ``lease_ttl / 3`` (one round trip)."""
        link = self._backend._link
        keys = self._backend.keys
        period = self._backend.lease_ttl / 3
        ttl_ms = self._backend._lease_ttl_ms
        while self._held:
            await asyncio.sleep(period)
            leases = list(self._held)
            if not leases:
                return

            async def renew(client: Redis, leases: list[str] = leases) -> Any:
                script = link.script("renew", RENEW_LUA)
                return await script(keys=[keys.slots], args=[ttl_ms, *leases])

            done = self._renewal_done = asyncio.Event()
            try:
                lost = int(await link.call("lease renewal", renew))
            except (Unavailable, LimitsBackendError) as exc:
                logger.warning("could not renew %d lease(s): %s", len(leases), str(exc))
                continue
            finally:
                self._renewal_done = None
                done.set()
            if lost:
                logger.warning(
                    "%d lease(s) had expired in Redis (a restart, or this process stalled "
                    "longer than lease_ttl=%g s) and were re-created; the shared "
                    "max_concurrency may be exceeded briefly",
                    lost,
                    self._backend.lease_ttl,
                )

    def _local_slots(self) -> JobSlots:
        if self._local is None:
            self._local = LocalCoordinator().make_slots(self.capacity)
        return self._local

    async def aclose(self) -> None:
        """Stop renewing and give back every lease still held (best effort, time-bounded)."""
        await stop_task(self._renewer)
        self._renewer = None
        leases, self._held = list(self._held), {}
        if leases:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await asyncio.gather(*(self._release_remote(lease) for lease in leases))

    def __repr__(self) -> str:
        return (
            f"<RedisSlots {self._backend.keys.slots} {self.in_use}/{self.capacity} held "
            f"here, {self._waiting} waiting>"
        )


# --------------------------------------------------------------------------- coordinator


class RedisCoordinator(RedisShared):
    """A :class:`~dreamo_async.coordination.Coordinator` held in Redis, shared by processes.

    - ``url``: ``redis://[[user]:password@]host:port/db`` (or ``rediss://``, ``unix://``).
    - ``key``: names the shared budget; every process using the same API key should use
      the same ``key`` (and the same ``requests_per_second``, ``burst`` and
      ``max_concurrency``: each process enforces the values it was given).
    - ``lease_ttl``: seconds after which the job slots of a dead process come back;
      live processes renew every ``lease_ttl / 3``.
    - ``fallback``: ``"error"`` (fail closed: :class:`LimitsBackendError`) or ``"local"``
      (warn with :class:`DreamOWarning`, then enforce the limits per process).
    - ``reconnect_timeout``: how long an outage of a Redis that answered before is
      waited out (a restart) before ``fallback`` applies.
    - ``socket_timeout``: connect and read timeout of each Redis call.
    - ``headroom``: requests are spaced ``(1 + headroom) / rate`` apart (by default
      2 % slower than asked), so that a request reaching the service up to
      ``headroom`` seconds after its turn (network jitter, a busy event loop) still
      cannot make ``rate + burst`` in one second at the service.

    Give each ``DreamOClient`` its own ``RedisCoordinator`` (it is one connection pool):
    closing the client closes the backend and gives back its leases. With
    ``requests_per_second=None`` each request still asks Redis whether a 429 paused
    the key (one round trip).
    """

    def make_limiter(self, rate: float | None, burst: int) -> RedisRateLimiter:
        return RedisRateLimiter(self, rate, burst)

    def make_slots(self, max_concurrency: int) -> RedisSlots:
        slots = RedisSlots(self, max_concurrency)
        self._closers.append(slots.aclose)
        return slots

    def make_budget(self, cap: Decimal | None) -> RedisBudget:
        """The ``max_spend`` ledger, shared by every process using the key (redis_budget.py)."""
        return RedisBudget(self, cap)

    def __repr__(self) -> str:
        return f"<RedisCoordinator {self.url} key={self.key!r} fallback={self.fallback!r}>"
