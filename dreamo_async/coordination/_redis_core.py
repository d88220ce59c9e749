"""The Redis side's common ground: the connection and its outage rules, the keys, the
owner of leases, and the background writes. :class:`RedisShared` is what the limiter,
the slots and the budget ledger are given; :class:`~dreamo_async.coordination.RedisCoordinator`
is the public face.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .._netguard import display_url
from ..errors import ConfigurationError, DreamOWarning, LimitsBackendError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["Fallback", "Keys", "Link", "RedisShared", "Unavailable", "stop_task"]

logger = logging.getLogger("dreamo_async")

_T = TypeVar("_T")

Fallback = Literal["error", "local"]


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop (a lease renewer) and wait until it has stopped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Unavailable(Exception):
    """Redis could not be reached (within the grace period); carries the cause."""


class Link:
    """The Redis client (one per event loop), its scripts, and the rules of an outage.

    ``call`` runs one operation. While Redis is unreachable it retries with backoff
    for ``reconnect_timeout`` seconds, provided Redis answered at least once before
    (a restart); a Redis that never answered fails at once, so a wrong URL is a
    clear error rather than a hang. With ``fallback="local"`` an outage is then
    re-tested at most once per ``recheck`` seconds, so calls do not each pay a
    connection attempt while the limits are held locally.
    """

    def __init__(
        self,
        url: str,
        *,
        fallback: Fallback,
        reconnect_timeout: float,
        socket_timeout: float,
        recheck: float = 1.0,
    ) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
        except ImportError as exc:
            raise ConfigurationError(
                "RedisCoordinator needs the redis package: pip install 'dreamo_async[redis]'"
            ) from exc
        self._redis_module = redis.asyncio
        self.url = url
        #: ``url`` for messages and ``repr``: no user info, password or query.
        self.safe_url = display_url(url)
        self.fallback: Fallback = fallback
        self.reconnect_timeout = reconnect_timeout
        self.socket_timeout = socket_timeout
        self.recheck = recheck
        #: What counts as "Redis is not there" (a replica promoted mid-failover included).
        self.outage_errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
            OSError,
        )
        self.redis_errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError,)
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._ever_ok = False
        self._down_since: float | None = None
        self._last_attempt = 0.0
        self._warned = False
        #: Round trips sent (scripts and BLPOPs), for statistics and benchmarks.
        self.calls = 0

    def client(self) -> Redis:
        """The client of the running loop (a new loop, e.g. a new ``asyncio.run``, gets its own)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = self._redis_module.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                # Our own loop below decides how long to insist; no hidden retries.
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self._loop = loop
            self._scripts = {}
        return self._client

    def script(self, name: str, source: str) -> AsyncScript:
        """A registered script (EVALSHA; re-sent by redis-py when Redis answers NOSCRIPT)."""
        client = self.client()
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = client.register_script(source)
        return found

    async def call(self, what: str, op: Callable[[Redis], Awaitable[_T]]) -> _T:
        """Run ``op`` against Redis; raise :class:`Unavailable` when Redis is gone."""
        loop = asyncio.get_running_loop()
        delay = 0.02
        while True:
            now = loop.time()
            if (
                self._down_since is not None
                and self.fallback == "local"
                and (not self._ever_ok or now - self._down_since >= self.reconnect_timeout)
                and now - self._last_attempt < self.recheck
            ):
                raise Unavailable(f"{what}: Redis at {self.safe_url} is unavailable")
            self._last_attempt = now
            try:
                self.calls += 1
                result = await op(self.client())
            except self.outage_errors as exc:
                now = loop.time()
                if self._down_since is None:
                    self._down_since = now
                    if self._ever_ok:
                        logger.warning(
                            "Redis at %s unavailable (%s: %s); retrying for up to %g s",
                            self.safe_url,
                            type(exc).__name__,
                            str(exc),
                            self.reconnect_timeout,
                        )
                remaining = self.reconnect_timeout - (now - self._down_since)
                if not self._ever_ok or remaining <= 0:
                    raise Unavailable(
                        f"{what}: Redis at {self.safe_url} is unavailable "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.5)
                continue
            except self.redis_errors as exc:
                raise LimitsBackendError(
                    f"{what}: Redis at {self.safe_url} answered with an error: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if self._down_since is not None:
                logger.warning("Redis at %s is back; shared limits resume", self.safe_url)
                self._down_since = None
                self._warned = False
            self._ever_ok = True
            return result

    def unavailable(self, exc: Unavailable) -> None:
        """Decide what an outage means: raise (fail closed) or warn once and go local."""
        if self.fallback == "error":
            raise LimitsBackendError(
                f"{exc}; the shared limits cannot be enforced, so nothing is sent "
                "(RedisCoordinator(fallback='local') would enforce them per process instead)"
            ) from exc.__cause__
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{exc}; falling back to in-process limits: each process now enforces "
                "the rate and concurrency limits alone until Redis answers again",
                DreamOWarning,
                stacklevel=4,
            )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await client.aclose()


