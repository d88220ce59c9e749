"""Coordination: how a client's requests, jobs and spend are paced, in one process or many.

* :mod:`.protocols`: the interfaces (:class:`Coordinator`, :class:`RateLimiter`,
  :class:`JobSlots`, :class:`BudgetLedger`) and their data.
* :mod:`.local`: in this process (the default :class:`LocalCoordinator`).
* :mod:`.redis`: shared through Redis by every process using one API key.
* :mod:`.budget`: ``max_spend``: the rules and the in-process ledger;
  :mod:`.redis_budget`: the same ledger in Redis.

Both sides queue their waiters in one priority queue and share one cool-down after a
429 (:mod:`._waiting`).
"""

from __future__ import annotations

from .budget import Budget, LocalLedger, to_money
from .local import (
    AdaptiveLimiter,
    LocalCoordinator,
    LocalSlots,
    TokenBucketLimiter,
    UnlimitedLimiter,
)
from .protocols import (
    BudgetLedger,
    Coordinator,
    JobSlots,
    Priority,
    RateLimiter,
    Reservation,
    Spending,
)
from .redis import RedisCoordinator, RedisRateLimiter, RedisSlots

__all__ = [
    "AdaptiveLimiter",
    "Budget",
    "BudgetLedger",
    "Coordinator",
    "JobSlots",
    "LocalCoordinator",
    "LocalLedger",
    "LocalSlots",
    "Priority",
    "RateLimiter",
    "RedisCoordinator",
    "RedisRateLimiter",
    "RedisSlots",
    "Reservation",
    "Spending",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
    "to_money",
]
