"""The ``max_spend`` ledger shared through Redis: one cap for every process using the key.

``DreamOClient(max_spend=..., coordinator=RedisCoordinator(...))`` keeps the spend, the
reservations and the highest cost seen per image count in Redis. One Lua script
reserves (purging the holds of dead processes first), another settles or releases,
so the check "spent + reserved + estimate <= cap" is atomic across processes and
hosts. Each hold is a lease, like a job slot: renewed every ``lease_ttl / 3`` while
its process lives. ``lease_ttl`` after its process died, a hold stops being reserved
and is counted as spent at its estimate (its task may exist and be billed: the safe
side). A settle whose hold had expired (a process stalled past the TTL) counts its
cost again: an overcount, never an undercount.

Amounts are kept as integers of micro-USD (exact in Lua): estimates and costs are
rounded up to the micro-dollar, the cap down. The ledger of a key lasts until
:func:`reset_spending` (a later run with the same key continues it). Each process
enforces the cap it was given. The budget fails closed: a cap that Redis cannot check
raises :class:`~dreamo_async.errors.LimitsBackendError` (nothing sent), whatever the
``fallback`` of the limits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any, Final

from ..errors import BudgetExceededError, LimitsBackendError
from ._redis_core import RedisShared, Unavailable, stop_task
from .protocols import Reservation, Spending

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisBudget", "reset_spending"]

logger = logging.getLogger("dreamo_async")

_MICRO: Final = Decimal("0.000001")
#: Fields of the ``spend`` hash returned by both scripts, in this order.
_FIELDS: Final = ("spent", "reserved", "estimated", "completed", "failed", "in_flight", "unpriced")

_PURGE_AND_READ: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  local held = redis.call('HGET', KEYS[3], id)
  if held and held ~= 's' then
    -- A dead process's hold: its task may exist and be billed, so it counts as spent
    -- at its estimate (a probe, which has none, as unpriced).
    redis.call('HINCRBY', KEYS[1], 'in_flight', -1)
    redis.call('HINCRBY', KEYS[1], 'failed', 1)
    if held == '-1' or held == '-2' then
      if held == '-1' then
        redis.call('HINCRBY', KEYS[1], 'probes', -1)
      end
      redis.call('HINCRBY', KEYS[1], 'unpriced', 1)
    else
      redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
      redis.call('HINCRBY', KEYS[1], 'spent', held)
      redis.call('HINCRBY', KEYS[1], 'estimated', held)
    end
  end
  redis.call('HDEL', KEYS[3], id)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local function field(name)
  return tonumber(redis.call('HGET', KEYS[1], name) or '0')
end
local function state()
  return {field('spent'), field('reserved'), field('estimated'), field('completed'),
          field('failed'), field('in_flight'), field('unpriced')}
end
"""

#: KEYS spend, holds, amounts, highest; ARGV cap (-1: none), amount (-1: highest or
#: probe), images, hold id, ttl ms. -> {status (1 held, 0 wait, -1 never), amount,
#: wait ms, state...}.
RESERVE_LUA: Final = (
    _PURGE_AND_READ
    + """
local cap = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
if amount < 0 then
  amount = tonumber(redis.call('HGET', KEYS[4], ARGV[3]) or '-1')
end
local spent, reserved = field('spent'), field('reserved')
local probes, in_flight = field('probes'), field('in_flight')
local status = 1
if cap >= 0 then
  if amount < 0 then
    if spent >= cap then
      status = -1
    elseif probes > 0 or spent + reserved >= cap then
      status = 0
    end
  elseif spent + amount > cap then
    status = -1
  elseif probes > 0 or spent + reserved + amount > cap then
    status = 0
  end
end
if status == 1 then
  redis.call('ZADD', KEYS[2], string.format('%.0f', now + tonumber(ARGV[5])), ARGV[4])
  redis.call('HSET', KEYS[3], ARGV[4], string.format('%.0f', amount))
  redis.call('HINCRBY', KEYS[1], 'in_flight', 1)
  if amount < 0 then
    redis.call('HINCRBY', KEYS[1], 'probes', 1)
  else
    redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%.0f', amount))
  end
end
local wait = 1000
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[2] then
  wait = math.max(1, tonumber(first[2]) - now)
end
local out = {status, amount, wait}
for _, v in ipairs(state()) do
  table.insert(out, v)
end
return out
"""
)