class Keys:
    """The Redis keys of one shared budget. ``{key}`` is a hash tag: one Cluster slot."""

    __slots__ = ("base", "pause", "rate", "slots", "wake")

    def __init__(self, prefix: str, key: str) -> None:
        self.base = base = f"{prefix}:{{{key}}}"
        self.rate = f"{base}:rate"
        self.pause = f"{base}:pause"
        self.slots = f"{base}:slots"
        self.wake = f"{base}:wake"


class RedisShared:
    """What every Redis-held part of a coordinator shares (see :class:`RedisCoordinator`
    for the arguments)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key: str = "default",
        lease_ttl: float = 10.0,
        fallback: Fallback = "error",
        reconnect_timeout: float = 10.0,
        socket_timeout: float = 5.0,
        headroom: float = 0.02,
        prefix: str = "dreamo",
    ) -> None:
        if fallback not in ("error", "local"):
            raise ValueError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if not lease_ttl >= 0.1:
            raise ValueError(f"lease_ttl must be at least 0.1 s, got {lease_ttl!r}")
        if not key or any(c in key for c in "{}"):
            raise ValueError(f"key must be non-empty and free of braces, got {key!r}")
        if not socket_timeout > 0 or not reconnect_timeout >= 0:
            raise ValueError("socket_timeout must be positive and reconnect_timeout >= 0")
        if not 0.0 <= headroom <= 0.5:
            raise ValueError(f"headroom must be within 0..0.5, got {headroom!r}")
        self.key = key
        self.headroom = float(headroom)
        self.lease_ttl = float(lease_ttl)
        self._lease_ttl_ms = round(self.lease_ttl * 1000)  # as the Lua scripts take it
        self.keys = Keys(prefix, key)
        #: Who holds a lease (visible in Redis): host, pid and a random tag.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._link = Link(
            url,
            fallback=fallback,
            reconnect_timeout=reconnect_timeout,
            socket_timeout=socket_timeout,
        )
        #: Closed by :meth:`aclose` first (the slots give back their leases).
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The Redis URL for display: without user name, password, query or fragment."""
        return self._link.safe_url

    @property
    def fallback(self) -> Fallback:
        return self._link.fallback

    @property
    def round_trips(self) -> int:
        """Redis calls made by this backend so far (scripts, BLPOPs, renewals)."""
        return self._link.calls

    async def ping(self) -> None:
        """Check that Redis answers now; raise :class:`LimitsBackendError` naming the URL if not.

        Useful at start-up, to fail before the first job rather than at it.
        """

        async def ping(client: Redis) -> Any:
            return await client.ping()

        try:
            await self._link.call("ping", ping)
        except Unavailable as exc:
            raise LimitsBackendError(str(exc)) from exc.__cause__

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in a task that is kept (never garbage-collected mid-flight) and
        awaited by :meth:`aclose`; it must log its own failures."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Close what registered in ``_closers`` (slots), finish pending writes, close
        the connections."""
        for close in self._closers:
            await close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await self._link.aclose()
