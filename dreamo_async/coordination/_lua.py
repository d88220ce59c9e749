"""The Lua scripts of :mod:`dreamo_async.redis_limits`: each decision is one atomic script.

Times come from Redis's ``TIME`` (one clock for every host): microseconds for the
rate, milliseconds for leases. Numbers written back go through
``string.format('%.0f')`` so that Lua's 14-digit ``tostring`` never rounds them.

- ``RATE_LUA`` (KEYS rate, pause; ARGV interval µs or 0, burst, wanted):
  ``{granted, wait µs, count}``. A GCRA reservation: the caller sleeps ``wait`` then
  sends. When the bucket has credit, up to ``wanted`` turns due now are taken at once
  (``count``; exactly as ``count`` calls in a row would), for the caller's queued
  neighbours. ``granted = 0`` while a 429 pause is on (``wait`` = its rest), and
  nothing is reserved.
- ``PAUSE_LUA`` (KEYS pause; ARGV µs): extend the shared pause to now + µs.
- ``ACQUIRE_LUA`` (KEYS slots; ARGV capacity, lease id, ttl ms): ``{1, 0}`` with the
  lease added (or refreshed: a retried call is idempotent), else ``{0, ms until the
  soonest lease expires}``. Expired leases are purged first.
- ``RELEASE_LUA`` (KEYS slots, wake; ARGV lease id, capacity, ttl ms): remove the lease
  and push one wake token (the list is capped at ``capacity`` and expires).
- ``RENEW_LUA`` (KEYS slots; ARGV ttl ms, lease ids...): extend every lease; re-create
  and count those Redis lost (a restart, a stall longer than the TTL).
"""

from __future__ import annotations

from typing import Final

__all__ = ["ACQUIRE_LUA", "PAUSE_LUA", "RATE_LUA", "RELEASE_LUA", "RENEW_LUA"]

RATE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  return {0, paused - now, 0}
end
local interval = tonumber(ARGV[1])
if interval <= 0 then
  return {1, 0, tonumber(ARGV[3])}
end
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local allowed = tat - (burst - 1) * interval
local count = 1
if allowed < now then
  count = math.min(tonumber(ARGV[3]), 1 + math.floor((now - allowed) / interval))
end
local new_tat = tat + count * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.floor((new_tat - now) / 1000) + 1000)
local wait = allowed - now
if wait < 0 then
  wait = 0
end
return {1, math.floor(wait), count}
"""

PAUSE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_us = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_us > current then
  redis.call('SET', KEYS[1], string.format('%.0f', until_us),
             'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
"""

ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
"""

RELEASE_LUA: Final = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return removed
"""

RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.0f', now + ttl)
local lost = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not score or tonumber(score) <= now then
    lost = lost + 1
  end
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return lost
"""