#: KEYS spend, holds, amounts, highest, wake; ARGV hold id, cost (-1: none), outcome
#: ("completed", "failed" or "release"), images, estimate (-1: none), ttl ms. -> state.
SETTLE_LUA: Final = (
    _PURGE_AND_READ
    + """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held ~= 's' then
  if held then
    redis.call('HINCRBY', KEYS[1], 'in_flight', -1)
    if held == '-1' then
      redis.call('HINCRBY', KEYS[1], 'probes', -1)
    elseif held ~= '-2' then
      redis.call('HINCRBY', KEYS[1], 'reserved', '-' .. held)
    end
  end
  if ARGV[3] ~= 'release' then
    local cost = tonumber(ARGV[2])
    local estimate = tonumber(ARGV[5])
    if cost >= 0 then
      redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
      local highest = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '-1')
      if cost > highest then
        redis.call('HSET', KEYS[4], ARGV[4], ARGV[2])
      end
    elseif estimate >= 0 then
      redis.call('HINCRBY', KEYS[1], 'spent', ARGV[5])
      redis.call('HINCRBY', KEYS[1], 'estimated', ARGV[5])
    else
      redis.call('HINCRBY', KEYS[1], 'unpriced', 1)
    end
    redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
  end
  -- A settled mark, so that a retried call counts nothing twice; purged after the TTL.
  redis.call('HSET', KEYS[3], ARGV[1], 's')
  redis.call('ZADD', KEYS[2], string.format('%.0f', now + tonumber(ARGV[6])), ARGV[1])
  redis.call('LPUSH', KEYS[5], '1')
  redis.call('LTRIM', KEYS[5], 0, 63)
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[6]))
end
return state()
"""
)

