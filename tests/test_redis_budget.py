"""max_spend shared through a real redis-server: one cap for every client and process.

Several clients in one test stand for several processes (each has its own
``RedisCoordinator``, so its own connections); the multi-process test runs real worker
processes (tests/redis_worker.py), one of them SIGKILLed mid-run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

import dreamo_async as d
from dreamo_async.coordination.redis_budget import reset_spending
from dreamo_async.testing import FakeDreamOServer, make_png

from .conftest import eventually
from .helpers import KEY, client_for
from .redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

PNG = make_png(32, 32)
WORKER = Path(__file__).with_name("redis_worker.py")


@pytest.fixture
async def server() -> AsyncIterator[FakeDreamOServer]:
    async with FakeDreamOServer(api_key=KEY, task_duration_ms=20, cost_per_image="0.01") as fake:
        yield fake


async def test_three_clients_share_one_cap(
    redis_server: RedisServer, server: FakeDreamOServer
) -> None:
    cap = Decimal("1.00")  # the 120 jobs would cost 3.60
    clients = [
        client_for(
            server,
            max_concurrency=6,
            max_spend=cap,
            coordinator=d.RedisCoordinator(redis_server.url, key="cap3"),
        )
        for _ in range(3)
    ]

    async def jobs(client: d.DreamOClient, first: int) -> list[Any]:
        return await asyncio.gather(
            *(
                client.generate(prompt=f"p{i}", images=[PNG] * (1 + i % 5))
                for i in range(first, first + 40)
            ),
            return_exceptions=True,
        )

    runs = await asyncio.gather(*(jobs(c, 40 * n) for n, c in enumerate(clients)))
    outcomes = [outcome for run in runs for outcome in run]
    for client in clients:
        await client.aclose()
    assert all(isinstance(o, d.GenerationResult | d.BudgetExceededError) for o in outcomes)
    billed = server.stats.cost_created
    assert cap * Decimal("0.8") <= billed <= cap
    fresh = client_for(
        server, max_spend=cap, coordinator=d.RedisCoordinator(redis_server.url, key="cap3")
    )
    async with fresh:  # the ledger outlives the clients: a new one sees the same spend
        with pytest.raises(d.BudgetExceededError):
            await fresh.generate(prompt="one more", images=[PNG] * 5)
        assert fresh.spending().spent == billed
        assert fresh.spending().in_flight == 0
        await reset_spending(fresh.coordinator)  # type: ignore[arg-type]
        await fresh.generate(prompt="new ledger", images=[PNG])
        assert fresh.spending().spent == Decimal("0.01")


async def test_the_cap_fails_closed_when_redis_is_gone(server: FakeDreamOServer) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    limits = d.RedisCoordinator(url, key="gone", fallback="local", reconnect_timeout=0)
    async with client_for(server, max_spend="1", coordinator=limits) as client:
        with pytest.warns(d.DreamOWarning), pytest.raises(d.LimitsBackendError) as info:
            await client.generate(prompt="p", images=[PNG])
    assert info.value.nothing_sent
    assert server.stats.create_requests == 0


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )


@pytest.mark.slow
async def test_three_processes_share_a_cap_and_survive_a_sigkill(
    redis_server: RedisServer, inspect: aioredis.Redis
) -> None:
    total, cap, ttl = 200, Decimal("1.50"), 1.0  # 200 jobs would cost 6.00
    fake = await _start(
        *("-m", "dreamo_async.testing", "--port", "0", "--task-duration-ms", "150"),
        *("--cost-per-image", "0.01"),
    )
    workers: list[asyncio.subprocess.Process] = []
    try:
        async with asyncio.timeout(90):
            assert fake.stdout is not None
            base_url = (await asyncio.wait_for(fake.stdout.readline(), 15)).decode().split()[1]
            await inspect.rpush("bc:jobs", *range(total))
            args = [
                *("--base-url", base_url, "--redis-url", redis_server.url),
                *("--queue", redis_server.url, "--key", "bc", "--total", str(total)),
                *("--max-concurrency", "4", "--lease-ttl", str(ttl), "--poll-s", "0.02"),
                *("--max-spend", str(cap), "--vary-images"),
            ]
            workers = [await _start(str(WORKER), *args) for _ in range(3)]
            ended = [0, 0, 0]

            async def follow(i: int) -> None:
                stream = workers[i].stdout
                assert stream is not None
                async for raw in stream:
                    if raw.split()[:1] in ([b"DONE"], [b"CAPPED"]):
                        ended[i] += 1

            readers = [asyncio.create_task(follow(i)) for i in range(3)]
            victim = workers[2]

            async def victim_holds() -> list[str]:
                """The victim's priced holds. A probe's ("-1", "-2") has no estimate: its
                process dying unseen may cost up to its price over the cap (README)."""
                holds = await inspect.hgetall("dreamo:{bc}:spend:amounts")
                return [
                    str(h)
                    for h, v in holds.items()
                    if f":{victim.pid}:" in str(h) and str(v) not in ("s", "-1", "-2")
                ]

            await eventually(lambda: ended[2] >= 2, timeout=30)
            # Kill it while it holds part of the budget. Freeze it first, so what it holds
            # cannot change between the look and the kill (under load a plain look-then-
            # kill missed every hold and found the victim already gone).
            for _ in range(1_000):
                assert victim.returncode is None, "the victim ended before it was caught"
                victim.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.02)  # Redis runs what the victim sent before it froze
                if await victim_holds():
                    break
                victim.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.005)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            assert await victim_holds()
            await readers[2]
            taken = set(await inspect.lrange(f"bc:taken:{victim.pid}", 0, -1))
            lost = taken - set(await inspect.smembers("bc:done"))
            await asyncio.sleep(ttl + 0.1)  # its holds expire: then its jobs go back
            if lost:
                await inspect.rpush("bc:jobs", *lost)
            for worker in workers[:2]:
                assert await asyncio.wait_for(worker.wait(), 60) == 0
            await asyncio.gather(*readers)
            async with (
                aiohttp.ClientSession() as http,
                http.get(base_url + "/_fake/stats") as answer,
            ):
                stats: dict[str, Any] = json.loads(await answer.text())
            billed = Decimal(stats["cost_created"])
            ledger = await inspect.hgetall("dreamo:{bc}:spend")
            spent = Decimal(str(ledger["spent"])) / 10**6
            print({"billed": billed, "ledger": ledger})
            # At the service's count: never over the cap, most of it used.
            assert billed <= cap
            assert billed >= cap * Decimal("0.6")
            # The dead process's holds were counted at their estimates (the safe side).
            assert billed <= spent <= cap
            assert int(ledger["in_flight"]) == 0
    finally:
        for process in [*workers, fake]:
            if process.returncode is None:
                process.kill()
                await process.wait()