#: KEYS spend, amounts, wake; ARGV hold id. A probe ("-1") becomes one that holds no
#: one back ("-2"). -> 1 if it was a probe.
UNBLOCK_LUA: Final = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= '-1' then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], '-2')
redis.call('HINCRBY', KEYS[1], 'probes', -1)
redis.call('LPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], 0, 63)
return 1
"""

#: KEYS holds, amounts; ARGV ttl ms, hold ids... -> holds lost (expired and purged);
#: one settled meanwhile (a race with its settle) is neither renewed nor lost.
RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = 0
for i = 2, #ARGV do
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if not held then
    lost = lost + 1
  elseif held ~= 's' then
    redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + tonumber(ARGV[1])), ARGV[i])
  end
end
return lost
"""


def _micro(amount: Decimal, rounding: str = ROUND_CEILING) -> int:
    return int((amount / _MICRO).to_integral_value(rounding=rounding))


def _usd(micro: Any) -> Decimal:
    return (Decimal(int(micro)) * _MICRO).normalize() if int(micro) else Decimal(0)


class _Keys:
    __slots__ = ("amounts", "highest", "holds", "spend", "wake")

    def __init__(self, base: str) -> None:
        self.spend = f"{base}:spend"
        self.holds = f"{base}:spend:holds"
        self.amounts = f"{base}:spend:amounts"
        self.highest = f"{base}:spend:highest"
        self.wake = f"{base}:spend:wake"

    def all(self) -> list[str]:
        return [self.spend, self.holds, self.amounts, self.highest, self.wake]


class RedisBudget:
    """A :class:`~dreamo_async.budget.BudgetLedger` in Redis (see the module docstring)."""

    def __init__(self, backend: RedisShared, cap: Decimal | None) -> None:
        self.cap = cap
        self._backend = backend
        self._keys = _Keys(backend.keys.base)
        self._cap_micro = -1 if cap is None else _micro(cap, ROUND_FLOOR)
        self._ids = itertools.count(1)
        self._turn = asyncio.Lock()  # one waiter of this process blocks on the wake list
        self._waiting = 0
        self._held: dict[str, None] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._state: tuple[Any, ...] = (0,) * len(_FIELDS)

    # -- reserve ---------------------------------------------------------------------

    async def reserve(self, estimate: Decimal | None, images: int) -> Reservation:
        amount = -1 if estimate is None else _micro(estimate)
        if self._waiting == 0:
            held = await self._try(amount, images)
            if held is not None:
                return held
        self._waiting += 1
        try:
            async with self._turn:
                while True:
                    held = await self._try(amount, images)
                    if held is not None:
                        return held
                    await self._block(self._wait_ms / 1000)
        finally:
            self._waiting -= 1

    async def _try(self, amount: int, images: int) -> Reservation | None:
        link, keys = self._backend._link, self._keys
        hold = f"{self._backend.owner}:b{next(self._ids)}"
        args: list[str | int] = [self._cap_micro, amount, images, hold, self._backend._lease_ttl_ms]

        async def reserve(client: Redis) -> Any:
            script = link.script("budget-reserve", RESERVE_LUA)
            return await script(
                keys=[keys.spend, keys.holds, keys.amounts, keys.highest], args=args
            )

        try:
            reply = await link.call("budget", reserve)
        except asyncio.CancelledError:
            # The script may have run: give the hold back, or it would block the cap a TTL.
            self._backend._spawn(self._settle(hold, -1, "release", images, -1))
            raise
        except Unavailable as exc:
            raise LimitsBackendError(
                f"{exc}; the spending cap cannot be checked, so nothing is sent"
            ) from exc.__cause__
        status, held_amount, wait_ms = (int(v) for v in reply[:3])
        self._state = tuple(reply[3:])
        if status == 1:
            self._held[hold] = None
            self._ensure_renewer()
            return Reservation(hold, None if held_amount < 0 else _usd(held_amount), images)
        if status < 0:
            snap = self.snapshot()
            raise BudgetExceededError(
                cap=self.cap,
                spent=snap.spent,
                reserved=snap.reserved,
                estimate=None if held_amount < 0 else _usd(held_amount),
            )
        self._wait_ms = wait_ms
        return None

    _wait_ms = 1000

    async def _block(self, until_expiry_s: float) -> None:
        """Sleep in Redis until a settle somewhere (a wake token) or the next hold expiry."""
        link, key = self._backend._link, self._keys.wake
        timeout = min(1.0, link.socket_timeout / 2, max(0.01, until_expiry_s + 0.002))

        async def blpop(client: Redis) -> Any:
            return await client.blpop([key], timeout=timeout)

        try:
            await link.call("budget", blpop)
        except Unavailable as exc:
            raise LimitsBackendError(
                f"{exc}; the spending cap cannot be checked, so nothing is sent"
            ) from exc.__cause__

    # -- settle ----------------------------------------------------------------------

    def settle(self, reservation: Reservation, cost: Decimal | None, *, failed: bool) -> None:
        self._held.pop(reservation.id, None)
        estimate = -1 if reservation.amount is None else _micro(reservation.amount)
        self._backend._spawn(
            self._settle(
                reservation.id,
                -1 if cost is None else _micro(cost),
                "failed" if failed else "completed",
                reservation.images,
                estimate,
            )
        )

    def release(self, reservation: Reservation) -> None:
        self._held.pop(reservation.id, None)
        self._backend._spawn(self._settle(reservation.id, -1, "release", reservation.images, -1))

    def unblock(self, reservation: Reservation) -> None:
        if not reservation.blocking:
            return
        reservation.blocking = False
        link, keys = self._backend._link, self._keys

        async def unblock(client: Redis) -> Any:
            script = link.script("budget-unblock", UNBLOCK_LUA)
            return await script(keys=[keys.spend, keys.amounts, keys.wake], args=[reservation.id])

        async def run() -> None:
            try:
                await link.call("budget", unblock)
            except (Unavailable, LimitsBackendError) as exc:
                logger.warning("probe %s still holds back creates (%s)", reservation.id, str(exc))

        self._backend._spawn(run())

    async def _settle(self, hold: str, cost: int, outcome: str, images: int, estimate: int) -> None:
        link, keys = self._backend._link, self._keys
        args: list[str | int] = [hold, cost, outcome, images, estimate, self._backend._lease_ttl_ms]

        async def settle(client: Redis) -> Any:
            script = link.script("budget-settle", SETTLE_LUA)
            return await script(
                keys=[keys.spend, keys.holds, keys.amounts, keys.highest, keys.wake], args=args
            )

        try:
            self._state = tuple(await link.call("budget", settle))
        except (Unavailable, LimitsBackendError) as exc:
            logger.warning(
                "spend of hold %s not recorded in Redis (%s): its reservation expires by "
                "its TTL and the shared spend misses this task",
                hold,
                str(exc),
            )

    # -- leases ----------------------------------------------------------------------

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"dreamo-budget-renewal-{self._keys.spend}"
            )

    async def _renew_forever(self) -> None:
        link, keys = self._backend._link, self._keys
        ttl_ms = self._backend._lease_ttl_ms
        while self._held:
            await asyncio.sleep(self._backend.lease_ttl / 3)
            holds = list(self._held)
            if not holds:
                return

            async def renew(client: Redis, holds: list[str] = holds) -> Any:
                script = link.script("budget-renew", RENEW_LUA)
                return await script(keys=[keys.holds, keys.amounts], args=[ttl_ms, *holds])

            try:
                lost = int(await link.call("budget renewal", renew))
            except (Unavailable, LimitsBackendError) as exc:
                logger.warning("could not renew %d budget hold(s): %s", len(holds), str(exc))
                continue
            if lost:
                logger.warning(
                    "%d budget hold(s) had expired in Redis (this process stalled longer "
                    "than lease_ttl=%g s, or Redis lost them): the shared cap no longer "
                    "reserves them",
                    lost,
                    self._backend.lease_ttl,
                )

    # -- view ------------------------------------------------------------------------

    def snapshot(self) -> Spending:
        spent, reserved, estimated, completed, failed, in_flight, unpriced = self._state
        return Spending(
            cap=self.cap,
            spent=_usd(spent),
            reserved=_usd(reserved),
            estimated=_usd(estimated),
            completed=int(completed),
            failed=int(failed),
            in_flight=int(in_flight),
            unpriced=int(unpriced),
        )

    async def aclose(self) -> None:
        await stop_task(self._renewer)
        self._renewer = None
        pending = [t for t in self._backend._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    def __repr__(self) -> str:
        return f"<RedisBudget {self._keys.spend} cap={self.cap}>"


async def reset_spending(limits: RedisShared) -> None:
    """Forget the spend recorded for ``limits.key`` (start a new ledger; no job may run)."""
    keys = _Keys(limits.keys.base)

    async def delete(client: Redis) -> Any:
        return await client.delete(*keys.all())

    try:
        await limits._link.call("budget reset", delete)
    except Unavailable as exc:
        raise LimitsBackendError(str(exc)) from exc.__cause__
